"""The staging folder on its own: stale folders of dead exports, the lock, SIGTERM's unwinding and
a write that fails. The CLI killed for real (SIGKILL, SIGTERM, SIGINT, a second export) is in
tests/faults/test_signals.py."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vlm2om.exporters.core.staging import staging_dir
from vlm2om.runtime.errors import InputError, Vlm2omError


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    """The PID of a process that has just exited (and been reaped)."""
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def hold_lock(out: Path, pid: int):
    """The lock an export to ``out`` by ``pid`` would hold (the caller closes the fd to release)."""
    fd = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{pid}\n".encode())
    return fd


# --- staging_dir on its own (fast) ---

def test_success_swaps_in_and_leaves_nothing_beside(tmp_path):
    out = tmp_path / "b"
    with staging_dir(out, echo=lambda s: None) as tmp:
        assert tmp.name == f".b.partial-{os.getpid()}" and hidden(tmp_path) == [".b.lock", tmp.name]
        (tmp / "manifest.json").write_text("{}")
    assert hidden(tmp_path) == [] and (out / "manifest.json").read_text() == "{}"


def test_stale_folders_of_dead_processes_are_removed_and_logged(tmp_path):
    out, gone, alive = tmp_path / "b", dead_pid(), os.getppid()
    out.mkdir()
    (out / "manifest.json").write_text("old")
    for name in (f".b.partial-{gone}", f".b.old-{gone}", f".b.partial-{alive}", f".other.partial-{gone}",
                 ".b.partial-99999999999999999999"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.onnx").write_text("")
    log = []
    with staging_dir(out, echo=log.append) as tmp:
        (tmp / "manifest.json").write_text("new")
    assert hidden(tmp_path) == sorted([f".b.partial-{alive}", f".other.partial-{gone}",
                                       ".b.partial-99999999999999999999"])  # never a live one
    assert len(log) == 2 and all(f"process {gone} is gone" in line for line in log)
    assert f".b.partial-{gone}, the staging folder" in log[0] + log[1]


def test_a_leftover_of_this_process_is_stale_under_the_lock(tmp_path):
    (tmp_path / f".b.partial-{os.getpid()}").mkdir()
    log = []
    with staging_dir(tmp_path / "b", echo=log.append) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "manifest.json").write_text("{}")
    assert hidden(tmp_path) == [] and "(an earlier export in this process)" in log[0]


def test_dead_export_between_its_renames_gets_its_old_bundle_back(tmp_path):
    out, gone = tmp_path / "b", dead_pid()
    (tmp_path / f".b.old-{gone}").mkdir()
    (tmp_path / f".b.old-{gone}" / "manifest.json").write_text("previous")
    log = []
    with pytest.raises(RuntimeError):
        with staging_dir(out, echo=log.append):
            raise RuntimeError("the new export fails too")
    assert (out / "manifest.json").read_text() == "previous" and hidden(tmp_path) == []
    assert "restored the previous bundle" in log[0]


def test_a_held_lock_refuses_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "b"
    fd = hold_lock(out, 4242)
    try:
        with pytest.raises(InputError, match=rf"another export to '{out}' is running \(process 4242 holds"):
            with staging_dir(out, echo=lambda s: None):
                pytest.fail("entered while locked")
        assert not out.exists() and hidden(tmp_path) == [".b.lock"]  # the holder's staging untouched
    finally:
        os.close(fd)
    with staging_dir(out, echo=lambda s: None) as tmp:  # released: it works
        (tmp / "manifest.json").write_text("{}")
    assert hidden(tmp_path) == []


def test_an_unlocked_leftover_lock_is_taken_and_made_parents_go_on_failure(tmp_path):
    (tmp_path / "a").mkdir()
    fd = hold_lock(tmp_path / "a" / "b", 1)
    os.close(fd)  # an unlocked leftover of a killed export is simply taken
    with staging_dir(tmp_path / "a" / "b", echo=lambda s: None) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert hidden(tmp_path / "a") == []
    with pytest.raises(RuntimeError):
        with staging_dir(tmp_path / "new" / "deep" / "b", echo=lambda s: None):
            raise RuntimeError
    assert not (tmp_path / "new").exists()


def test_sigterm_unwinds_cleans_up_and_restores_the_handler(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Vlm2omError, match=rf"export to '{out}' stopped by SIGTERM"):
        with staging_dir(out, echo=lambda s: None) as tmp:
            (tmp / "manifest.json").write_text("new")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises long before this ends
            pytest.fail("SIGTERM did not interrupt")
    assert signal.getsignal(signal.SIGTERM) is before
    assert (out / "manifest.json").read_text() == "old" and hidden(tmp_path) == []


def test_sigterm_during_the_swap_waits_for_the_new_bundle(tmp_path, monkeypatch):
    from vlm2om.exporters.core import staging

    out, got, swap = tmp_path / "b", [], staging._swap
    out.mkdir()
    (out / "manifest.json").write_text("old")

    def swap_while_terminated(tmp, dst):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs here, and only records it
        swap(tmp, dst)

    monkeypatch.setattr(staging, "_swap", swap_while_terminated)
    previous = signal.signal(signal.SIGTERM, lambda *a: got.append(len(hidden(tmp_path))))
    try:
        with staging_dir(out, echo=lambda s: None) as tmp:
            (tmp / "manifest.json").write_text("new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (out / "manifest.json").read_text() == "new" and got == [0]  # delivered after the unlock


def test_outside_the_main_thread_no_handler_is_installed(tmp_path):
    seen = []

    def export():
        with staging_dir(tmp_path / "b", echo=lambda s: None) as tmp:
            seen.append(signal.getsignal(signal.SIGTERM))
            (tmp / "manifest.json").write_text("{}")

    t = threading.Thread(target=export)
    t.start()
    t.join()
    assert seen == [signal.getsignal(signal.SIGTERM)] and (tmp_path / "b" / "manifest.json").is_file()


# --- a write that fails, Ctrl-C ---

def test_a_failed_write_is_one_line_naming_the_file(tmp_path):
    import errno

    from vlm2om.exporters.core.staging import writing

    out = tmp_path / "b"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    with pytest.raises(Vlm2omError) as err:
        with staging_dir(out, echo=lambda s: None) as tmp:
            with writing("embed.onnx"):
                (tmp / "embed.onnx").write_text("half")
                raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert str(err.value) == (f"disk quota exceeded while writing embed.onnx to the staging folder of '{out}'; the "
                              "staging folder was removed and the bundle there before is unchanged")
    assert (out / "manifest.json").read_text() == "old" and hidden(tmp_path) == []


def test_an_unlabelled_os_error_names_its_file(tmp_path):
    import errno

    elsewhere, out = tmp_path / "scratch" / "x.log", tmp_path / "b"
    with pytest.raises(Vlm2omError, match=rf"no space left on device on '{elsewhere}' while exporting to '{out}'; "
                                          "the staging folder was removed and nothing was written"):
        with staging_dir(tmp_path / "b", echo=lambda s: None):
            raise OSError(errno.ENOSPC, "No space left on device", str(elsewhere))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_is_still_a_keyboard_interrupt_with_its_line(tmp_path):
    from vlm2om.exporters.core.staging import ExportInterrupted

    with pytest.raises(ExportInterrupted, match=rf"export to '{tmp_path / 'b'}' interrupted \(Ctrl-C\); its staging "
                                                "folder was removed and nothing was written") as err:
        with staging_dir(tmp_path / "b", echo=lambda s: None):
            raise KeyboardInterrupt
    assert isinstance(err.value, KeyboardInterrupt) and hidden(tmp_path) == []
