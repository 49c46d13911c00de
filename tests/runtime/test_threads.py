"""onnxruntime's thread policy: the first session of a process fixes it (onnxruntime refuses to
mix a shared pool with pools of their own), and every later session follows it."""
from __future__ import annotations

import subprocess
import sys

PROBE = '''
import sys
from vlm2om.runtime.backends.ort import _POOL, session_options
first = session_options(threads=2, spin=sys.argv[1] == "spin")
later = session_options(threads=1, spin=sys.argv[1] != "spin")
print(sorted(_POOL), first.use_per_session_threads, later.use_per_session_threads, later.intra_op_num_threads)
'''


def _probe(mode: str) -> str:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_first_session_spins_every_session_shares_its_pool():
    assert _probe("spin") == "['shared'] False False 0"


def test_first_session_without_spin_keeps_pools_of_their_own():
    assert _probe("no-spin") == "['own'] True True 1"


def test_cli_runs_with_and_without_spinning(tmp_path, tiny_bundle, sample_image):
    from tests.helpers import run_cli

    outs = []
    for flag in ("--spin", "--no-spin"):
        r = run_cli("run", tiny_bundle, "--image", sample_image, "--prompt", "Hi", "--greedy",
                    "--max-new-tokens", "6", flag)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1]
