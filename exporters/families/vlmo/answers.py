"""VLMo's VQA answer table: label -> answer text, shipped in the bundle so the runtime can print
answers. The seed writes it from VLMo's ``write_vqa.py`` as ``answer2label.txt``, one JSON object a
line, ``{"answer": "yes", "label": 3}``; a JSON object ``{answer: label}`` is read too. The labels
must be exactly 0 .. N-1, N the VQA head's rows (3129 for VQAv2), each once."""
from __future__ import annotations

import json
from pathlib import Path

from vlm2om.exporters.core.checkpoints import CheckpointError


def read_answer_table(path: str | Path, labels: int) -> list[str]:
    """The answers in label order; CheckpointError naming the file and line for anything else."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read the answer table ({err})") from None
    pairs = _pairs(path, text)
    by_label: dict[int, str] = {}
    for where, answer, label in pairs:
        if not isinstance(answer, str) or isinstance(label, bool) or not isinstance(label, int):
            raise CheckpointError(f"{path}{where}: expected a string answer and an integer label, got "
                                  f"{answer!r} -> {label!r}")
        if not 0 <= label < labels:
            raise CheckpointError(f"{path}{where}: label {label} is outside the VQA head's {labels} answers")
        if label in by_label:
            raise CheckpointError(f"{path}{where}: label {label} is given twice ('{by_label[label]}', '{answer}')")
        by_label[label] = answer
    if len(by_label) != labels:
        missing = sorted(set(range(labels)) - set(by_label))
        raise CheckpointError(f"{path}: {len(by_label)} answers for the VQA head's {labels} labels "
                              f"(no answer for label {missing[0]}{' and more' if len(missing) > 1 else ''})")
    return [by_label[i] for i in range(labels)]


def _pairs(path: Path, text: str) -> list[tuple[str, object, object]]:
    """(where, answer, label) from one JSON object {answer: label}, else JSON lines."""
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict) and set(whole) != {"answer", "label"}:
        return [(f" ['{k}']", k, v) for k, v in whole.items()]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise CheckpointError(f"{path}:{n}: not a JSON object ({err})") from None
        if not isinstance(row, dict) or set(row) != {"answer", "label"}:
            raise CheckpointError(f"{path}:{n}: expected {{\"answer\": ..., \"label\": ...}}, got {line.strip()[:80]}")
        out.append((f":{n}", row["answer"], row["label"]))
    return out
