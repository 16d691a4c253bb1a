#!/usr/bin/env python3
"""Run ``erofs-fuse mount --foreground ...`` under cProfile; write the stats when it returns.

Usage: python3 -m devtools.bench.profiled_mount STATS_FILE MOUNT_ARGS...   (used by ``scripts/bench --profile``)
The FUSE handlers run in the main thread (trio), so the one profiler sees every request.
"""

from __future__ import annotations

import cProfile
import sys

from erofs_fuse.cli.mount import main

if __name__ == "__main__":
    out, args = sys.argv[1], sys.argv[2:]
    prof = cProfile.Profile()
    try:
        rc = prof.runcall(main, args)
    finally:
        prof.dump_stats(out)
    sys.exit(rc)
