"""The runtime imports and runs with torch made unimportable (a deploy box has none)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BLOCKER = '''
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "onnxsim"):
            raise ImportError(f"{name} is blocked: a deploy box has no torch")
sys.meta_path.insert(0, _NoTorch())
'''

PROBE = '''
import sys
from vlm2om.runtime import GenerationConfig, open_bundle
pipe = open_bundle(sys.argv[1])
print(pipe.generate(sys.argv[2], "What is in the image?", GenerationConfig(max_new_tokens=8)))
assert not any(m.split(".")[0] == "torch" for m in sys.modules), "torch was imported"
print("NO-TORCH-OK")
'''


def _env(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    return env


def test_blocker_really_blocks(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import torch"], env=_env(tmp_path), capture_output=True, text=True)
    assert r.returncode != 0 and "blocked" in r.stderr


def test_runtime_api_without_torch(tmp_path, tiny_bundle, sample_image):
    r = subprocess.run([sys.executable, "-c", PROBE, str(tiny_bundle), str(sample_image)],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "NO-TORCH-OK" in r.stdout


def test_cli_run_and_chat_without_torch(tmp_path, tiny_bundle, sample_image):
    base = [sys.executable, "-m", "vlm2om"]
    r = subprocess.run([*base, "run", str(tiny_bundle), "--image", str(sample_image), "--prompt", "Hi",
                        "--max-new-tokens", "6", "--stats"], env=_env(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ms/token" in r.stderr
    r = subprocess.run([*base, "chat", str(tiny_bundle), "--image", str(sample_image), "--greedy",
                        "--max-new-tokens", "4"], input="What is it?\nAnd then?\n/quit\n",
                       env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2


def test_golden_verify_and_bench_without_torch(tmp_path, tiny_batch_bundle):
    """The Ascend box checks its graphs against the stored golden outputs and measures them."""
    base = [sys.executable, "-m", "vlm2om"]
    r = subprocess.run([*base, "verify", str(tiny_batch_bundle), "--golden", "--out", str(tmp_path / "rep")],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # Every graph, then the stored end-to-end case through the runtime's whole pipeline.
    assert "PASS: 12 subgraph outputs, 1 end-to-end case" in r.stdout
    assert (tmp_path / "rep" / "verify_minigpt4_e2e.csv").is_file()
    r = subprocess.run([*base, "bench", str(tiny_batch_bundle), "--batch", "1,2", "--input-lengths", "125",
                        "--output-lengths", "4", "--out", str(tmp_path / "rep")],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rep" / "2_batch_performance_minigpt4.csv").is_file()
