"""OCI images: layouts and archives (``layout``, ``image``), ``.layers`` files
(``layers_file``), and image conversion (``convert``) with its worker processes (``workers``)
and progress (``progress``). No FUSE, no command line."""
