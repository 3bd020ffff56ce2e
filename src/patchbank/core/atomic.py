"""Atomic file writes: a temporary beside the target, renamed into place only when complete.

Every file patchbank publishes goes through one of these:

- :func:`atomic_path` — a context manager yielding the temporary :class:`~pathlib.Path` (for
  writers that take a path: ``DataFrame.to_csv``, ``Path.write_text``, ``np.lib.format.
  open_memmap``); on normal exit it is renamed over the target with :func:`os.replace`;
- :func:`atomic_open` — the same, yielding an open file (for ``np.savez``, ``fig.savefig``:
  numpy appends ``.npz``/``.npy`` to a *path* that lacks the suffix, never to a file object);
- :func:`atomic_write_text`, :func:`atomic_write_bytes` — one call;
- :class:`AtomicFile` — the object behind them, for writers whose temporary lives longer than one
  ``with`` block (e.g. a cache filled batch by batch and committed with other files).

The temporary is ``.<name>.<host>.<pid>.<random>.tmp`` in the target's folder (same file system,
so the rename is atomic; unique per host, process and writer, so concurrent writers to one target
never share a temporary and the last rename wins with complete content). It is removed on any
exception, including ``KeyboardInterrupt`` and ``OSError(ENOSPC)`` (which propagates), in a
``finally``. Temporaries still alive are also kept in a per-process registry that an ``atexit``
hook cleans and that :func:`install_signal_cleanup` cleans on SIGTERM (turned into ``SystemExit``
so ``finally`` blocks run). What a killed process (SIGKILL, power loss) leaves behind is removed
by :func:`sweep_stale_temporaries`: same host → when the writing process is gone; another host or
an unparsable name → only when older than ``max_age_s`` (a pid means nothing on another host).

This module imports nothing else of patchbank.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

#: Temporaries of other hosts (or with unparsable names) are removed after this many seconds.
DEFAULT_MAX_AGE_S = 24 * 3600.0

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.(?P<rand>[0-9a-f]+)\.tmp$")

_live: dict[Path, int] = {}  # temporary -> pid of the process that made it
_live_lock = threading.Lock()
_previous_handlers: dict[int, Any] = {}
_installed_by: int | None = None


def hostname() -> str:
    """This host's name as used in temporary names: no dots, only ``[A-Za-z0-9_-]``."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())
    return name or "unknown-host"


def temp_name(target: Path | str) -> Path:
    """A fresh temporary name beside ``target``: ``.<name>.<host>.<pid>.<random>.tmp``."""
    target = Path(target)
    return target.with_name(
        f".{target.name}.{hostname()}.{os.getpid()}.{os.urandom(6).hex()}.tmp")


def _register(tmp: Path) -> None:
    with _live_lock:
        _live[tmp] = os.getpid()


def _unregister(tmp: Path) -> None:
    with _live_lock:
        _live.pop(tmp, None)


def name_error(err: OSError, target: Path | str, tmp: Path | str | None = None) -> OSError:
    """Make ``err`` name ``target``: writers (``f.write``, ``np.savez``, ``to_csv``) raise
    ``OSError(ENOSPC)`` without a file name, or with the temporary's; the user needs the file
    patchbank was publishing. Returns ``err`` (changed in place, traceback kept)."""
    if err.filename is None or (tmp is not None and str(err.filename) == str(tmp)):
        err.filename = str(target)
        err.filename2 = None
    return err


def preallocate(f: IO[Any], nbytes: int, target: Path | str) -> None:
    """Reserve ``nbytes`` for the open file ``f`` (``posix_fallocate``), so a full disk shows
    as ``OSError(ENOSPC)`` naming ``target`` before any data is computed, never later as a
    ``SIGBUS`` or a half-written file. File systems without the call are left alone."""
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(f.fileno(), 0, int(nbytes))
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise name_error(err, target) from None
        # EOPNOTSUPP, EINVAL, ENOSYS, ...: no reservation, writes report ENOSPC themselves


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def live_temporaries() -> list[Path]:
    """Temporaries this process has created and neither committed nor discarded yet."""
    pid = os.getpid()
    with _live_lock:
        return [p for p, owner in _live.items() if owner == pid]


def cleanup_temporaries() -> list[Path]:
    """Remove every live temporary of this process (atexit and SIGTERM); returns them."""
    removed = live_temporaries()
    for tmp in removed:
        _unlink_quietly(tmp)
        _unregister(tmp)
    return removed


atexit.register(cleanup_temporaries)


class AtomicFile:
    """One temporary beside ``target``: :meth:`commit` renames it into place, :meth:`discard`
    removes it. Used as a context manager it is discarded unless committed inside the block.

    The temporary itself is not created; the caller writes to :attr:`tmp`.
    """

    def __init__(self, target: Path | str, *, mkdir: bool = True) -> None:
        self.target = Path(target)
        if mkdir:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_name(self.target)
        self.done = False
        _register(self.tmp)

    def commit(self) -> Path:
        """Rename the temporary over the target (atomic on one file system); returns the target.

        On failure the temporary is removed and the OSError propagates.
        """
        if self.done:
            raise RuntimeError(f"{self.target}: temporary already committed or discarded")
        try:
            os.replace(self.tmp, self.target)
        except OSError as err:
            self.discard()
            name_error(err, self.target, self.tmp)
            raise
        except BaseException:
            self.discard()
            raise
        self.done = True
        _unregister(self.tmp)
        return self.target

    def discard(self) -> None:
        """Remove the temporary (safe to call twice, and after commit: then a no-op)."""
        if not self.done:
            _unlink_quietly(self.tmp)
            self.done = True
        _unregister(self.tmp)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


@contextlib.contextmanager
def atomic_path(target: Path | str, *, mkdir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it into place when the block ends
    normally, remove it when the block raises (anything, KeyboardInterrupt included)."""
    f = AtomicFile(target, mkdir=mkdir)
    try:
        yield f.tmp
        f.commit()
    except OSError as err:
        name_error(err, f.target, f.tmp)
        raise
    finally:
        f.discard()


@contextlib.contextmanager
def atomic_open(target: Path | str, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Like :func:`atomic_path`, yielding the temporary opened with ``open(tmp, mode, ...)``.

    The file is closed (flushed) before the rename, so a failing flush removes it too.
    """
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open writes a new file; mode {mode!r} must contain 'w' or 'x'")
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def atomic_write_bytes(target: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically; returns ``target``."""
    with atomic_open(target, "wb") as f:
        f.write(data)
    return Path(target)


def atomic_write_text(target: Path | str, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``target`` atomically; returns ``target``."""
    with atomic_open(target, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return Path(target)


# --------------------------------------------------------------------------- stale temporaries


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def is_stale(path: Path, max_age_s: float = DEFAULT_MAX_AGE_S, now: float | None = None) -> bool:
    """Whether the temporary ``path`` was left by a writer that is gone.

    Written on this host: when its process no longer exists (this process's own temporaries are
    never stale). Written on another host, or a name this module did not make: when its last
    modification is older than ``max_age_s``.
    """
    m = _TEMP_RE.match(path.name)
    if m and m["host"] == hostname():
        pid = int(m["pid"])
        return pid != os.getpid() and not pid_alive(pid)
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return False
    return (time.time() if now is None else now) - mtime > max_age_s


def sweep_stale_temporaries(folder: Path | str, max_age_s: float = DEFAULT_MAX_AGE_S,
                            extra_patterns: Iterable[str] = ()) -> list[Path]:
    """Remove temporaries in ``folder`` left by dead writers (see :func:`is_stale`).

    Temporaries are the files named ``.*.tmp``; ``extra_patterns`` (globs) adds names of older
    writers, judged by age only. Returns what was removed; a missing folder is empty.
    """
    folder = Path(folder)
    candidates: set[Path] = set()
    try:
        candidates.update(folder.glob(".*.tmp"))
        legacy = {p for pattern in extra_patterns for p in folder.glob(pattern)}
    except OSError:
        return []
    removed = []
    now = time.time()
    for path in sorted(candidates | legacy):
        if path.is_symlink() or not path.is_file():
            continue
        stale = is_stale(path, max_age_s, now) if path in candidates else \
            _older_than(path, max_age_s, now)
        if stale:
            _unlink_quietly(path)
            removed.append(path)
    return removed


def _older_than(path: Path, max_age_s: float, now: float) -> bool:
    try:
        return now - path.stat().st_mtime > max_age_s
    except OSError:
        return False


# --------------------------------------------------------------------------- signals, locks


def _on_signal(signum: int, frame: Any) -> None:
    previous = _previous_handlers.get(signum)
    cleanup_temporaries()  # only this process's own: a forked child never removes its parent's
    if callable(previous):
        previous(signum, frame)
    elif os.getpid() == _installed_by:
        raise SystemExit(128 + signum)
    else:  # a forked child (e.g. a DataLoader worker): die of the signal as it did before
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def install_signal_cleanup(signals: Iterable[int] = (signal.SIGTERM,)) -> bool:
    """On SIGTERM remove this process's live temporaries, then exit with ``SystemExit(143)`` (so
    ``finally`` blocks and atexit hooks run) or call the handler installed before.

    Call from the main thread (a Python rule for signal handlers; elsewhere ValueError).
    Idempotent; a signal whose disposition is "ignore" is left alone. Returns whether a handler
    was installed by this call (so the caller knows to :func:`uninstall_signal_cleanup`).
    """
    global _installed_by
    installed = False
    for signum in signals:
        current = signal.getsignal(signum)
        if current is _on_signal or current == signal.SIG_IGN:
            continue
        signal.signal(signum, _on_signal)
        _previous_handlers[signum] = current
        installed = True
    _installed_by = os.getpid()
    return installed


def uninstall_signal_cleanup() -> None:
    """Restore the handlers :func:`install_signal_cleanup` replaced."""
    for signum, previous in list(_previous_handlers.items()):
        if signal.getsignal(signum) is _on_signal:
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        del _previous_handlers[signum]


@contextlib.contextmanager
def file_lock(path: Path | str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``path`` (created if needed) for the block.

    Serialises processes that write the same output (a bank, a score run, the derived tables):
    the second waits for the first. ``on_wait`` is called once when the lock is busy, before
    waiting (e.g. to log that another run holds it). The kernel releases the lock when its
    holder dies, even by SIGKILL. Where the file system does not support locks the block runs
    unlocked. The lock file stays (removing it while held would break the lock).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
