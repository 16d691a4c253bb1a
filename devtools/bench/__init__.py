"""What ``scripts/bench``, ``bench-convert`` and ``bench-snapshotter`` are made of."""
