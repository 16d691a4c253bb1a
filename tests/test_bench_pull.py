"""``scripts/bench-pull`` in its smallest form (one run, the balanced image at 1/100 of its
size, ``-j 2``, the profile): it runs, every case of both sources is measured (the lazy pull's
bytes fetched too), the containers' roots agree, and its JSON and tables hold every row.

No timing is checked: the benchmark is a report, and this only keeps it working (a real
containerd, docker-registry and skopeo, as the benchmark uses).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT

CASES = ["ctr images pull (overlayfs)", "ctr images pull (erofs-fuse, walking differ)",
         "erofs-fuse image pull -j 2", "erofs-fuse image pull --lazy",
         "ctr images import (overlayfs)",
         "ctr images import (erofs-fuse, walking differ)", "erofs-fuse image import -j 2"]
TIMES = ["ready", "first-output", "run-total", "to-first-output", "find", "read-all", "entries", "read-bytes",
         "load-start", "load-end"]
MEMORY = ["pss-snapshotter-idle", "pss-snapshotter-walked", "pss-mounts-idle",
          "pss-mounts-walked", "mounts-idle", "mounts-walked"]
FETCHED = ["fetched-ready", "fetched-first-output", "fetched-all"]  # the lazy case's


@pytest.mark.slow
def test_smallest_run_measures_every_case(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [str(ROOT / "scripts" / "bench-pull"), "--runs", "1", "--scale", "0.01", "--images",
         "balanced", "--jobs", "2", "--profile", "--workdir", str(tmp_path / "work"),
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out.glob("bench-pull-2*.json"))
    assert len(files) == 1, files
    doc = json.loads(files[0].read_text())
    assert doc["cases"] == CASES and doc["disagreements"] == []
    results = doc["results"]
    assert sorted(results) == sorted(f"balanced|{case}" for case in CASES)
    for case in CASES:
        samples = results[f"balanced|{case}"]
        ours = "erofs-fuse" in case
        want = TIMES + (MEMORY if ours else []) + (FETCHED if "--lazy" in case else [])
        assert sorted(samples) == sorted(want), case
        assert all(len(xs) == 1 for xs in samples.values()), case
        assert samples["ready"][0] > 0 and samples["first-output"][0] > 0
        if ours:  # one chain mount serves the container; the processes are found
            assert samples["mounts-idle"] == [1] and samples["pss-mounts-idle"][0] > 1
            assert samples["pss-snapshotter-idle"][0] > 5
    # the walk read the whole tree: busybox and ~4 MB of files
    assert results["balanced|ctr images pull (overlayfs)"]["read-bytes"][0] > 4_000_000
    # the lazy pull fetched a part of the pushed image, then the walk the rest of what it read
    lazy = results["balanced|erofs-fuse image pull --lazy"]
    pushed = doc["images"]["balanced"]["erofs_bytes"]
    assert 0 < lazy["fetched-ready"][0] <= lazy["fetched-first-output"][0] \
        <= lazy["fetched-all"][0] <= pushed
    report = proc.stdout
    for case in CASES:
        assert f"| {case} " in report
    assert "### memory (PSS, MiB)" in report and "### aims (issue 19" in report
    assert "--lazy: to-first-output <= 0.2x of ctr images pull (overlayfs)" in report
    assert len(doc["profiles"]) == 1
    assert "conversion workers" in doc["profiles"][0] or "py-spy" in doc["profiles"][0]
