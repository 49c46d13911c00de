"""A FAKE CANN toolkit for tests on machines without one: an ``atc`` script and a version file.

The fake ``atc`` checks the flags vlm2om must pass (``--framework=5``, a model path that
resolves from the working directory, ``--input_format=ND`` with ``--dynamic_dims``, an
existing ``--keep_dtype`` file, an existing output folder), logs its argv and working
directory, and writes ``<output>_linux_x86_64.om`` the way ATC adds an OS/arch suffix. That
"OM" is JSON naming the ONNX graph and the compiled shapes, which the ais_bench stand-in
(``helpers/ais_bench_standin.py``) loads. ``FAKE_ATC_FAIL=<graph>`` makes it fail like ATC does.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

FAKE_ATC = r'''#!{python}
"""Fake ATC for vlm2om tests (not Huawei's)."""
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
log = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.jsonl")
with open(log, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\n")
print("ATC start working now, please wait for a moment.")
def fail(msg):
    print("ATC run failed, Please check the detail log, Try 'atc --help' for more information")
    print(msg)
    sys.exit(1)
if args.get("framework") != "5":
    fail("E10001: Value [%s] for parameter [--framework] is invalid." % args.get("framework"))
if not os.path.isfile(args.get("model", "")):
    fail("E10001: Value [%s] for parameter [--model] is invalid. Reason: the file does not exist." % args.get("model"))
if "dynamic_dims" in args and args.get("input_format") != "ND":
    fail("E10001: --dynamic_dims requires --input_format=ND.")
if "keep_dtype" in args and not os.path.isfile(args["keep_dtype"]):
    fail("E10001: Value [%s] for parameter [--keep_dtype] is invalid." % args["keep_dtype"])
name = os.path.basename(args["output"])
if os.environ.get("FAKE_ATC_FAIL") == name:
    fail("E19010: [PID: 4242] No parser is registered for Op [/fake/Op, optype [ai.onnx::13::FakeOp]].")
if not os.path.isdir(os.path.dirname(args["output"]) or "."):
    fail("E10001: the output folder does not exist.")
om = args["output"] + "_linux_x86_64.om"
model = os.path.relpath(os.path.abspath(args["model"]), os.path.dirname(os.path.abspath(om)))
with open(om, "w") as f:
    json.dump({{"fake_om": 1, "model": model, "input_shape": args["input_shape"],
               "dynamic_dims": args.get("dynamic_dims"), "soc_version": args["soc_version"],
               "precision_mode": args.get("precision_mode")}}, f)
print("ATC run success, welcome to the next use.")
'''


@dataclass
class FakeCann:
    home: Path  # the toolkit's "latest" folder
    bin: Path

    def calls(self) -> list[dict]:
        log = self.bin / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []

    def set_version(self, version: str) -> None:
        (self.home / "compiler" / "version.info").write_text(f"Version={version}\nversion_dir=x\n")


def install_fake_cann(root: Path, monkeypatch, version: str = "7.0.0") -> FakeCann:
    """Lay out ``root/latest/compiler/{bin/atc,version.info}`` and put the bin on PATH."""
    home = root / "latest"
    bin_dir = home / "compiler" / "bin"
    bin_dir.mkdir(parents=True)
    atc = bin_dir / "atc"
    atc.write_text(FAKE_ATC.format(python=sys.executable))
    atc.chmod(0o755)
    cann = FakeCann(home, bin_dir)
    cann.set_version(version)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    monkeypatch.delenv("FAKE_ATC_FAIL", raising=False)
    return cann
