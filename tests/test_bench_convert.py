"""``scripts/bench-convert --quick``: it runs, and its JSON holds every row of the report.

No timing is checked: the benchmark is a report, and this only keeps it working.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from helpers import ROOT

LAYER_SECTIONS = ["layer0", "layer1", "layer2", "layer0+layer1+layer2", "small"]
IMAGE_SECTIONS = ["image-debian", "image-211"]
OURS = ["convert", "convert --tar-index", "convert --compress lz4", "convert DIR"]
NEW_C_TOOL = ["mkfs.erofs --tar=f --aufs", "mkfs.erofs --tar=i --aufs",
              "mkfs.erofs --tar=f --aufs -zlz4"]
OTHERS = ["tar -xzf", "mkfs.erofs 1.5 DIR", "tar -xzf + mkfs.erofs 1.5"]
IMAGE_CASES = ["convert-image -j 1", "convert-image -j 2", "tar -xzf, layer after layer"]


def test_quick_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [str(ROOT / "scripts" / "bench-convert"), "--quick", "--runs", "1",
         "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(out.glob("bench-convert-2*.json"))
    assert len(files) == 1, files
    doc = json.loads(files[0].read_text())
    assert doc["runs"] == 1 and doc["quick"] is True and doc["cache"] == "warm"
    rows = {(r["section"], r["case"]): r for r in doc["rows"]}
    want = [(s, c) for s in LAYER_SECTIONS for c in OURS + NEW_C_TOOL + OTHERS]
    want += [(s, c) for s in IMAGE_SECTIONS for c in IMAGE_CASES]
    assert sorted(rows) == sorted(want)
    new_tool = bool(os.environ.get("EROFS_UTILS_BIN"))
    for (section, case), row in rows.items():
        if case in NEW_C_TOOL and not new_tool:
            assert row["available"] is False and "EROFS_UTILS_BIN" in row["note"], row
            continue
        assert row["available"] is True, (section, case, row)
        assert len(row["samples"]["wall"]) == 1
        for key in ("wall", "cpu", "rss", "tree"):
            assert row["median"][key] >= 0, (section, case, key)
        assert row["median"]["wall"] > 0 and row["mb_per_s"] > 0 and row["files_per_s"] > 0
    for section, case in [(s, "convert") for s in LAYER_SECTIONS]:
        assert rows[(section, case)]["ratios"]["tar -x"]["vs"] == "tar -xzf"
    assert {a["aim"].split(":")[0] for a in doc["aims"]} >= set(IMAGE_SECTIONS)
    assert doc["inputs"]["small"]["entries"] > 2000
    assert "image-debian" in proc.stdout and "aims (issue #12)" in proc.stdout
