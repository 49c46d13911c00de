"""The runtime imports and runs with torch made unimportable (a deploy box has none)."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import run_cli
from tests.helpers.no_torch import no_torch_env

PROBE = '''
import sys
from vlm2om.runtime import GenerationConfig, open_bundle
pipe = open_bundle(sys.argv[1])
print(pipe.generate(sys.argv[2], "What is in the image?", GenerationConfig(max_new_tokens=8)))
assert not any(m.split(".")[0] == "torch" for m in sys.modules), "torch was imported"
print("NO-TORCH-OK")
'''


def test_blocker_really_blocks(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import torch"], env=no_torch_env(tmp_path), capture_output=True,
                       text=True)
    assert r.returncode != 0 and "blocked" in r.stderr


def test_runtime_api_without_torch(tmp_path, tiny_bundle, sample_image):
    r = subprocess.run([sys.executable, "-c", PROBE, str(tiny_bundle), str(sample_image)],
                       env=no_torch_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "NO-TORCH-OK" in r.stdout


def test_cli_run_and_chat_without_torch(tmp_path, tiny_bundle, sample_image):
    env = no_torch_env(tmp_path)
    r = run_cli("run", tiny_bundle, "--image", sample_image, "--prompt", "Hi", "--max-new-tokens", "6", "--stats",
                env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ms/token" in r.stderr
    r = run_cli("chat", tiny_bundle, "--image", sample_image, "--greedy", "--max-new-tokens", "4",
                input="What is it?\nAnd then?\n/quit\n", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2


def test_golden_verify_and_bench_without_torch(tmp_path, tiny_batch_bundle):
    """The Ascend box checks its graphs against the stored golden outputs and measures them."""
    env = no_torch_env(tmp_path)
    r = run_cli("verify", tiny_batch_bundle, "--golden", "--out", tmp_path / "rep", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    # Every graph, then the stored end-to-end case through the runtime's whole pipeline.
    assert "PASS: 12 subgraph outputs, 1 end-to-end case" in r.stdout
    assert (tmp_path / "rep" / "verify_minigpt4_e2e.csv").is_file()
    r = run_cli("bench", tiny_batch_bundle, "--batch", "1,2", "--input-lengths", "125", "--output-lengths", "4",
                "--out", tmp_path / "rep", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rep" / "2_batch_performance_minigpt4.csv").is_file()
