"""The VQA answer table in the seed's ``answer2label.txt`` (JSON lines, as its patch to
``write_vqa.py`` writes them) and as one JSON object; every label once, in range."""
from __future__ import annotations

import json

import pytest

from vlm2om.exporters.core.checkpoints import CheckpointError
from vlm2om.exporters.families.vlmo.answers import read_answer_table

ANSWERS = {"net": 0, "pitcher": 1, "orange": 2, "yes": 3, "white": 4}


def _lines(path, table):
    with open(path, "w", encoding="utf-8") as w:  # as the seed writes it
        for ans in table:
            w.write("%s\n" % json.dumps({"answer": ans, "label": table[ans]}))


def test_json_lines_and_json_object(tmp_path):
    _lines(tmp_path / "answer2label.txt", ANSWERS)
    assert read_answer_table(tmp_path / "answer2label.txt", 5) == ["net", "pitcher", "orange", "yes", "white"]
    (tmp_path / "a.json").write_text(json.dumps({"yes": 1, "no": 0}))
    assert read_answer_table(tmp_path / "a.json", 2) == ["no", "yes"]
    (tmp_path / "one.txt").write_text(json.dumps({"answer": "yes", "label": 0}) + "\n")
    assert read_answer_table(tmp_path / "one.txt", 1) == ["yes"]


@pytest.mark.parametrize("table, labels, message", [
    ({"a": 0, "b": 0}, 2, "label 0 is given twice"),
    ({"a": 0, "b": 5}, 2, "label 5 is outside the VQA head's 2 answers"),
    ({"a": 0}, 3, "1 answers for the VQA head's 3 labels (no answer for label 1 and more)"),
    ({"a": "0"}, 1, "expected a string answer and an integer label"),
])
def test_bad_tables_are_named(tmp_path, table, labels, message):
    _lines(tmp_path / "answer2label.txt", table)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_answer_table(tmp_path / "answer2label.txt", labels)


def test_a_broken_line_is_named_by_its_number(tmp_path):
    (tmp_path / "t.txt").write_text(json.dumps({"answer": "a", "label": 0}) + "\n{oops\n")
    with pytest.raises(CheckpointError, match=r"t.txt:2: not a JSON object"):
        read_answer_table(tmp_path / "t.txt", 1)
