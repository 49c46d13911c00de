"""The user's path through the CLI for a family's tiny preset, as ``make export MODEL=...`` starts
it: export, one answer with ``run``, two turns of ``chat``, ``verify --reference``, ``bench``."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from tests.helpers import ROOT, run_cli


def export_run_chat_verify_bench(family: str, tmp_path: Path, image, question: str, follow_up: str,
                                 run_args: tuple = (), bench_input: int = 64) -> Path:
    """Each step must succeed; returns the bundle folder. ``bench_input``: the bench prompt's
    positions, template and image included."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / family
    r = run_cli("export", family, "--preset", "tiny", "--out", out, env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli("run", out, "--image", image, "--prompt", question, "--max-new-tokens", "8", "--stats", *run_args,
                env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    r = run_cli("chat", out, "--image", image, "--greedy", "--max-new-tokens", "6",
                input=f"{question}\n{follow_up}\n/quit\n", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2
    r = run_cli("verify", out, "--reference", "--out", tmp_path / "rep", env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout
    r = run_cli("bench", out, "--out", tmp_path / "bench", "--batch", "1", "--input-lengths", str(bench_input),
                "--output-lengths", "16", env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(tmp_path / "bench" / f"1_batch_performance_{family}.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and {"Batch", "TokensPerSecond", "ResponseTime(ms)", "FirstTokenTime(ms)",
                     "TimePerTokens(ms)"} <= set(rows[0]) and float(rows[0]["TokensPerSecond"]) > 0
    return out
