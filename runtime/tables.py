"""Tables, CSV and JSON for the precision and performance reports (no torch, no pandas).

The same rows go to the terminal and to files, so what a user reads is what a script parses.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .errors import InputError


def cell(value, digits: int = 2) -> str:
    """A number as a table shows it: fixed digits for ordinary sizes, scientific for tiny ones."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "static"
    if isinstance(value, bool) or value is None:
        return "" if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 10 ** -digits or abs(value) >= 1e7):
            return f"{value:.3e}"
        return f"{value:.{digits}f}"
    return str(value)


def format_table(headers: list[str], rows: list[list], digits: int = 2) -> str:
    """A Markdown-style table (the seeds' READMEs publish theirs that way)."""
    text = [[cell(v, digits) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in text)]) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in text)])


def _ensure_dir(folder: Path) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the report folder '{folder}': {e.strerror or e}") from None
    return folder


def write_csv(path: Path, headers: list[str], rows: list[list]) -> Path:
    path = _ensure_dir(Path(path).parent) / Path(path).name
    try:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(headers)
            w.writerows([[_plain(v) for v in row] for row in rows])
    except OSError as e:
        raise InputError(f"cannot write '{path}': {e.strerror or e}") from None
    return path


def write_json(path: Path, payload: dict) -> Path:
    path = _ensure_dir(Path(path).parent) / Path(path).name
    try:
        path.write_text(json.dumps(payload, indent=1, default=_plain))
    except OSError as e:
        raise InputError(f"cannot write '{path}': {e.strerror or e}") from None
    return path


def _plain(v):
    """numpy scalars and floats as plain CSV/JSON values (round-trip exact for floats)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, dict):
        return ";".join(f"{k}={x}" for k, x in v.items()) or "static"
    return v
