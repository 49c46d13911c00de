"""The performance report of the seeds' deployments, measured on a bundle (no torch).

A grid of batch sizes x (input, output) lengths; per cell the seeds' figures: tokens per
second, response time, first-token time, time per token, plus image encoding time and peak
resident memory. Definitions (the seeds' READMEs): ResponseTime = FirstTokenTime +
(OutputLength - 1) x TimePerTokens; TokensPerSecond = OutputLength / ResponseTime, per
sequence (so it falls as the batch grows, as in the seeds' tables); TotalTokensPerSecond =
Batch x TokensPerSecond. Image encoding is timed apart (ImageTime, all the batch's images),
as the seeds time "picture process" apart. InputLength counts every prompt position the
decoder sees, image tokens included.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .batch import BatchGenerator
from .generation import GenerationConfig

SEED_COLUMNS = ["Batch", "TokensPerSecond", "ResponseTime(ms)", "FirstTokenTime(ms)", "TimePerTokens(ms)"]
COLUMNS = [*SEED_COLUMNS, "InputLength", "OutputLength", "ImageTime(ms)", "PeakMemory(MB)",
           "TotalTokensPerSecond"]
DEFAULT_LENGTHS = (32, 64, 128, 256, 512, 1024)
FILLER = "the"  # pads a question to an exact prompt length (one token per word in Llama's vocab)


@dataclass(frozen=True)
class BenchRow:
    batch: int
    input_length: int
    output_length: int
    first_token_ms: float
    ms_per_token: float
    image_ms: float
    peak_mb: float

    @property
    def response_ms(self) -> float:
        return self.first_token_ms + (self.output_length - 1) * self.ms_per_token

    @property
    def tokens_per_s(self) -> float:
        return 1000 * self.output_length / self.response_ms

    def values(self) -> list:
        return [self.batch, self.tokens_per_s, self.response_ms, self.first_token_ms, self.ms_per_token,
                self.input_length, self.output_length, self.image_ms, self.peak_mb,
                self.batch * self.tokens_per_s]


@dataclass
class BenchCase:
    """What the baseline needs to run the very same cell: the bundle's prompt embeddings."""

    batch: int
    input_length: int
    output_length: int
    prompts: list[np.ndarray]
    image: object
    tokens: list[list[int]] = field(default_factory=list)  # the bundle's, for the agreement check


@dataclass(frozen=True)
class BenchOptions:
    batches: tuple[int, ...] = (1, 2, 4, 8)
    input_lengths: tuple[int, ...] = DEFAULT_LENGTHS
    output_lengths: tuple[int, ...] = DEFAULT_LENGTHS
    repeats: int = 1
    question: str = "Describe this image in detail."

    def pairs(self) -> list[tuple[int, int]]:
        """(input, output) pairs: zipped, a single value on either side broadcast."""
        ins, outs = list(self.input_lengths), list(self.output_lengths)
        if len(ins) == 1:
            ins = ins * len(outs)
        if len(outs) == 1:
            outs = outs * len(ins)
        if len(ins) != len(outs):
            raise ValueError(f"{len(ins)} input lengths but {len(outs)} output lengths: give as many of "
                             "each, or one of either")
        return list(zip(ins, outs))


class PeakMemory:
    """Peak resident memory of this process over a block. Linux lets the peak be reset
    (``clear_refs``), so each cell gets its own; elsewhere it is the process's peak so far."""

    def __init__(self):
        self.resettable = Path("/proc/self/clear_refs").exists()

    def reset(self) -> None:
        if self.resettable:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.resettable = False

    def peak_mb(self) -> float:
        if self.resettable:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def sample_image(size: int = 448):
    """A deterministic synthetic photo-like image, so the bench needs no file."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], -1)
    noise = np.random.default_rng(0).normal(0, 0.05, rgb.shape)
    return Image.fromarray((np.clip(rgb + noise, 0, 1) * 255).astype(np.uint8))


class BundleBench:
    """Measures grid cells on a pipeline (any backend)."""

    def __init__(self, pipe, options: BenchOptions, image=None):
        self.pipe, self.opts = pipe, options
        self.gen = BatchGenerator(pipe)
        self.image = image if image is not None else sample_image()
        self.memory = PeakMemory()
        self.has_image = bool(pipe.bundle.pipeline.get("image_graphs"))
        self.images = [pipe.encode_image(self.image)] if self.has_image else []
        self.shortest = self._length(0)

    def _question(self, words: int) -> str:
        return " ".join([self.opts.question, *[FILLER] * words]) if words else self.opts.question

    def _length(self, words: int) -> int:
        return self.gen.layout(self._question(words), self.images).length

    def question_for(self, length: int) -> str | None:
        """The question whose prompt is exactly ``length`` positions (None if none is)."""
        lo, hi = 0, max(1, length)
        while lo < hi:  # smallest filler count reaching the length
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if self._length(mid) < length else (lo, mid)
        return self._question(lo) if self._length(lo) == length else None

    def skip_reason(self, batch: int, n_in: int, n_out: int) -> str | None:
        cache = self.pipe.decoder.kv["capacity_gears"]
        if batch > self.gen.batches[-1]:
            return f"batch {batch} > the largest batch gear {self.gen.batches[-1]} (export with --batch-gears)"
        if n_in < self.shortest:
            return f"input {n_in} < the shortest prompt ({self.shortest} positions with the template and image)"
        if n_in + n_out - 1 > max(cache):
            return f"input {n_in} + output {n_out} exceed the largest cache gear {max(cache)}"
        return None

    def warm_up(self, batch: int, n_in: int | None = None) -> None:
        """Untimed runs, because the first call of a shape allocates its buffers: with
        ``n_in``, the cell's prompt for two tokens; without, one decode step per cache gear."""
        if n_in is not None:
            prompt = self.gen.prompt(self._embeds(), self.question_for(n_in))
            self.gen.generate([prompt] * batch, _greedy(2))
            return
        for capacity in self.pipe.decoder.kv["capacity_gears"]:
            cache = self.pipe.decoder.new_cache(self.gen.gear_for(batch))
            cache.reserve(capacity)
            self.pipe.decoder.step(cache, [0] * batch, [0] * batch)

    def _embeds(self):
        return self.pipe.encode_image(self.image) if self.has_image else None

    def measure(self, batch: int, n_in: int, n_out: int) -> tuple[BenchRow, BenchCase]:
        question = self.question_for(n_in)
        if question is None:
            raise ValueError(f"no question gives a prompt of exactly {n_in} positions")
        runs = []
        for _ in range(max(1, self.opts.repeats)):
            self.memory.reset()
            t0 = time.perf_counter()
            embeds = [self._embeds() for _ in range(batch)]
            image_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            prompts = [self.gen.prompt(e, question) for e in embeds]
            prompt_s = time.perf_counter() - t1
            res = self.gen.generate(prompts, _greedy(n_out))
            res.ttft_s += prompt_s  # tokenizing and embedding the prompt count toward the first token
            runs.append((res, image_s, self.memory.peak_mb()))
        res = runs[-1][0]
        assert all(len(s.tokens) == n_out for s in res.sequences) and len(prompts[0]) == n_in
        row = BenchRow(batch, n_in, n_out,
                       first_token_ms=1000 * statistics.median(r.ttft_s for r, _, _ in runs),
                       ms_per_token=statistics.median(r.ms_per_step for r, _, _ in runs),
                       image_ms=1000 * statistics.median(s for _, s, _ in runs),
                       peak_mb=max(m for _, _, m in runs))
        return row, BenchCase(batch, n_in, n_out, prompts, self.image, [s.tokens for s in res.sequences])


def _greedy(n: int) -> GenerationConfig:
    """Fixed-length greedy generation: the seeds measure exactly OutputLength tokens."""
    return GenerationConfig(max_new_tokens=n, do_sample=False, stop_on_eos=False, stop_strings=())


def run_grid(pipe, options: BenchOptions, image=None,
             echo: Callable[[str], None] = print) -> tuple[list[BenchRow], list[BenchCase]]:
    """Every (batch, input, output) cell the bundle's gears allow; the others are named and skipped."""
    bench = BundleBench(pipe, options, image)
    rows, cases = [], []
    for batch in options.batches:
        warmed = False
        for n_in, n_out in options.pairs():
            why = bench.skip_reason(batch, n_in, n_out)
            if why:
                echo(f"skip batch {batch}, {n_in} in / {n_out} out: {why}")
                continue
            if not warmed:
                bench.warm_up(batch)
                warmed = True
            bench.warm_up(batch, n_in)
            row, case = bench.measure(batch, n_in, n_out)
            echo(f"batch {batch}, {n_in} in / {n_out} out: first token {row.first_token_ms:.1f} ms, "
                 f"{row.ms_per_token:.2f} ms/token, {row.tokens_per_s:.1f} tokens/s")
            rows.append(row)
            cases.append(case)
    return rows, cases


def csv_name(batch: int, model: str, suffix: str = "") -> str:
    """The seeds' file name: ``{batch}_batch_performance_{model}.csv``."""
    return f"{batch}_batch_performance_{model}{suffix}.csv"
