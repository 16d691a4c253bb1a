"""Developer tools behind ``scripts/``: benchmarks (``bench``), fuzzers (``fuzz``), the images
they build (``images``) and the tar builders shared with the tests (``tars``).

Not shipped (``pyproject.toml`` packages only ``erofs_fuse``): the entry points in ``scripts/``
put the checkout's root on ``sys.path`` and import from here.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout
