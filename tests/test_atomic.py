"""core.atomic: temporaries never survive a failed write, never collide, stale ones are swept."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from patchbank.core import atomic
from patchbank.core.atomic import (
    AtomicFile,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    cleanup_temporaries,
    hostname,
    install_signal_cleanup,
    is_stale,
    live_temporaries,
    sweep_stale_temporaries,
    temp_name,
    uninstall_signal_cleanup,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_temp_name_format_and_uniqueness(tmp_path: Path) -> None:
    target = tmp_path / "metrics.v2.json"
    names = {temp_name(target) for _ in range(1000)}
    assert len(names) == 1000
    tmp = next(iter(names))
    assert tmp.parent == tmp_path
    m = atomic._TEMP_RE.match(tmp.name)
    assert m and m["name"] == "metrics.v2.json" and m["host"] == hostname()
    assert int(m["pid"]) == os.getpid() and tmp.name.startswith(".metrics.v2.json.")
    assert "." not in hostname() and hostname()


def test_writes_land_complete_and_leave_nothing(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.txt"  # folders are created
    assert atomic_write_text(target, "héllo\n") == target
    assert target.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    with atomic_path(tmp_path / "t.csv") as tmp:
        assert tmp.name.endswith(".tmp") and tmp.parent == tmp_path
        tmp.write_text("x,y\n")
        assert tmp in live_temporaries()
    assert (tmp_path / "t.csv").read_text() == "x,y\n" and tmp not in live_temporaries()
    with atomic_open(tmp_path / "m.npz") as f:  # a file object: numpy adds no suffix
        np.savez(f, maps=np.arange(3.0))
    with np.load(tmp_path / "m.npz") as npz:
        np.testing.assert_array_equal(npz["maps"], [0.0, 1.0, 2.0])
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "sub") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz", "sub", "t.csv"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "r.txt", "r"):
            pass


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_mid_write_removes_the_temporary(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(type(error)):
        with atomic_open(target, "w") as f:
            f.write("half of the new")
            f.flush()
            assert len(leftovers(tmp_path)) == 1
            raise error
    assert target.read_text() == "old"  # the previous file is untouched
    assert leftovers(tmp_path) == [] and live_temporaries() == []


class FullDisk:
    """A file whose write (or close: the final flush) fails with ENOSPC after some bytes."""

    def __init__(self, path: Path, mode: str, fail_on: str) -> None:
        self.f = open(path, mode)  # noqa: SIM115
        self.fail_on = fail_on

    def write(self, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        if self.fail_on == "write":
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)

    def close(self) -> None:
        self.f.close()
        if self.fail_on == "close":
            raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.mark.parametrize("fail_on", ["write", "close"])
def test_enospc_leaves_no_temporary_and_propagates(tmp_path: Path, fail_on: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "maps.npz"
    target.write_bytes(b"previous")
    monkeypatch.setattr(atomic, "open", lambda p, mode, **kw: FullDisk(p, mode, fail_on),
                        raising=False)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"x" * 10_000)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"previous"
    assert leftovers(tmp_path) == [] and live_temporaries() == []


def test_failed_rename_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "folder_in_the_way"
    (target / "child").mkdir(parents=True)  # os.replace(file, non-empty dir) fails
    with pytest.raises(OSError):
        atomic_write_text(target, "x")
    assert leftovers(tmp_path) == [] and live_temporaries() == []


def test_last_rename_wins(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    with AtomicFile(target) as a, AtomicFile(target) as b:
        assert a.tmp != b.tmp
        a.tmp.write_text("A" * 1000)
        b.tmp.write_text("B" * 1000)
        b.commit()
        assert target.read_text() == "B" * 1000
        a.commit()
    assert target.read_text() == "A" * 1000
    assert leftovers(tmp_path) == []


def test_threads_writing_one_target_never_collide(tmp_path: Path) -> None:
    target = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 300_000 for i in range(8)]
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(15):
                atomic_write_bytes(target, data)
                seen.append(target.read_bytes())
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # every read saw one writer's complete content, never a mix or a truncated file
    assert len(seen) == 8 * 15 and all(s in payloads for s in seen)
    assert target.read_bytes() in payloads
    assert leftovers(tmp_path) == []


def test_processes_writing_one_target_never_collide(tmp_path: Path) -> None:
    target = tmp_path / "shared.txt"
    code = (
        "import sys\n"
        "from patchbank.core.atomic import atomic_write_text\n"
        "line = sys.argv[2] * 100_000\n"
        "for _ in range(40):\n"
        "    atomic_write_text(sys.argv[1], line)\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), c], env=env)
             for c in "abcd"]
    reads = []
    while any(p.poll() is None for p in procs):
        if target.exists():
            reads.append(target.read_text())
    assert [p.wait() for p in procs] == [0, 0, 0, 0]
    reads.append(target.read_text())
    assert all(r in {c * 100_000 for c in "abcd"} for r in reads)
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- sweeping


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def make(folder: Path, name: str, age_s: float = 0.0) -> Path:
    path = folder / name
    path.write_bytes(b"partial")
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def test_sweep_keeps_live_same_host_temporaries_and_removes_dead_ones(tmp_path: Path) -> None:
    host = hostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = make(tmp_path, f".a.csv.{host}.{os.getpid()}.0a1b2c3d.tmp", age_s=10 * 86400)
        live = make(tmp_path, f".a.csv.{host}.{sleeper.pid}.0a1b2c3d.tmp", age_s=10 * 86400)
        dead = make(tmp_path, f".a.csv.{host}.{dead_pid()}.0a1b2c3d.tmp")  # fresh, yet dead
        huge = make(tmp_path, f".a.csv.{host}.99999999999999.00ff.tmp")  # no such pid
        other_new = make(tmp_path, ".a.csv.otherhost.1.0a1b2c3d.tmp", age_s=3600)
        other_old = make(tmp_path, ".b.csv.otherhost.1.0a1b2c3d.tmp", age_s=2 * 86400)
        odd_new = make(tmp_path, ".weird.tmp")
        odd_old = make(tmp_path, ".weird-old.tmp", age_s=2 * 86400)
        legacy_old = make(tmp_path, ".train-64px.4242.npy", age_s=2 * 86400)
        legacy_new = make(tmp_path, ".train-64px.4243.npy")
        data = make(tmp_path, "a.csv", age_s=30 * 86400)
        hidden = make(tmp_path, ".hidden", age_s=30 * 86400)

        removed = sweep_stale_temporaries(tmp_path, extra_patterns=[".train-64px.*.npy"])
        assert sorted(p.name for p in removed) == sorted(
            p.name for p in (dead, huge, other_old, odd_old, legacy_old))
        for p in removed:
            assert not p.exists()
        for p in (mine, live, other_new, odd_new, legacy_new, data, hidden):
            assert p.exists(), p.name
        # a shorter max age takes the other host's hour-old temporary too, never a live one
        again = sweep_stale_temporaries(tmp_path, max_age_s=60)
        assert [p.name for p in again] == [other_new.name]
        assert mine.exists() and live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sweep_stale_temporaries(tmp_path / "missing") == []


def test_is_stale_by_age_only_for_other_hosts(tmp_path: Path) -> None:
    # a pid that is alive *here* says nothing about another host: only age counts
    p = make(tmp_path, f".x.otherhost.{os.getpid()}.00.tmp", age_s=100)
    assert not is_stale(p, max_age_s=1000) and is_stale(p, max_age_s=10)
    q = make(tmp_path, f".x.{hostname()}.{dead_pid()}.00.tmp", age_s=0)
    assert is_stale(q, max_age_s=1e9)


# --------------------------------------------------------------------------- exit and signals


def test_registry_cleanup_removes_unfinished_temporaries(tmp_path: Path) -> None:
    f = AtomicFile(tmp_path / "x.bin")
    f.tmp.write_bytes(b"partial")
    assert live_temporaries() == [f.tmp]
    assert cleanup_temporaries() == [f.tmp]
    assert not f.tmp.exists() and live_temporaries() == []
    f.discard()  # still safe


def run_child(code: str, tmp_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                            env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.PIPE,
                            text=True)


def test_atexit_removes_temporaries_of_an_exiting_process(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from patchbank.core.atomic import AtomicFile\n"
        "f = AtomicFile(Path(sys.argv[1]) / 'out.bin')\n"
        "f.tmp.write_bytes(b'partial')\n"
        "print(f.tmp.exists(), flush=True)\n"
        "sys.exit(3)\n"
    )
    p = run_child(code, tmp_path)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 3 and out.strip() == "True"
    assert list(tmp_path.iterdir()) == []


def test_sigterm_removes_temporaries_when_cleanup_is_installed(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from patchbank.core.atomic import AtomicFile, atomic_open, install_signal_cleanup\n"
        "install_signal_cleanup()\n"
        "held = AtomicFile(Path(sys.argv[1]) / 'held.bin')  # no with-block: registry only\n"
        "held.tmp.write_bytes(b'partial')\n"
        "with atomic_open(Path(sys.argv[1]) / 'out.bin') as f:\n"
        "    f.write(b'partial'); f.flush()\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
    )
    p = run_child(code, tmp_path)
    assert p.stdout.readline().strip() == "ready"
    assert len(leftovers(tmp_path)) == 2
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_install_signal_cleanup_is_idempotent_and_reversible() -> None:
    before = signal.getsignal(signal.SIGTERM)
    try:
        install_signal_cleanup()
        install_signal_cleanup()
        assert signal.getsignal(signal.SIGTERM) is atomic._on_signal
        assert atomic._previous_handlers[signal.SIGTERM] == before
    finally:
        uninstall_signal_cleanup()
    assert signal.getsignal(signal.SIGTERM) == before


def test_file_lock_serialises_processes(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from patchbank.core.atomic import file_lock\n"
        "log = Path(sys.argv[1]) / 'log.txt'\n"
        "for _ in range(5):\n"
        "    with file_lock(Path(sys.argv[1]) / '.lock'):\n"
        "        with open(log, 'a') as f: f.write('<')\n"
        "        time.sleep(0.02)\n"
        "        with open(log, 'a') as f: f.write('>')\n"
    )
    procs = [run_child(code, tmp_path) for _ in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    assert (tmp_path / "log.txt").read_text() == "<>" * 15  # never two holders at once
