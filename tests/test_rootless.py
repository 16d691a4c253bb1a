"""Unprivileged use, for real: an ordinary user mounts a two-layer stack through the setuid
fusermount3, reads it with mapped ids and unmounts it; allow_other only when asked; mount(8)
with ``-t fuse.erofs-fuse`` and an fstab line; and a rootless bubblewrap sandbox running a
program from the merged tree.

The tests run as root and act as the system user ``erofs-fuse-test``, created when missing and
left in place. That user runs the all-users install of scripts/install-deps (the interpreter of
/opt/erofs-fuse, /usr/local/bin/erofs-fuse) with PYTHONPATH set to a world-readable copy of this
checkout's package, so the code under test is what runs wherever the checkout lives. A missing
component (the install, /dev/fuse open to every user, the setuid fusermount3, bwrap, busybox,
mkfs.erofs) fails the tests: they never skip. Every mount is removed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import ROOT, mkfs_erofs, require_tool
from mounting import force_unmount, fuse_mount, is_mounted, require_fuse, wait_until

USER = "erofs-fuse-test"
USER_HOME = "/var/lib/erofs-fuse-test"
VENV_PYTHON = "/opt/erofs-fuse/bin/python"
ENTRY = "/usr/local/bin/erofs-fuse"
BUSYBOX = "/bin/busybox"
# the PATH mount(8) gives its helpers (mount.fuse3 finds erofs-fuse in it)
MOUNT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INSTALL = "run scripts/install-deps"

# Run by the test user: what the mount shows at each path (owner, mode, contents or the errno,
# xattr names and values or errnos), as JSON.
PROBE = r"""
import errno, json, os, sys
root, out = sys.argv[1], {}
def err(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno))
for rel in sys.argv[2:]:
    path = os.path.join(root, rel.lstrip("/"))
    item = out[rel] = {}
    try:
        st = os.lstat(path)
    except OSError as exc:
        item["error"] = err(exc)
        continue
    item.update(uid=st.st_uid, gid=st.st_gid, mode=st.st_mode & 0o7777)
    try:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                item["data"] = f.read()
        names = os.listxattr(path, follow_symlinks=False)
        item["xattrs"] = {}
        for name in names:
            try:
                item["xattrs"][name] = os.getxattr(path, name, follow_symlinks=False).decode()
            except OSError as exc:
                item["xattrs"][name] = err(exc)
    except OSError as exc:
        item["read_error"] = err(exc)
for name in ("trusted.secret", "user.kind"):
    try:
        out[name] = os.getxattr(os.path.join(root, "xattrs"), name).decode()
    except OSError as exc:
        out[name] = err(exc)
print(json.dumps(out))
"""
PATHS = ["/", "/etc/hostname", "/etc/secret", "/srv/www/index.html", "/home/app/notes",
         "/opt/far", "/gone", "/app/new", "/xattrs"]


@dataclass
class Rootless:
    """The test user, the shared work directory and the two layers (bottom, top)."""

    uid: int
    gid: int
    work: Path
    pkg: Path
    layers: list[str]

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``cmd`` as the test user, in a clean environment that imports the code under test."""
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": USER_HOME, "LANG": "C.UTF-8",
               "PYTHONPATH": str(self.pkg), "PYTHONDONTWRITEBYTECODE": "1"}
        return subprocess.run(
            ["runuser", "-u", USER, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
             *cmd], capture_output=True, text=True, timeout=timeout, cwd=self.work)

    def probe(self, mnt: str) -> dict[str, Any]:
        proc = self.run(VENV_PYTHON, "-c", PROBE, mnt, *PATHS)
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def mountpoint(self, name: str) -> str:
        path = self.work / name
        path.mkdir()
        os.chown(path, self.uid, self.gid)  # fusermount3: the user must own the mountpoint
        return str(path)

    def log(self, name: str) -> str:
        """A log file for the user's daemon, in a directory the user may write."""
        logs = self.work / "logs"
        if not logs.exists():
            logs.mkdir()
            os.chown(logs, self.uid, self.gid)
        return str(logs / name)


def require_components() -> None:
    assert os.geteuid() == 0, "the rootless tests run as root (they create a user)"
    require_fuse()
    mode = os.stat("/dev/fuse").st_mode
    assert mode & 0o006 == 0o006, f"/dev/fuse is {stat.filemode(mode)}, not usable by " \
        f"ordinary users: {INSTALL} (it does what udev does on a booted Debian)"
    fusermount = shutil.which("fusermount3")
    assert fusermount and os.stat(fusermount).st_mode & stat.S_ISUID, \
        "fusermount3 is not setuid root (package fuse3)"
    for path in (VENV_PYTHON, ENTRY):
        assert os.access(path, os.X_OK), f"{path} is missing: {INSTALL}"
    require_tool("runuser")
    require_tool("mkfs.erofs")


def ensure_user() -> tuple[int, int]:
    with contextlib.suppress(KeyError):
        pw = pwd.getpwnam(USER)
        return pw.pw_uid, pw.pw_gid
    proc = subprocess.run(["useradd", "--system", "--create-home", "--home-dir", USER_HOME,
                           "--shell", "/bin/sh", USER], capture_output=True, text=True)
    try:  # a concurrent run may have created it meanwhile: only its absence is an error
        pw = pwd.getpwnam(USER)
    except KeyError:
        raise AssertionError(f"cannot create user {USER}: {proc.stderr.strip()}") from None
    return pw.pw_uid, pw.pw_gid


def write(root: Path, rel: str, data: str, owner: tuple[int, int] = (0, 0),
          mode: int = 0o644) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data)
    os.chown(path, *owner)
    path.chmod(mode)
    return path


def make_images(work: Path, stem: str, trees: tuple[Path, ...]) -> list[str]:
    """``work/<stem>K.erofs`` of each tree K, readable by the unprivileged user, bottom first."""
    layers = []
    for k, tree in enumerate(trees):
        out = work / f"{stem}{k}.erofs"
        mkfs_erofs(str(tree), str(out))
        out.chmod(0o644)
        layers.append(str(out))
    return layers


def build_layers(work: Path) -> list[str]:
    """Layer 0: files of several owners; layer 1 replaces one, adds one, whites one out."""
    lower, upper = work / "tree0", work / "tree1"
    write(lower, "etc/hostname", "lower\n")
    write(lower, "etc/secret", "root only\n", mode=0o600)
    write(lower, "srv/www/index.html", "<h1>www</h1>\n", owner=(33, 33))
    os.chown(lower / "srv/www", 33, 33)
    write(lower, "home/app/notes", "app\n", owner=(1000, 1000), mode=0o640)
    write(lower, "opt/far", "far\n", owner=(200000, 200000))
    write(lower, "gone", "deleted above\n")
    x = write(lower, "xattrs", "xattrs\n")
    os.setxattr(x, "user.kind", b"lower")
    os.setxattr(x, "trusted.secret", b"t")  # readable by privileged callers only
    write(upper, "etc/hostname", "upper\n")
    write(upper, ".wh.gone", "")  # an OCI whiteout
    write(upper, "app/new", "#!/bin/sh\necho new\n", mode=0o755)
    return make_images(work, "layer", (lower, upper))


@pytest.fixture(scope="module")
def rootless() -> Iterator[Rootless]:
    require_components()
    uid, gid = ensure_user()
    work = Path(tempfile.mkdtemp(prefix="erofs-rootless-", dir="/var/tmp"))
    try:
        work.chmod(0o755)
        pkg = work / "pkg"
        shutil.copytree(ROOT / "erofs_fuse", pkg / "erofs_fuse",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for dirpath, _, filenames in os.walk(pkg):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
        env = Rootless(uid, gid, work, pkg, build_layers(work))
        proc = env.run(VENV_PYTHON, "-c", "import erofs_fuse; print(erofs_fuse.__file__)")
        assert proc.returncode == 0, f"{USER} cannot import erofs_fuse: {proc.stderr}"
        assert proc.stdout.strip() == str(pkg / "erofs_fuse" / "__init__.py"), proc.stdout
        yield env
    finally:
        shutil.rmtree(work, ignore_errors=True)


def daemons(mnt: str) -> list[int]:
    """Processes whose arguments include ``mnt`` (a mount's daemon)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if os.fsencode(mnt) in f.read().split(b"\0"):
                        pids.append(int(entry))
    return pids


@contextlib.contextmanager
def cleanup(mnt: str) -> Iterator[None]:
    """Whatever happens, nothing stays mounted at ``mnt`` and its daemon is gone."""
    try:
        yield
    finally:
        force_unmount(mnt)
        wait_until(lambda: not daemons(mnt), what="the daemon to exit")


def mountinfo(mnt: str) -> tuple[str, str, str, str]:
    """(mount options, fs type, source, super options) of the mount at ``mnt``."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields = left.split()
            if fields[4] == mnt:
                fstype, source, super_opts = right.split(" ", 2)
                return fields[5], fstype, source, super_opts
    raise AssertionError(f"{mnt} is not mounted")


# an ordinary user mounts, reads and unmounts ---------------------------------------------------
def test_user_mounts_a_two_layer_stack_sees_mapped_ids_and_unmounts(rootless: Rootless) -> None:
    env = rootless
    mnt = env.mountpoint("user-mapped")
    uidmap = f"0:{env.uid}:1:1:100001:65535"  # the stored root is the user; 1.. go to 100001..
    gidmap = f"0:{env.gid}:1:1:100001:65535"
    with cleanup(mnt):
        proc = env.run(ENTRY, "mount", "--layers", ",".join(env.layers), "--uidmap", uidmap,
                       "-o", f"gidmapping={gidmap}", "--log", env.log("mapped.log"), mnt)
        assert proc.returncode == 0, proc.stderr
        opts, fstype, _, super_opts = mountinfo(mnt)
        assert fstype == "fuse.erofs-fuse"
        assert {"ro", "nosuid", "nodev"} <= set(opts.split(","))
        assert f"user_id={env.uid}" in super_opts and "allow_other" not in super_opts
        seen = env.probe(mnt)
        me = {"uid": env.uid, "gid": env.gid}
        assert seen["/"] | me == seen["/"]
        assert seen["/etc/hostname"] == {**me, "mode": 0o644, "data": "upper\n", "xattrs": {}}
        # stored 0:0 mode 0600: readable because the stored root is mapped to this user
        assert seen["/etc/secret"]["data"] == "root only\n"
        assert seen["/etc/secret"] | me == seen["/etc/secret"]
        assert (seen["/srv/www/index.html"]["uid"], seen["/srv/www/index.html"]["gid"]) == \
            (100033, 100033)
        notes = seen["/home/app/notes"]  # 1000:1000 mode 0640: the user is "other" now
        assert (notes["uid"], notes["gid"], notes["read_error"]) == (101000, 101000, "EACCES")
        far = seen["/opt/far"]  # in no range: the overflow id
        assert (far["uid"], far["gid"], far["data"]) == (65534, 65534, "far\n")
        assert seen["/gone"] == {"error": "ENOENT"}
        assert seen["/app/new"]["data"].startswith("#!/bin/sh")
        # the kernel lets only privileged callers read trusted.* xattrs, on any filesystem
        assert seen["user.kind"] == "lower" and seen["trusted.secret"] == "ENODATA"
        # without allow_other a FUSE mount serves its owner only: root too is refused
        with pytest.raises(PermissionError):
            os.stat(os.path.join(mnt, "etc"))
        proc = env.run(ENTRY, "umount", mnt)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mnt)
        wait_until(lambda: not daemons(mnt), what="the user's daemon to exit")


def test_user_mount_without_a_map_shows_the_stored_ids(rootless: Rootless) -> None:
    env = rootless
    mnt = env.mountpoint("user-plain")
    with cleanup(mnt):
        proc = env.run(ENTRY, "mount", "--layers", ",".join(env.layers), mnt)
        assert proc.returncode == 0, proc.stderr
        seen = env.probe(mnt)
        assert (seen["/"]["uid"], seen["/"]["gid"]) == (0, 0)
        assert (seen["/etc/secret"]["uid"], seen["/etc/secret"]["read_error"]) == (0, "EACCES")
        assert (seen["/srv/www/index.html"]["uid"], seen["/srv/www/index.html"]["data"]) == \
            (33, "<h1>www</h1>\n")
        assert seen["/opt/far"]["uid"] == 200000
        proc = env.run(ENTRY, "umount", mnt)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mnt)


def test_user_squash_to_root_and_squash_to_uid(rootless: Rootless) -> None:
    env = rootless
    mnt = env.mountpoint("user-squash")
    with cleanup(mnt):
        proc = env.run(ENTRY, "mount", "--layers", ",".join(env.layers), "-o",
                       f"squash_to_root,squash_to_uid={env.uid}", mnt)
        assert proc.returncode == 0, proc.stderr
        seen = env.probe(mnt)
        for path in ("/", "/srv/www/index.html", "/home/app/notes", "/opt/far"):
            assert (seen[path]["uid"], seen[path]["gid"]) == (env.uid, 0), path
        assert seen["/home/app/notes"]["data"] == "app\n"  # 0640, and now the user owns it
        assert env.run(ENTRY, "umount", mnt).returncode == 0


def test_user_options_that_need_privileges(rootless: Rootless) -> None:
    env = rootless
    mnt = env.mountpoint("user-refused")
    with cleanup(mnt):
        for opt in ("--suid", "--dev"):
            proc = env.run(ENTRY, "mount", "--layers", env.layers[0], opt, mnt)
            assert proc.returncode == 2 and "only root" in proc.stderr, proc.stderr
        proc = env.run(ENTRY, "mount", "--layers", env.layers[0], "--allow-other", mnt)
        with open("/etc/fuse.conf", encoding="utf-8") as f:
            allowed = any(line.strip() == "user_allow_other" for line in f)
        if allowed:
            assert proc.returncode == 0, proc.stderr
            assert "allow_other" in mountinfo(mnt)[3]
            os.stat(os.path.join(mnt, "etc"))  # root may use it now
        else:
            # refused before anything is tried, in one line (fusermount3 would say it on a
            # second line and the mount command would exit 1)
            assert proc.returncode == 2 and "user_allow_other" in proc.stderr, proc.stderr
            assert proc.stderr.startswith("erofs-fuse: ") and proc.stderr.count("\n") == 1
            assert not is_mounted(mnt)


def test_allow_other_only_when_asked(rootless: Rootless) -> None:
    env = rootless
    with fuse_mount(env.layers) as fm:  # root's mount, without allow_other
        assert "allow_other" not in mountinfo(fm.mountpoint)[3]
        assert env.probe(fm.mountpoint)["/etc/hostname"] == {"error": "EACCES"}
    with fuse_mount(env.layers, "--allow-other") as fm:
        assert "allow_other" in mountinfo(fm.mountpoint)[3]
        seen = env.probe(fm.mountpoint)
        assert seen["/etc/hostname"]["data"] == "upper\n"
        assert seen["trusted.secret"] == "ENODATA"  # the user: refused by the kernel
        assert os.getxattr(os.path.join(fm.mountpoint, "xattrs"), "trusted.secret") == b"t"


# extract as an ordinary user -----------------------------------------------------------------
def test_user_extract_skips_device_nodes_and_finishes_the_tree(rootless: Rootless) -> None:
    # issue #15: a user's extract stopped at the first device node ("Operation not permitted",
    # no path) and left the directories made so far at 0700
    env = rootless
    tree = env.work / "devtree"
    for rel, mode in (("a/dev", 0o755), ("a/etc", 0o750), ("z", 0o711)):
        (tree / rel).mkdir(parents=True)
        (tree / rel).chmod(mode)
    os.mknod(tree / "a/dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(tree / "a/dev/sda", 0o660 | stat.S_IFBLK, os.makedev(8, 0))
    os.mkfifo(tree / "a/dev/fifo", 0o644)
    write(tree, "a/etc/hosts", "127.0.0.1 localhost\n")
    write(tree, "z/last", "after the devices\n", mode=0o640)
    (image,) = make_images(env.work, "devtree", (tree,))
    dest = env.work / "extracted"
    dest.mkdir()
    os.chown(dest, env.uid, env.gid)
    proc = env.run(ENTRY, "extract", image, str(dest))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[:2] == [
        "erofs-fuse: warning: a/dev/null: cannot create character device, skipped: "
        "Operation not permitted",
        "erofs-fuse: warning: a/dev/sda: cannot create block device, skipped: "
        "Operation not permitted"], proc.stderr
    assert "2 entries" in lines[-1] and len(lines) == 3, proc.stderr
    assert stat.S_ISFIFO(os.lstat(dest / "a/dev/fifo").st_mode)
    assert (dest / "z/last").read_text() == "after the devices\n"
    modes = {rel: stat.S_IMODE(os.lstat(dest / rel).st_mode)
             for rel in ("a", "a/dev", "a/etc", "z", "z/last")}
    assert modes == {"a": 0o755, "a/dev": 0o755, "a/etc": 0o750, "z": 0o711, "z/last": 0o640}
    assert all(os.lstat(p).st_uid == env.uid for p in dest.rglob("*"))


# mount(8) and fstab ---------------------------------------------------------------------------
def _mount8(*args: str) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH reaches erofs-fuse through mount(8) and mount.fuse3 (root's environment is
    # kept), so the installed entry point runs this checkout
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=60)


def test_mount_t_fuse_erofs_fuse_and_an_fstab_line(rootless: Rootless) -> None:
    env = rootless
    found = shutil.which("erofs-fuse", path=MOUNT_PATH)
    assert found, f"mount.fuse3 finds no erofs-fuse on mount(8)'s PATH {MOUNT_PATH}: {INSTALL}"
    require_tool("mount.fuse3")
    source = ",".join(env.layers)
    mnt = env.mountpoint("mount8")
    with cleanup(mnt):
        proc = _mount8("mount", "-t", "fuse.erofs-fuse", source, mnt)
        assert proc.returncode == 0, proc.stderr
        opts, fstype, shown, _ = mountinfo(mnt)
        assert (fstype, shown) == ("fuse.erofs-fuse", source)
        # mount.fuse3 asks for dev,suid unless told otherwise: the mount stays nosuid,nodev
        assert {"ro", "nosuid", "nodev"} <= set(opts.split(","))
        assert Path(mnt, "etc/hostname").read_text() == "upper\n"
        assert not Path(mnt, "gone").exists()
        proc = _mount8("umount", mnt)
        assert proc.returncode == 0, proc.stderr
        wait_until(lambda: not daemons(mnt), what="the daemon to exit after umount")

        fstab = env.work / "fstab"
        fstab.write_text(f"# an fstab line\n{source} {mnt} fuse.erofs-fuse "
                         "defaults,nofail,x-systemd.automount,uidmapping=0:4242:1,"
                         "gidmapping=0:4343:1:33:5033:1,noexec 0 0\n")
        proc = _mount8("mount", "--fstab", str(fstab), mnt)
        assert proc.returncode == 0, proc.stderr
        opts = mountinfo(mnt)[0]
        assert {"ro", "nosuid", "nodev", "noexec"} <= set(opts.split(","))
        ids = {p: (st.st_uid, st.st_gid) for p in ("etc/secret", "srv/www/index.html", "opt/far")
               for st in [os.lstat(os.path.join(mnt, p))]}
        assert ids == {"etc/secret": (4242, 4343), "srv/www/index.html": (65534, 5033),
                       "opt/far": (65534, 65534)}
        proc = _mount8("umount", mnt)
        assert proc.returncode == 0, proc.stderr
        assert not is_mounted(mnt)


MOUNT_HELPER = "/sbin/mount.fuse.erofs-fuse"


@pytest.mark.parametrize("options, why", [
    ("drop_privileges", "drop_privileges is not supported"),
    ("noexec,bogus_option", "unknown option"),
    ("max_read=4096", "the read size"),
])
def test_mount8_refusals_leave_nothing_mounted(tmp_path: Path, options: str, why: str) -> None:
    # issue #15: through mount.fuse3, -o drop_privileges was refused after mount.fuse3 had
    # mounted (with every capability dropped), leaving a dead mount; mount(8) now runs
    # erofs-fuse as its own helper, which refuses before anything is mounted
    assert os.path.realpath(MOUNT_HELPER) == os.path.realpath(ENTRY), f"{MOUNT_HELPER}: {INSTALL}"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with cleanup(str(mnt)):
        proc = _mount8("mount", "-t", "fuse.erofs-fuse", "-o", options,
                       str(ROOT / "fixtures/corpus/plain.erofs"), str(mnt))
        assert proc.returncode != 0 and why in proc.stderr, proc.stderr
        assert proc.stderr.count("erofs-fuse: ") == 1 and "Traceback" not in proc.stderr
        assert not is_mounted(str(mnt))


def test_mount8_log_option_names_the_log_file(tmp_path: Path) -> None:
    # issue #15: the mount(8)/fstab form had no way to name a log file
    mnt, log = tmp_path / "mnt", tmp_path / "daemon.log"
    mnt.mkdir()
    with cleanup(str(mnt)):
        proc = _mount8("mount", "-t", "fuse.erofs-fuse", "-o", f"log={log}",
                       str(ROOT / "fixtures/corpus/plain.erofs"), str(mnt))
        assert proc.returncode == 0, proc.stderr
        assert _mount8("umount", str(mnt)).returncode == 0
        wait_until(lambda: not daemons(str(mnt)), what="the daemon to exit after umount")
    text = log.read_text()
    assert f"mounted {ROOT}/fixtures/corpus/plain.erofs on {mnt}" in text, text
    assert f"unmounted {mnt}" in text, text


# a rootless sandbox ---------------------------------------------------------------------------
def build_sandbox_layers(work: Path) -> list[str]:
    """A root filesystem of one static busybox (layer 0) and an application layer (layer 1)."""
    assert os.path.exists(BUSYBOX), f"{BUSYBOX} is missing (package busybox-static): {INSTALL}"
    base, app = work / "sbx0", work / "sbx1"
    (base / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, base / "bin/busybox")
    for applet in ("sh", "ls", "cat", "id", "stat", "echo", "touch"):
        (base / "bin" / applet).symlink_to("busybox")
    for d in ("proc", "dev", "tmp", "etc"):
        (base / d).mkdir()
    write(base, "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    write(base, "etc/motd", "from layer 0\n")
    write(app, "etc/motd", "from layer 1\n")
    write(app, "app/run.sh", '#!/bin/sh\necho "run.sh as uid $(id -u): $(cat /etc/motd)"\n',
          mode=0o755)
    write(app, "bin/.wh.ls", "")  # layer 1 deletes ls
    return make_images(work, "sandbox", (base, app))


SANDBOX_SCRIPT = """
echo "uid=$(id -u) gid=$(id -g)"
stat -c 'busybox owner %u:%g' /bin/busybox
/app/run.sh
[ -e /bin/ls ] && echo "ls present" || echo "ls deleted"
touch /new 2>/dev/null && echo "write ok" || echo "write refused"
echo scratch > /tmp/t && cat /tmp/t
"""


def test_rootless_bubblewrap_sandbox_runs_a_program_from_the_merged_tree(
        rootless: Rootless) -> None:
    env = rootless
    bwrap = require_tool("bwrap")
    layers = build_sandbox_layers(env.work)
    mnt = env.mountpoint("sandbox")
    with cleanup(mnt):
        # the stored root is this user: inside the sandbox's user namespace, where this user
        # is root, the files are root's again
        proc = env.run(ENTRY, "mount", "--layers", ",".join(layers), "--uidmap",
                       f"0:{env.uid}:1", "--gidmap", f"0:{env.gid}:1", mnt)
        assert proc.returncode == 0, proc.stderr
        proc = env.run(bwrap, "--unshare-all", "--die-with-parent", "--uid", "0", "--gid", "0",
                       "--ro-bind", mnt, "/", "--proc", "/proc", "--dev", "/dev",
                       "--tmpfs", "/tmp", "--chdir", "/", "--clearenv", "--setenv", "PATH",
                       "/bin", "/bin/sh", "-c", SANDBOX_SCRIPT)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines() == [
            "uid=0 gid=0", "busybox owner 0:0", "run.sh as uid 0: from layer 1", "ls deleted",
            "write refused", "scratch"], proc.stdout + proc.stderr
        start = time.monotonic()
        assert env.run(ENTRY, "umount", mnt).returncode == 0
        assert not is_mounted(mnt) and time.monotonic() - start < 30
