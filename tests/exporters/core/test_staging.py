"""Interrupted and concurrent exports: SIGKILL, SIGTERM and a second export to the same ``--out``
never damage the bundle that was there, and no staging folder outlives the next export."""
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

from tests.helpers import ROOT
from tests.helpers import run_cli as cli
from tests.helpers.bundles import copy_bundle
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


# --- the CLI, killed for real ---

def start_export(out: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "vlm2om", "export", "minigpt4", "--preset", "tiny",
                                 "--out", str(out)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def wait_for_first_graph(proc: subprocess.Popen, out: Path, timeout: float = 120) -> Path:
    """The staging folder, once it holds its first .onnx file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p.parent for p in out.parent.glob(f".{out.name}.partial-*/*.onnx")]
        if found:
            return found[0]
        assert proc.poll() is None, "the export ended before writing a graph"
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no staging folder with a graph appeared")


@pytest.fixture
def old_bundle(tiny_bundle, tmp_path):
    return copy_bundle(tiny_bundle, tmp_path, "out")


def test_sigkill_after_the_first_graph_keeps_the_old_bundle(old_bundle, tmp_path):
    before = snapshot(old_bundle)
    proc = start_export(old_bundle, tmp_path / "log.txt")
    staging = wait_for_first_graph(proc, old_bundle)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert snapshot(old_bundle) == before and staging.is_dir()  # what an OOM kill leaves
    r = cli("export", "minigpt4", "--preset", "tiny", "--out", old_bundle)
    assert r.returncode == 0, r.stderr
    assert f"removed {staging.name}, the staging folder" in r.stdout and f"process {proc.pid} is gone" in r.stdout
    assert hidden(tmp_path) == []  # no staging folder, no lock file
    assert snapshot(old_bundle) != before


def test_sigterm_after_the_first_graph_cleans_up(old_bundle, tmp_path):
    before = snapshot(old_bundle)
    proc = start_export(old_bundle, tmp_path / "log.txt")
    wait_for_first_graph(proc, old_bundle)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 1
    log = (tmp_path / "log.txt").read_text()
    assert "stopped by SIGTERM" in log and "Traceback" not in log
    assert hidden(tmp_path) == [] and snapshot(old_bundle) == before


def test_second_export_to_a_locked_out_refuses_naming_the_pid(old_bundle, tmp_path):
    before = snapshot(old_bundle)
    fd = hold_lock(old_bundle, os.getpid())
    try:
        r = cli("export", "minigpt4", "--preset", "tiny", "--out", old_bundle)
    finally:
        os.close(fd)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"Error: another export to '{old_bundle.resolve()}' is running (process {os.getpid()} "
                     f"holds .out.lock); wait for it to finish or choose another --out"]
    assert snapshot(old_bundle) == before
