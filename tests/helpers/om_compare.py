"""One check every family's recipe test makes: its tiny bundle, compiled by the fake ATC and run
through the ais_bench stand-in, gives the tokens onnxruntime gives over a multi-turn chat."""
from __future__ import annotations

import shutil
from pathlib import Path

from tests.helpers import ais_bench_standin as standin
from tests.helpers.fake_cann import install_fake_cann
from vlm2om.exporters.ascend.compile import CompileOptions, compile_bundle
from vlm2om.runtime import open_bundle


def om_and_ort_answers(bundle: Path, tmp_path: Path, monkeypatch, image, questions, config):
    """({backend: [tokens per turn]}, {graph: the ais_bench mode of its first run}, the stand-in's sessions)."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    install_fake_cann(tmp_path / "Ascend", monkeypatch)
    compile_bundle(copy, CompileOptions(), echo=lambda s: None)
    standin.install(monkeypatch)
    answers = {}
    for backend in ("ort", "om"):
        pipe = open_bundle(copy, backend=backend)
        chat = pipe.chat(image)
        for question in questions:
            "".join(chat.ask(question, config))
            answers.setdefault(backend, []).append(chat.last.tokens)
        pipe.close()
    sessions = [s for s in standin.SESSIONS if s.calls]
    modes = {Path(s.model_path).name.split("_linux")[0]: s.calls[0]["mode"] for s in sessions}
    return answers, modes, sessions
