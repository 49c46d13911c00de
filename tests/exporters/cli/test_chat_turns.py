"""`vlm2om chat` survives a bad turn: the error is printed, the conversation goes on."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def _chat(bundle, image, stdin: bytes):
    return subprocess.run([sys.executable, "-m", "vlm2om", "chat", str(bundle), "--image", str(image), "--greedy",
                           "--max-new-tokens", "4"], cwd=ROOT, input=stdin, capture_output=True, timeout=120)


def test_a_turn_too_long_for_the_cache_does_not_end_the_chat(tiny_bundle, sample_image):
    long = ("the " * 400).encode()
    r = _chat(tiny_bundle, sample_image, b"Hi\n" + long + b"\nAnd then?\n/quit\n")
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, err
    assert out.count("assistant> ") == 2 and "Traceback" not in err  # the failed turn has no answer
    assert "largest cache gear" in err and "the conversation goes on" in err
    # The third answer is what a chat without the failed turn gives.
    clean = _chat(tiny_bundle, sample_image, b"Hi\nAnd then?\n/quit\n").stdout.decode()
    assert out.split("assistant> ")[-1] == clean.split("assistant> ")[-1]


def test_bytes_that_are_not_utf8_do_not_end_the_chat(tiny_bundle, sample_image):
    r = _chat(tiny_bundle, sample_image, b"\xff\xfe what is it?\nAnd then?\n/quit\n")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().count("assistant> ") == 2 and b"Traceback" not in r.stderr


def test_a_bundle_path_that_is_a_file_and_an_empty_gear_list_are_named(tmp_path, tiny_bundle, sample_image):
    from tests.helpers import run_cli

    r = run_cli("run", tiny_bundle / "manifest.json", "--image", sample_image, "--prompt", "Hi")
    assert r.returncode == 1 and "is a file, not a bundle folder" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("export", "minigpt4", "--out", tmp_path / "b", "--cache-gears", "")
    assert r.returncode == 2 and "--cache-gears" in r.stderr and "leave the option out" in r.stderr
    assert not (tmp_path / "b").exists()
