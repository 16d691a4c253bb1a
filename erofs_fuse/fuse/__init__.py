"""The FUSE daemon: the operations (``operations``), the merged overlay tree (``overlay``), id
mapping (``idmap``), mountinfo (``mountinfo``) and the mount's life cycle (``daemon``). The
only room that imports pyfuse3 and trio."""
