"""Short, seeded runs of the robustness harnesses: scripts/fuzz (library, mount and convert
modes) and scripts/stress. Any crash, hang or checksum error fails the test (in convert mode
also a MemoryError, an unreadable image, a multi-line error or a leftover file); the injected
faults prove that the fuzzer would see each if there were one. The long runs are in the note.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from mounting import env, require_fuse

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "scripts" / "fuzz"
STRESS = ROOT / "scripts" / "stress"


def fuzz(tmp_path: Path, *args: str, timeout: float = 240) -> dict[str, object]:
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, str(FUZZ), "--json", str(out), *args],
                          capture_output=True, text=True, env=env(), timeout=timeout)
    assert out.exists(), f"scripts/fuzz wrote no summary ({proc.returncode}): {proc.stderr[-2000:]}"
    summary: dict[str, object] = json.loads(out.read_text())
    summary["returncode"] = proc.returncode
    return summary


def assert_clean(summary: dict[str, object], count: int) -> None:
    assert summary["mutants"] == count, summary
    findings = json.dumps(summary["findings"], indent=1)[:4000]
    assert summary["crashes"] == 0 and summary["hangs"] == 0, findings
    assert summary["returncode"] == 0
    assert float(summary["peak_rss_mb"]) < 256, summary  # type: ignore[arg-type]


def load_fuzz() -> ModuleType:
    """The image mutations of scripts/fuzz (importing them sets no EROFS_FUSE_STRICT: the entry
    point does, for its own processes)."""
    return importlib.import_module("devtools.fuzz.image_mutants")


def test_mutants_are_a_function_of_seed_and_index() -> None:
    corpus = load_fuzz().Corpus(["plain.erofs", "lz4.erofs", "layer-upper-aufs.erofs"])
    first = [corpus.mutant(7, k) for k in range(30)]
    again = [corpus.mutant(7, k) for k in reversed(range(30))][::-1]
    assert first == again
    assert len({data for _, _, data in first}) > 25
    assert corpus.mutant(8, 0) != first[0]


def test_library_fuzz_short_run(tmp_path: Path) -> None:
    summary = fuzz(tmp_path, "--mode", "lib", "--seed", "7", "--count", "150", "--jobs", "2")
    assert_clean(summary, 150)


def test_fuzz_shows_progress_by_default() -> None:
    # issue #15: the README's commands ran 10-15 minutes without a line of output
    proc = subprocess.run([sys.executable, str(FUZZ), "--mode", "lib", "--seed", "3",
                           "--count", "12"], capture_output=True, text=True, env=env(),
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("12/12 mutants (100%), ") and "about 0 s left" in last, proc.stderr
    quiet = subprocess.run([sys.executable, str(FUZZ), "--mode", "lib", "--seed", "3",
                            "--count", "2", "--no-progress"], capture_output=True, text=True,
                           env=env(), timeout=240)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_mount_fuzz_short_run(tmp_path: Path) -> None:
    require_fuse()
    summary = fuzz(tmp_path, "--mode", "mount", "--seed", "7", "--count", "20", "--jobs", "2")
    assert_clean(summary, 20)
    counts = summary["counts"]
    assert isinstance(counts, dict) and counts.get("ok", 0) > 0


def test_the_fuzzer_sees_crashes_and_hangs(tmp_path: Path) -> None:
    """Index 1 of seed 1 reads a file larger than 4 KiB, where the injected fault strikes."""
    require_fuse()
    lib = fuzz(tmp_path, "--mode", "lib", "--only", "1", "--inject", "crash")
    assert lib["crashes"] == 1 and lib["returncode"] == 1, lib
    mount = fuzz(tmp_path, "--mode", "mount", "--only", "1", "--inject", "crash")
    assert mount["crashes"] == 1, mount
    assert "internal error" in json.dumps(mount["findings"])
    died = fuzz(tmp_path, "--mode", "mount", "--only", "1", "--inject", "exit")
    assert died["crashes"] == 1, died
    assert "went away" in json.dumps(died["findings"])
    hang = fuzz(tmp_path, "--mode", "mount", "--only", "1", "--inject", "hang", "--timeout", "1")
    assert hang["hangs"] == 1 and hang["returncode"] == 1, hang
    (record,) = hang["findings"]  # type: ignore[misc]
    assert "over 1 s" in record["error"] and "faulty" in record["log"]  # the daemon's stack


def test_stress_short_run(tmp_path: Path) -> None:
    """8 readers for 5 s over the fixture stack, checksums against the kernel's overlayfs."""
    require_fuse()
    layers = ",".join(str(ROOT / "fixtures" / "corpus" / n)
                      for n in ("layer-lower-aufs-lz4.erofs", "layer-upper-aufs.erofs"))
    out = tmp_path / "stress.json"
    proc = subprocess.run([sys.executable, str(STRESS), "--layers", layers, "--readers", "8",
                           "--seconds", "5", "--json", str(out)],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == 0 and report["ops"] > 100 and report["daemon_exit"] == 0, report
    assert report["rss_mb"]["max"] < 256, report


# the converter under mutated tars (scripts/fuzz --mode convert) ---------------------------------
def load_fuzz_tar() -> ModuleType:
    """devtools/fuzz/tar_corpus.py (the mutants; it imports the seed tars of tar_seeds.py)."""
    return importlib.import_module("devtools.fuzz.tar_corpus")


def test_tar_mutants_are_a_function_of_seed_and_index() -> None:
    corpus = load_fuzz_tar().TarCorpus()
    first = [corpus.mutant(7, k) for k in range(60)]
    again = [corpus.mutant(7, k) for k in reversed(range(60))][::-1]
    assert first == again
    assert len({m.data for m in first}) > 55
    assert corpus.mutant(8, 0) != first[0]
    wrappings = {m.wrapping.split("+")[0].split("-")[0] for m in first}
    assert wrappings == {"plain", "gzip", "zstd"}, wrappings
    assert len({m.kind.split(":")[0] for m in first}) >= 10


def test_seed_tars_convert_in_every_mode(tmp_path: Path) -> None:
    """Unmutated, every seed is a valid layer: each mode converts it and the image reads back."""
    from erofs_fuse.erofs.image import Image
    from erofs_fuse.mkfs import ConvertOptions, convert_tar

    modes = [ConvertOptions(), ConvertOptions(tar_index=True), ConvertOptions(compress="lz4"),
             ConvertOptions(whiteouts="oci")]
    for name, build in load_fuzz_tar().SEEDS.items():
        tar = tmp_path / f"{name}.tar"
        tar.write_bytes(build())
        for k, options in enumerate(modes):
            out = str(tmp_path / f"{name}-{k}.erofs")
            result = convert_tar(str(tar), out, options)
            assert not result.warnings, (name, result.warnings)
            with Image.open(out) as image:
                for _, node in image.walk():
                    if node.is_reg:
                        node.read(0, 1 << 20)
                    elif node.is_symlink:
                        node.readlink()
                    node.xattrs()


def test_convert_fuzz_short_run(tmp_path: Path) -> None:
    """700 mutated tars through every mode of the converter; a sample through the kernel."""
    crashes = tmp_path / "crashes"
    # 20 s a mutant: a hang is still caught, a machine busy with other work is not one
    summary = fuzz(tmp_path, "--mode", "convert", "--seed", "11", "--count", "700",
                   "--jobs", "2", "--kernel-every", "10", "--crashes", str(crashes),
                   "--timeout", "20")
    assert summary["mutants"] == 700, summary
    findings = json.dumps(summary["findings"], indent=1)[:6000]
    assert summary["bugs"] == 0 and summary["returncode"] == 0, findings
    counts = summary["counts"]
    assert isinstance(counts, dict) and counts.get("ok", 0) > 50 and counts.get("refused", 0) > 50
    assert int(summary["kernel_checks"]) > 5, summary  # type: ignore[call-overload]
    assert float(summary["peak_rss_mb"]) < 256, summary  # type: ignore[arg-type]
    assert not crashes.exists()


def test_the_convert_fuzzer_sees_every_kind_of_bug(tmp_path: Path) -> None:
    """A fault injected into the full mode's conversion of mutant 2 (which converts)."""
    expected = {"crash": "crash", "exit": "crash", "hang": "hang", "memory": "memory",
                "leftover": "leftover", "message": "bad-message", "image": "bad-image"}
    for fault, status in expected.items():
        crashes = tmp_path / fault
        summary = fuzz(tmp_path, "--mode", "convert", "--seed", "1", "--only", "2", "--jobs", "1",
                       "--inject", fault, "--timeout", "1", "--kernel-every", "0",
                       "--crashes", str(crashes))
        assert summary["counts"] == {status: 1} and summary["returncode"] == 1, (fault, summary)
        (record,) = summary["findings"]  # type: ignore[misc]
        assert record["modes"]["full"] == status and record["modes"]["lz4"] == "ok", record
        saved = Path(record["saved"])
        assert sorted(crashes.iterdir()) == sorted([saved, crashes / "convert-1-2.json"])
