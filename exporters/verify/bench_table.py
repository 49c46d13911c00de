"""The bench's printed table and its CSV files, with the torch baseline beside each figure.

Files: ``{batch}_batch_performance_{model}.csv`` per batch size, the seeds' name and columns;
with a baseline also ``{batch}_batch_performance_{model}_torch.csv`` with the same columns.
Ratios are vlm2om / torch for every figure (times: below 1 is faster; tokens/s: above 1).
No torch here: the report runs on the Ascend box too.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlm2om.runtime.bench import COLUMNS, BenchRow, csv_name
from vlm2om.runtime.tables import cell, format_table, write_csv

# Figures shown in the printed table (the CSV has every column).
SHOWN = ["Batch", "InputLength", "OutputLength", "TokensPerSecond", "ResponseTime(ms)", "FirstTokenTime(ms)",
         "TimePerTokens(ms)", "ImageTime(ms)", "PeakMemory(MB)"]
NO_RATIO = {"Batch", "InputLength", "OutputLength"}


@dataclass(frozen=True)
class BaselineRow:
    row: BenchRow
    agreed: int  # leading greedy tokens torch and the bundle share, summed over the batch's sequences


def _by_name(row: BenchRow) -> dict:
    return dict(zip(COLUMNS, row.values()))


def table_rows(rows: list[BenchRow], base: list[BaselineRow] | None) -> tuple[list[str], list[list]]:
    """The printed table: each figure, and with a baseline 'torch figure' and 'ratio' after it."""
    if not base:
        return SHOWN, [[_by_name(r)[c] for c in SHOWN] for r in rows]
    heads = []
    for c in SHOWN:
        heads += [c] if c in NO_RATIO else [c, "torch", "ratio"]
    heads.append("agree")
    out = []
    for r, b in zip(rows, base):
        mine, theirs = _by_name(r), _by_name(b.row)
        line = []
        for c in SHOWN:
            line += [mine[c]] if c in NO_RATIO else [mine[c], theirs[c], f"{mine[c] / theirs[c]:.2f}x"]
        line.append(f"{b.agreed}/{r.output_length * r.batch}")
        out.append(line)
    return heads, out


def print_and_write(rows: list[BenchRow], base: list[BaselineRow] | None, model: str, out_dir: Path,
                    backend: str, echo: Callable[[str], None] = print) -> list[Path]:
    heads, table = table_rows(rows, base)
    echo(f"\nvlm2om ({backend})" + (" vs transformers/PyTorch (ratio = vlm2om / torch)" if base else ""))
    echo(format_table(heads, table))
    written = []
    for batch in sorted({r.batch for r in rows}):
        mine = [r for r in rows if r.batch == batch]
        written.append(write_csv(Path(out_dir) / csv_name(batch, model), COLUMNS, [r.values() for r in mine]))
        if base:
            theirs = [b.row for r, b in zip(rows, base) if r.batch == batch]
            written.append(write_csv(Path(out_dir) / csv_name(batch, model, "_torch"), COLUMNS,
                                     [r.values() for r in theirs]))
    if base:
        echo(_summary(rows, base))
    echo("written: " + ", ".join(str(p) for p in written))
    return written


def _summary(rows: list[BenchRow], base: list[BaselineRow]) -> str:
    per_token = [r.ms_per_token / b.row.ms_per_token for r, b in zip(rows, base)]
    first = [r.first_token_ms / b.row.first_token_ms for r, b in zip(rows, base)]
    agree = sum(b.agreed for b in base), sum(r.output_length * r.batch for r in rows)
    return (f"time per token vlm2om/torch: {cell(min(per_token))}x .. {cell(max(per_token))}x; "
            f"first token: {cell(min(first))}x .. {cell(max(first))}x; greedy tokens equal to torch's: "
            f"{agree[0]}/{agree[1]}")
