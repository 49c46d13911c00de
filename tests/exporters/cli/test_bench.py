"""`vlm2om bench`: the seeds' CSV columns, one file per batch, sizes that cannot run named."""
from __future__ import annotations

import csv

import pytest
from click.testing import CliRunner

from vlm2om.exporters.cli.main import main
from vlm2om.runtime.bench import SEED_COLUMNS


def test_bench_writes_the_seeds_csv(tiny_batch_bundle, tmp_path):
    r = CliRunner().invoke(main, ["bench", str(tiny_batch_bundle), "--batch", "1,2,8", "--input-lengths", "40,125",
                                  "--output-lengths", "6", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "input 40 < the shortest prompt" in r.output and "batch 8 > the largest batch gear 4" in r.output
    for batch in (1, 2):
        with open(tmp_path / f"{batch}_batch_performance_minigpt4.csv") as f:
            header, *rows = list(csv.reader(f))
        assert header[:len(SEED_COLUMNS)] == SEED_COLUMNS  # Batch, TokensPerSecond, ResponseTime(ms), ...
        assert "ImageTime(ms)" in header and "PeakMemory(MB)" in header
        (row,) = [dict(zip(header, map(float, x))) for x in rows]
        assert row["Batch"] == batch and row["InputLength"] == 125 and row["OutputLength"] == 6
        assert row["ResponseTime(ms)"] == pytest.approx(row["FirstTokenTime(ms)"] + 5 * row["TimePerTokens(ms)"])
        assert row["TokensPerSecond"] == pytest.approx(6000 / row["ResponseTime(ms)"])
        assert row["ImageTime(ms)"] > 0 and row["PeakMemory(MB)"] > 10
    assert not (tmp_path / "8_batch_performance_minigpt4.csv").exists()
