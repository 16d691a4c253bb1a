"""The EROFS writer: layer tars and directories to EROFS images, in pure Python.

It shares ``erofs/ondisk.py`` with the reader (one declaration of every on-disk structure) and
imports nothing of FUSE, trio or the mount. ``convert_tar`` and ``convert_dir`` are the API;
``erofs-fuse convert`` is their command line.
"""

from __future__ import annotations

from .convert import ConvertOptions as ConvertOptions
from .convert import ConvertResult as ConvertResult
from .convert import convert_tar as convert_tar
from .dirsource import convert_dir as convert_dir
from .errors import BadInputError as BadInputError
from .errors import MkfsError as MkfsError
from .errors import UnsupportedInputError as UnsupportedInputError
