"""erofs-fuse: EROFS layer stacks mounted through FUSE (see README.md and docs/design.md)."""

from .native import use_sources_if_needed

use_sources_if_needed()
