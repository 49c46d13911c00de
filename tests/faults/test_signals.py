"""An export killed as a machine or a user kills one: SIGTERM and Ctrl-C after its first graph end
in one line and remove the staging folder; SIGKILL (an out-of-memory kill) cannot be caught, and
the next export to that --out removes what it left; a second export to a locked --out refuses at
once. The previous bundle is byte-identical throughout, and nothing hidden is left beside it."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers import run_cli as cli
from tests.helpers.bundles import copy_bundle
from tests.helpers.faults import Outcome, expect_error, leftovers, snapshot


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
def old(tiny_bundle, tmp_path):
    return copy_bundle(tiny_bundle, tmp_path, "out")


@pytest.mark.parametrize("sig,code,words", [(signal.SIGTERM, 1, "stopped by SIGTERM"),
                                            (signal.SIGINT, 130, "interrupted (Ctrl-C)")], ids=["sigterm", "sigint"])
def test_signal_after_the_first_graph_cleans_up(old, tmp_path, sig, code, words):
    before = snapshot(old)
    proc = start_export(old, tmp_path / "log.txt")
    wait_for_first_graph(proc, old)
    proc.send_signal(sig)
    outcome = Outcome(proc.wait(timeout=60), (tmp_path / "log.txt").read_text())
    expect_error(outcome, f"Error: export to '{old.resolve()}' {words}; its staging folder was removed and the "
                          "bundle there before is unchanged", code=code)
    assert leftovers(tmp_path) == [] and snapshot(old) == before


def test_sigkill_after_the_first_graph_then_the_next_export_cleans_up(old, tmp_path):
    before = snapshot(old)
    proc = start_export(old, tmp_path / "log.txt")
    staging = wait_for_first_graph(proc, old)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert snapshot(old) == before and staging.is_dir()  # what an OOM kill leaves
    r = cli("export", "minigpt4", "--preset", "tiny", "--out", old)
    assert r.returncode == 0, r.stderr
    assert f"removed {staging.name}, the staging folder" in r.stdout and f"process {proc.pid} is gone" in r.stdout
    assert leftovers(tmp_path) == []  # no staging folder, no lock file
    assert snapshot(old) != before


def test_sigterm_before_the_staging_folder_leaves_nothing(tmp_path):
    """Killed while torch imports: no staging folder exists yet, so there is nothing to clean."""
    out = tmp_path / "new"
    proc = start_export(out, tmp_path / "log.txt")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) in (1, -signal.SIGTERM)
    assert "Traceback" not in (tmp_path / "log.txt").read_text()
    assert not out.exists() and leftovers(tmp_path) == []


def test_second_export_to_a_locked_out_refuses_naming_the_pid(old, tmp_path):
    before = snapshot(old)
    fd = os.open(old.parent / f".{old.name}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        r = cli("export", "minigpt4", "--preset", "tiny", "--out", old)
    finally:
        os.close(fd)
        (old.parent / f".{old.name}.lock").unlink()
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == [f"Error: another export to '{old.resolve()}' is running (process {os.getpid()} "
                     f"holds .out.lock); wait for it to finish or choose another --out"]
    assert snapshot(old) == before and leftovers(tmp_path) == []
