"""The cases of ``scripts/bench-pull``: time until an image can run, from a registry and from
an archive, with ``ctr`` (containerd unpacks, layer after layer, into the overlayfs snapshotter
or, through its walking differ, into ours) and with ``erofs-fuse image pull``/``import`` (every
layer converted at once, handed to our snapshotter as remote snapshots) and with
``erofs-fuse image pull --lazy`` (an image ``erofs-fuse push`` made, its layers read from the
registry on first use; the bytes it fetched counted by a pass-through proxy); then the first output
of ``ctr run``, a cold walk and read of the container's root, and the snapshotter's memory.

One containerd (``tests/ctrstack.py``) and one ``docker-registry`` (``tests/registry_server.py``)
on 127.0.0.1 serve every case. Each case starts cold: no image, no content, no snapshot, no
layer file (checked), caches dropped; the snapshotter is restarted before each case that uses it,
so its memory is that case's alone.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools import ROOT
from devtools.bench import pss

sys.path.insert(0, str(ROOT / "tests"))
from ctrstack import SNAPSHOTTER, Stack, wait_for  # noqa: E402

OVERLAYFS = "overlayfs"
NOISY_LOAD = 1.5  # load average above which a case's times are flagged
TIMEOUT = 1800.0


@dataclass(frozen=True)
class Case:
    source: str       # "registry" or "archive"
    tool: str         # "ctr" or "erofs-fuse"
    snapshotter: str  # OVERLAYFS or SNAPSHOTTER
    jobs: int = 0     # erofs-fuse's -j
    lazy: bool = False  # image pull --lazy of the image push made: nothing converted

    @property
    def name(self) -> str:
        if self.lazy:
            return "erofs-fuse image pull --lazy"
        verb = "pull" if self.source == "registry" else "import"
        if self.tool == "ctr":
            how = "overlayfs" if self.snapshotter == OVERLAYFS else "erofs-fuse, walking differ"
            return f"ctr images {verb} ({how})"
        return f"erofs-fuse image {verb} -j {self.jobs}"

    @property
    def baseline(self) -> bool:
        return self.tool == "ctr" and self.snapshotter == OVERLAYFS


def cases(jobs: list[int]) -> list[Case]:
    out = []
    for source in ("registry", "archive"):
        out += [Case(source, "ctr", OVERLAYFS), Case(source, "ctr", SNAPSHOTTER)]
        out += [Case(source, "erofs-fuse", SNAPSHOTTER, j) for j in jobs]
        if source == "registry":
            out.append(Case(source, "erofs-fuse", SNAPSHOTTER, lazy=True))
    return out


@dataclass(frozen=True)
class BenchImage:
    key: str            # balanced, python, demo
    layout: Path        # its OCI layout directory (pushed to the registry)
    archive: Path       # its OCI archive
    tar_bytes: int      # uncompressed layer tars, summed
    gz_bytes: int
    layers: int
    echo: tuple[str, ...]   # a command that prints "ok"
    sleep: tuple[str, ...]  # a command that runs until killed

    def name(self, case: Case, registry: str) -> str:
        if case.lazy:  # the repository next to skopeo's, as erofs-fuse push wrote it
            return f"{registry}/bench/{self.key}-erofs:v1"
        if case.source == "registry":
            return f"{registry}/bench/{self.key}:v1"
        return f"example.com/bench/{self.key}:v1"


def env() -> dict[str, str]:
    """The commands' environment: this checkout first on the import path."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
        f.write("3\n")


def load() -> float:
    return os.getloadavg()[0]


def run(cmd: list[str], what: str, timeout: float = TIMEOUT) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())
    if proc.returncode:
        raise RuntimeError(f"{what}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def push(image: BenchImage, registry: str) -> None:
    """The layout's one image into the registry, its manifest kept byte for byte."""
    run(["skopeo", "--insecure-policy", "copy", "--quiet", "--preserve-digests",
         "--dest-tls-verify=false", f"oci:{image.layout}",
         f"docker://{registry}/bench/{image.key}:v1"], "skopeo copy")


def push_erofs(image: BenchImage, registry: str, jobs: int) -> int:
    """The layout's image pushed as native EROFS (``erofs-fuse push``) next to skopeo's copy;
    returns the bytes of its layer and Merkle tree blobs, what a lazy pull could fetch."""
    name = f"{registry}/bench/{image.key}-erofs"
    out = run([sys.executable, "-m", "erofs_fuse", "push", "-q", "-j", str(jobs),
               str(image.layout), f"{name}:v1"], "erofs-fuse push")
    digest = out.strip().rpartition("@")[2]
    conn = http.client.HTTPConnection(registry, timeout=30)
    try:
        conn.request("GET", f"/v2/bench/{image.key}-erofs/manifests/{digest}",
                     headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        manifest = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return sum(layer["size"] + int(layer.get("annotations", {}).get(
        "org.erofs-fuse.verity.tree.size", 0)) for layer in manifest["layers"])


Samples = dict[str, list[float]]  # metric -> one value per run


@dataclass
class Runner:
    stack: Stack
    registry: str  # host:port
    staging: Path
    proxy: Any = None  # tests' FaultProxy in front of the registry: the lazy case's blob bytes
    erofs_bytes: dict[str, int] = field(default_factory=dict)  # image -> push_erofs's blobs
    results: dict[tuple[str, str], Samples] = field(default_factory=dict)  # (image, case)
    seq: int = 0

    def add(self, image: BenchImage, case: Case, metric: str, value: float) -> None:
        self.results.setdefault((image.key, case.name), {}).setdefault(metric, []).append(value)
        print(f"  {image.key:9} {case.name:42} {metric:22} {value:.3f}", file=sys.stderr,
              flush=True)

    def ctr(self, *args: str, timeout: float = TIMEOUT) -> str:
        return run(["ctr", "-a", self.stack.address, "-n", "default", *args],
                   f"ctr {' '.join(args[:3])}", timeout)

    def cid(self, what: str) -> str:
        self.seq += 1
        return f"bp{self.seq}-{what}"

    def name(self, image: BenchImage, case: Case) -> str:
        """The image's name; the lazy case's goes through the proxy, which counts its bytes."""
        return image.name(case, self.proxy.host if case.lazy else self.registry)

    def fetched(self) -> int:
        return int(self.proxy.blob_bytes)

    def command(self, image: BenchImage, case: Case) -> list[str]:
        """What makes the image ready to run."""
        name = self.name(image, case)
        if case.lazy:
            return [sys.executable, "-m", "erofs_fuse", "image", "pull", "--lazy", "-a",
                    self.stack.address, "-n", "default", "--snapshotter", SNAPSHOTTER, "-q", name]
        if case.tool == "ctr":
            base = ["ctr", "-a", self.stack.address, "-n", "default", "images"]
            if case.source == "registry":
                return base + ["pull", "--plain-http", "--snapshotter", case.snapshotter, name]
            return base + ["import", "--snapshotter", case.snapshotter, "--index-name", name,
                           str(image.archive)]
        return self.erofs_fuse(image, case) + ([name] if case.source == "registry" else
                                               ["--name", name, str(image.archive)])

    def erofs_fuse(self, image: BenchImage, case: Case) -> list[str]:
        verb = "pull" if case.source == "registry" else "import"
        return [sys.executable, "-m", "erofs_fuse", "image", verb, "-a", self.stack.address,
                "-n", "default", "--snapshotter", SNAPSHOTTER, "-j", str(case.jobs), "-q",
                "--staging", str(self.staging)]

    def fresh_snapshotter(self) -> None:
        """Our snapshotter restarted, and reached by containerd (whose gRPC client may still be
        in reconnect backoff): an empty snapshotter is reached only by a call that containerd
        passes on, such as Prepare (List and Usage are answered from its own database)."""
        self.stack.stop_snapshotter()
        self.empty_cache()
        self.stack.start_snapshotter()
        base = ["ctr", "-a", self.stack.address, "-n", "default", "snapshots", "--snapshotter",
                SNAPSHOTTER]

        def reached() -> bool:
            probe = self.cid("probe")
            if subprocess.run(base + ["prepare", probe], capture_output=True).returncode:
                return False
            run(base + ["rm", probe], "ctr snapshots rm")
            return True

        wait_for(reached, 30, "containerd to reach the snapshotter")

    def one(self, image: BenchImage, case: Case) -> None:
        """One cold run of ``case``, then its image removed and the leftovers checked."""
        if case.snapshotter == SNAPSHOTTER:
            self.fresh_snapshotter()
        name = self.name(image, case)
        drop_caches()
        before = load()
        fetched0 = self.fetched() if case.lazy else 0
        t0 = time.perf_counter()
        run(self.command(image, case), case.name)
        ready = time.perf_counter() - t0
        self.add(image, case, "ready", ready)
        try:
            if case.lazy:
                self.add(image, case, "fetched-ready", self.fetched() - fetched0)
            self.first_output(image, case, name)
            self.add(image, case, "to-first-output",
                     ready + self.results[(image.key, case.name)]["first-output"][-1])
            if case.lazy:
                self.add(image, case, "fetched-first-output", self.fetched() - fetched0)
            self.walk(image, case, name)
            if case.lazy:
                self.add(image, case, "fetched-all", self.fetched() - fetched0)
            self.add(image, case, "load-start", before)
            self.add(image, case, "load-end", load())
        finally:
            self.ctr("images", "rm", "--sync", name)
        self.assert_clean()
        if case.lazy:  # the next lazy run starts with nothing cached
            self.empty_cache()

    def empty_cache(self) -> None:
        """The snapshotter's block cache of lazy layers (ROOT/cache) emptied."""
        cache = self.stack.root / "cache"
        if cache.is_dir():
            for p in cache.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    def first_output(self, image: BenchImage, case: Case, name: str) -> None:
        """``ctr run --rm`` right after the image became ready (caches as it left them): time
        to its first byte of output, and until it exits."""
        cmd = ["ctr", "-a", self.stack.address, "-n", "default", "run", "--rm", "--snapshotter",
               case.snapshotter, name, self.cid("first"), *image.echo]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        assert proc.stdout is not None
        first = proc.stdout.read(1)
        t1 = time.perf_counter()
        rest, err = proc.communicate()
        t2 = time.perf_counter()
        if proc.returncode or first + rest != b"ok\n":
            raise RuntimeError(f"ctr run ({case.name}): exit {proc.returncode}, out "
                               f"{first + rest!r}, {err.decode(errors='replace')[-300:]}")
        self.add(image, case, "first-output", t1 - t0)
        self.add(image, case, "run-total", t2 - t0)

    def walk(self, image: BenchImage, case: Case, name: str) -> None:
        """A container left running; from the host, a cold ``find`` and ``tar | wc -c`` of its
        root (overlayfs over the chain mount, for ours); the snapshotter's and its chain
        mounts' PSS before and after."""
        cid = self.cid("walk")
        self.ctr("run", "-d", "--snapshotter", case.snapshotter, name, cid, *image.sleep)
        try:
            root = str(self.stack.rootfs(cid))
            ours = case.snapshotter == SNAPSHOTTER and self.stack.snapshotter is not None
            if ours:
                self.memory(image, case, "idle")
            drop_caches()
            t0 = time.perf_counter()
            entries = run(["sh", "-c", 'find "$1" | wc -l', "sh", root], "find")
            t1 = time.perf_counter()
            out = run(["sh", "-c", 'tar -C "$1" -cf - . | wc -c', "sh", root], "tar")
            t2 = time.perf_counter()
            self.add(image, case, "find", t1 - t0)
            self.add(image, case, "read-all", t2 - t1)
            self.add(image, case, "entries", int(entries))
            self.add(image, case, "read-bytes", int(out))
            if ours:
                self.memory(image, case, "walked")
        finally:
            self.stack.remove_container(cid)

    def memory(self, image: BenchImage, case: Case, when: str) -> None:
        assert self.stack.snapshotter is not None
        m = pss.memory(self.stack.snapshotter.pid, str(self.stack.root))
        self.add(image, case, f"pss-snapshotter-{when}", m.snapshotter_mib)
        self.add(image, case, f"pss-mounts-{when}", m.mounts_mib)
        self.add(image, case, f"mounts-{when}", m.mounts)

    def leftovers(self) -> list[str]:
        left = [f"content {d}" for d in self.ctr("content", "ls", "-q").split()]
        for snap in (OVERLAYFS, SNAPSHOTTER):
            out = self.ctr("snapshots", "--snapshotter", snap, "ls").splitlines()[1:]
            left += [f"{snap} snapshot {line.split()[0]}" for line in out if line.strip()]
        layers = self.stack.root / "layers"
        if layers.is_dir():
            left += [f"layer file {p.name}" for p in layers.iterdir()]
        return left

    def assert_clean(self) -> None:
        """The next case starts from nothing: containerd's GC (``rm --sync``) took the
        content and snapshots, the snapshotter its layer files."""
        try:
            wait_for(lambda: not self.leftovers(), 30, "the image's removal")
        except AssertionError:
            raise RuntimeError(f"left after removing the image: {self.leftovers()[:8]}")


def disagreements(results: dict[tuple[str, str], Samples]) -> list[str]:
    """Images whose containers' roots differed between cases (entries found, bytes read):
    every case must give the same tree."""
    seen: dict[tuple[str, str], dict[float, list[str]]] = {}
    for (image, case), samples in results.items():
        for metric in ("entries", "read-bytes"):
            for value in samples.get(metric, []):
                seen.setdefault((image, metric), {}).setdefault(value, []).append(case)
    return [f"{image}: {metric} differ: {values}" for (image, metric), values in seen.items()
            if len(values) > 1]


def ratio_samples(results: dict[tuple[str, str], Samples], image: str, case: Case,
                  base: Case, metric: str) -> list[float]:
    """``case`` over the baseline, run by run (the two measured in the same run)."""
    xs = results.get((image, case.name), {}).get(metric, [])
    ys = results.get((image, base.name), {}).get(metric, [])
    return [x / y for x, y in zip(xs, ys) if y > 0]


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None
