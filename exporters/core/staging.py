"""Where an export writes before its bundle is in place, and what keeps two exports apart.

An export writes into a hidden ``.NAME.partial-PID`` folder beside ``--out`` and swaps it in
only when everything passed, so the bundle that was there before survives any failure.
Three things make that hold outside the happy path:

- SIGTERM unwinds like SIGINT (Ctrl-C), so the staging folder is removed on the way out;
  one that arrives during the final swap waits the microseconds until the new bundle is whole.
  Either ends in one line saying so (``ExportInterrupted`` carries Ctrl-C's).
- SIGKILL (an out-of-memory kill is one) cannot be caught: its staging folder stays until the
  next export to the same ``--out`` finds that the PID in the name is dead and removes it.
- An exclusive ``flock`` on ``.NAME.lock`` beside ``--out``: a second export to the same folder
  refuses at once, naming the PID that holds it, rather than interleaving or waiting forever.
- A write that fails (a full disk, a quota, an I/O error) is one line naming the file being
  written (``writing`` labels each step) once the staging folder is gone, not an OSError from
  deep inside onnx or numpy.

The lock file is removed when the export ends. Unlinking a lock file is only safe because
:func:`_lock` checks, once it holds the lock, that the path still names the file it locked;
without that check a process that opened the old file just before the unlink could hold a
lock nobody else sees. A SIGKILLed export leaves its lock file behind; it is unlocked (the
kernel drops a dead process's locks) and the next export simply takes it.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vlm2om.runtime.bundle import MANIFEST
from vlm2om.runtime.errors import InputError, Vlm2omError

from vlm2om.exporters.core.preflight import os_reason


class ExportTerminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler. A KeyboardInterrupt, so it unwinds through every
    ``except Exception`` in torch, onnx and our own code exactly as Ctrl-C would."""


class ExportInterrupted(KeyboardInterrupt):
    """Ctrl-C during an export, after its cleanup: still a KeyboardInterrupt for Python callers,
    with the one line the CLI prints (what was removed, what was kept)."""


class WriteFailed(Exception):
    """An OSError while ``writing(what)``: staging_dir reports it with ``what`` named."""

    def __init__(self, what: str, err: OSError):
        super().__init__(f"{what}: {err}")
        self.what, self.err = what, err


@contextmanager
def writing(what: str) -> Iterator[None]:
    """Label the writes of the block (``vision.onnx``, ``manifest.json``) for the error a failed
    write becomes."""
    try:
        yield
    except OSError as e:
        raise WriteFailed(what, e) from e


@contextmanager
def staging_dir(out: Path, echo: Callable[[str], None] = print) -> Iterator[Path]:
    """Yield an empty folder beside ``out``; on success swap it in, on failure remove it.

    Holds ``out``'s lock throughout, removes the staging folders of dead exports first (saying
    so through ``echo``) and turns SIGTERM into a clean, one-line failure."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"output '{out}' exists and is not a directory")
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    lock_path = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock(lock_path, out)
    except OSError as e:
        _remove_created(created)
        raise InputError(f"cannot write the bundle to '{out}': {e.strerror or e}") from None
    except BaseException:
        _remove_created(created)
        raise
    done, term, had_bundle = False, _Sigterm(), out.is_dir()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        with _sigterm_raises(term):
            _clear_stale(out, echo)
            if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
                raise InputError(f"output '{out}' is a non-empty folder that is not a bundle; "
                                 "refusing to replace it")
            had_bundle = out.is_dir()
            try:
                try:
                    tmp.mkdir()
                except OSError as e:
                    raise InputError(f"cannot write the bundle to '{out}': {e.strerror or e}") from None
                yield tmp
                term.hold = True  # committed: a SIGTERM from here on waits for the swap
                with writing(_SWAP):
                    _swap(tmp, out)
            except BaseException:
                term.fired = True  # a SIGTERM now must not cut the cleanup short
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        done = True
    except ExportTerminated:
        kept = "the bundle there before is unchanged" if had_bundle else "nothing was written"
        raise Vlm2omError(f"export to '{out}' stopped by SIGTERM; its staging folder was removed "
                          f"and {kept}") from None
    except KeyboardInterrupt:
        kept = "the bundle there before is unchanged" if had_bundle else "nothing was written"
        raise ExportInterrupted(f"export to '{out}' interrupted (Ctrl-C); its staging folder was removed "
                                f"and {kept}") from None
    except (OSError, WriteFailed) as e:
        raise _write_error(e, out, tmp, had_bundle) from None
    finally:
        _unlock(lock_path, fd)
        if not done:
            _remove_created(created)
        if term.pending:  # arrived during the swap: the new bundle is whole, now terminate
            signal.raise_signal(signal.SIGTERM)


_SWAP = "the swap"  # the label of the final renames


def _write_error(e: OSError | WriteFailed, out: Path, tmp: Path, had_bundle: bool) -> Vlm2omError:
    """One line: what went wrong, on which file, and what is left (the staging folder is gone)."""
    what, err = (e.what, e.err) if isinstance(e, WriteFailed) else (None, e)
    where = Path(err.filename).resolve() if isinstance(err.filename, (str, os.PathLike)) else None
    if what == _SWAP:
        doing = f"while moving the new bundle into place at '{out}'"
    elif where is not None and where != tmp and tmp not in where.parents:  # not ours: name the file itself
        doing = f"on '{where}' while exporting to '{out}'"
    else:
        what = what or (where.name if where is not None else "the bundle")
        doing = f"while writing {what} to the staging folder of '{out}'"
    kept = "the bundle there before is unchanged" if had_bundle else "nothing was written"
    left = f"the staging folder could not be removed: remove {tmp} by hand; {kept}" if tmp.exists() else \
        f"the staging folder was removed and {kept}"
    return Vlm2omError(f"{os_reason(err)} {doing}; {left}")


def _swap(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out``; the previous bundle is back at ``out`` if anything fails between."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _lock(path: Path, out: Path) -> int:
    """An fd holding an exclusive flock on ``path``, with this PID written in it; InputError
    naming the holder's PID if another export has it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise InputError(f"another export to '{out}' is running ({who} holds {path.name}); "
                             "wait for it to finish or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:  # the holder before us removed it as we opened it
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # we locked a file that is no longer at ``path``: take the new one


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _unlock(path: Path, fd: int) -> None:
    try:
        os.unlink(path)  # while still locked: see the module docstring
    except OSError:
        pass
    os.close(fd)


def _clear_stale(out: Path, echo: Callable[[str], None]) -> None:
    """Remove the staging and swap folders of exports to ``out`` whose process is dead.

    Called with the lock held, so a folder with this process's own PID is stale too (an
    earlier export in this process whose cleanup failed). A dead export caught between its
    two renames left the previous bundle at ``.NAME.old-PID`` and nothing at ``out``: that
    bundle is put back rather than removed."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)")
    stale = []
    for p in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and _dead(int(m.group(2))):
            stale.append((m.group(1), p))
    for kind, p in stale:
        if kind == "old" and not out.exists() and (p / MANIFEST).is_file():
            p.rename(out)
            echo(f"restored the previous bundle to {out} from {p.name}, left by an export that did not finish")
    for kind, p in stale:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
            pid = int(p.name.rsplit("-", 1)[1])
            whose = "an earlier export in this process" if pid == os.getpid() else f"process {pid} is gone"
            echo(f"removed {p.name}, the {'staging' if kind == 'partial' else 'swap'} folder of an "
                 f"export to {out} that did not finish ({whose})")


def _dead(pid: int) -> bool:
    if pid == os.getpid():
        return True  # we hold the lock: no export of ours is using it
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # PermissionError: alive, someone else's; not a PID at all
        return False
    return False


@dataclass
class _Sigterm:
    fired: bool = False  # raised, or cleaning up: later SIGTERMs are ignored
    hold: bool = False  # set while the swap runs: a SIGTERM then is only recorded ...
    pending: bool = False  # ... and delivered once the new bundle is in place


@contextmanager
def _sigterm_raises(term: _Sigterm) -> Iterator[None]:
    """SIGTERM raises ExportTerminated while the block runs (main thread only: Python allows
    handlers nowhere else); the previous handler is restored after. A SIGTERM the process
    ignores stays ignored."""
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if previous is None or previous is signal.SIG_IGN:
        yield
        return

    def handler(signum, frame):
        if term.fired:
            return
        if term.hold:
            term.pending = True
            return
        term.fired = True
        raise ExportTerminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _remove_created(created: list[Path]) -> None:
    for p in created:  # folders this export made, innermost first
        try:
            p.rmdir()
        except OSError:
            break
