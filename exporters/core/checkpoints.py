"""Map checkpoint tensors onto our modules' parameter names, and check them.

Why this exists: released VLM checkpoints are pickles (``.pth``/``.bin``) or safetensors,
single files or Hugging Face shard folders (``sources.py`` reads them, safely and lazily).
Every name and shape is checked against the module before any tensor is read, reporting the
problems in one error that leads with the likely cause (the sizes the options and the
checkpoint disagree on); every tensor read is checked to be finite, naming its file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from vlm2om.exporters.core.preflight import CheckpointError
from vlm2om.exporters.core.sources import (HF_WEIGHT_FILES, DictSource, SafetensorsSource, ShardedSource,
                                           TensorSource, load_pickle, open_hf_folder)

__all__ = ["CheckpointError", "DictSource", "HF_WEIGHT_FILES", "Ignore", "LoadReport", "MappingTable", "Plan",
           "SafetensorsSource", "ShardedSource", "SizeCheck", "TensorSource", "assign", "check_plans",
           "count_indexed", "coverage_plan", "dim", "expected_shapes", "load_pickle", "load_plans", "on_meta",
           "open_hf_folder", "size_hint"]

SHOWN_PROBLEMS = 8  # a size mismatch breaks hundreds of tensors: the first few and a count say enough


def _shape(s: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in s) + "]"


@dataclass(frozen=True)
class Ignore:
    """Source keys (regex, full match) that are skipped on purpose, and why."""

    pattern: str
    why: str

    def matches(self, key: str) -> bool:
        return re.fullmatch(self.pattern, key) is not None


@dataclass
class Plan:
    """What one table would read from one source; nothing is loaded yet."""

    source: TensorSource
    pairs: dict[str, str]  # our name -> source key
    ignored: list[tuple[str, str]]  # (source key, why)
    problems: list[str]


@dataclass
class LoadReport:
    """Our state dict plus the source keys skipped on purpose (for the export log)."""

    state: dict[str, torch.Tensor]
    ignored: list[tuple[str, str, str]] = field(default_factory=list)  # (source, key, why)
    read_from: dict[str, tuple[str, str]] = field(default_factory=dict)  # ours -> (file, key)

    def ignored_lines(self) -> list[str]:
        return [f"{src}: {key} ({why})" for src, key, why in self.ignored]

    def fit(self, dtype: torch.dtype) -> "LoadReport":
        """Check that every floating tensor, kept at the checkpoint's dtype to be cast later
        (``cast_module``), fits ``dtype``'s range; names the file and key of one that does not."""
        limit = torch.finfo(dtype).max
        for ours, t in self.state.items():
            if t.is_floating_point() and torch.finfo(t.dtype).max > limit:
                peak = max(float(c.abs().max()) for c in t.reshape(-1).split(_CHUNK)) if t.numel() else 0.0
                if peak > limit:
                    file, key = self.read_from.get(ours, ("?", ours))
                    raise _out_of_range(file, key, peak, dtype)
        return self


@dataclass(frozen=True)
class MappingTable:
    """(our_pattern, source_pattern) entries with ``{i}``-style layer placeholders."""

    entries: tuple[tuple[str, str], ...]
    ignore: tuple[Ignore, ...] = ()

    def __add__(self, other: "MappingTable") -> "MappingTable":
        return MappingTable(self.entries + other.entries, self.ignore + other.ignore)

    def _pairs(self, layers: Mapping[str, Iterable[int] | Mapping[int, int]]):
        """Yield (our name, source key); a range keeps the index, a dict maps ours -> source."""
        for ours, theirs in self.entries:
            names = sorted(set(re.findall(r"\{(\w+)\}", ours + theirs)))
            if not names:
                yield ours, theirs
                continue
            if len(names) > 1 or names[0] not in layers:
                raise ValueError(f"mapping entry {ours!r}: no index range for {names}")
            index = layers[names[0]]
            table = index if isinstance(index, Mapping) else {i: i for i in index}
            for mine, src in table.items():
                yield ours.format(**{names[0]: mine}), theirs.format(**{names[0]: src})

    def plan(self, source: TensorSource, expected: Mapping[str, torch.Size],
             layers: Mapping[str, Iterable[int] | Mapping[int, int]] | None = None,
             check_unmapped: bool = True) -> Plan:
        """Match names and shapes; collect every problem instead of stopping at the first."""
        problems: list[str] = []
        available = set(source.keys())
        pairs: dict[str, str] = {}
        for ours, theirs in self._pairs(layers or {}):
            if ours in expected:
                pairs[ours] = theirs
        for ours in expected:
            if ours not in pairs:
                problems.append(f"no mapping entry for our parameter '{ours}' (table bug)")
        found = {o: t for o, t in pairs.items() if t in available}
        for ours, theirs in pairs.items():
            if theirs not in available:
                problems.append(f"missing in {source.name}: '{theirs}' (for our '{ours}')")
        for ours, theirs in _in_read_order(source, found):
            got, want = tuple(source.shape(theirs)), tuple(expected[ours])
            if got != want:
                problems.append(f"shape mismatch: '{theirs}' is {_shape(got)} in {source.name}, "
                                f"our '{ours}' expects {_shape(want)}")
        if pairs and not found:
            sample = ", ".join(sorted(available)[:5])
            problems.insert(0, f"{source.name}: none of the expected keys is present; is this "
                               f"the right file? (it holds {len(available)} keys such as {sample})")
        # A partial load (one decoder group) neither judges nor reports the other keys.
        ignored, unmapped = _account(source, set(found.values()), self.ignore) if check_unmapped else ([], [])
        return Plan(source, pairs, ignored, problems + unmapped)

    def apply(self, source: TensorSource, expected: Mapping[str, torch.Size],
              layers: Mapping[str, Iterable[int] | Mapping[int, int]] | None = None,
              dtype: torch.dtype | None = None, check_unmapped: bool = True,
              what: str = "weights") -> LoadReport:
        """Our state dict from ``source``; CheckpointError lists all problems at once."""
        return load_plans([self.plan(source, expected, layers, check_unmapped)], dtype, what)


def _account(source: TensorSource, used: set[str], ignore: Sequence[Ignore]):
    """(ignored (key, why), problems) for the keys of ``source`` outside ``used``."""
    ignored, problems = [], []
    for key in (k for k in source.keys() if k not in used):
        why = next((ig.why for ig in ignore if ig.matches(key)), None)
        if why is not None:
            ignored.append((key, why))
        else:
            problems.append(f"unmapped key in {source.name}: '{key}' {_shape(source.shape(key))} "
                            "is neither used nor on the ignore list")
    return ignored, problems


def coverage_plan(source: TensorSource, plans: Sequence[Plan], ignore: Sequence[Ignore]) -> Plan:
    """Every key of ``source`` that none of ``plans`` (made with check_unmapped=False) reads must
    be on ``ignore``: for one file or folder that several tables share (LLaVA's checkpoint holds
    the LLM, the projector and perhaps the vision tower)."""
    ignored, problems = _account(source, {k for p in plans for k in p.pairs.values()}, ignore)
    return Plan(source, {}, ignored, problems)


def _in_read_order(source: TensorSource, pairs: Mapping[str, str]) -> list[tuple[str, str]]:
    """(ours, theirs) sorted the way the source reads best (shard by shard)."""
    order = getattr(source, "order", None)
    keys = list(dict.fromkeys(pairs.values()))  # table order, without duplicates
    rank = {k: n for n, k in enumerate(order(keys) if order else keys)}
    return sorted(pairs.items(), key=lambda item: rank[item[1]])


@dataclass(frozen=True)
class SizeCheck:
    """One size the options fix (``want``) and the checkpoint's shapes tell (``got``; None where
    they cannot); ``label`` words it, e.g. ``"hidden size {}"`` or ``"{} layers"``."""

    label: str
    want: int
    got: int | None


def size_hint(what: str, checks: Iterable[SizeCheck], origin: str | None) -> str | None:
    """'the checkpoint's LLM has hidden size 64 and 2 layers; the options say 32 and 4 (origin)',
    or None where every size agrees (the problems are something else)."""
    bad = [c for c in checks if c.got is not None and c.got != c.want]
    if not bad:
        return None
    return (f"the checkpoint's {what} has {_and([c.label.format(c.got) for c in bad])}; the options say "
            f"{_and([str(c.want) for c in bad])}" + (f" ({origin})" if origin else ""))


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def count_indexed(keys: Iterable[str], pattern: str) -> int | None:
    """How many distinct N the keys hold for ``pattern`` (a regex whose one group is the index,
    e.g. the layers of ``model.layers.N.*``); None where no key matches."""
    found = {m.group(1) for k in keys if (m := re.match(pattern, k))}
    return len(found) or None


def dim(source: TensorSource, key: str, axis: int) -> int | None:
    """One dim of a checkpoint tensor's shape, None where the key is absent."""
    try:
        return int(source.shape(key)[axis]) if key in set(source.keys()) else None
    except (IndexError, CheckpointError):
        return None


def check_plans(plans: Sequence[Plan], what: str = "weights",
                hints: Callable[[], Iterable[str | None]] | None = None) -> None:
    """Raise one CheckpointError for every problem of every plan (reads no tensor): the likely
    cause first (``hints``: the sizes that disagree, asked for only when there are problems),
    then the first few problems and a count of the rest."""
    problems = [p for plan in plans for p in plan.problems]
    if not problems:
        return
    causes = [h for h in (hints() if hints else ()) if h]
    shown = problems[:SHOWN_PROBLEMS]
    lines = [f"  - {p}" for p in shown]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    lead = f"cannot load {what}: " + "".join(f"{c}; " for c in causes)
    count = f"{len(problems)} problem(s)" + (f", the first {len(shown)}" if len(problems) > len(shown) else "")
    raise CheckpointError(f"{lead}{count}:\n" + "\n".join(lines))


def load_plans(plans: Sequence[Plan], dtype: torch.dtype | None = None,
               what: str = "weights") -> LoadReport:
    """Raise if any plan has problems; else read exactly the planned tensors, each checked finite.

    Floating tensors are cast to ``dtype`` when given; integer buffers keep their type.
    """
    check_plans(plans, what)
    state: dict[str, torch.Tensor] = {}
    report = LoadReport(state)
    for plan in plans:
        for ours, theirs in _in_read_order(plan.source, plan.pairs):
            t = plan.source.get(theirs)
            if t.is_floating_point():
                check_finite(t, plan.source, theirs)
                if dtype is not None and t.dtype != dtype:
                    t = _cast(t, dtype, plan.source, theirs)
            state[ours] = t
            report.read_from[ours] = (_file_of(plan.source, theirs), theirs)
        report.ignored.extend((plan.source.name, k, why) for k, why in plan.ignored)
    return report


_CHUNK = 1 << 24  # elements per finiteness test: a 16 MB mask at most, whatever the tensor


def _nonfinite(t: torch.Tensor) -> bool:
    flat = t.reshape(-1)
    return any(not bool(torch.isfinite(c).all()) for c in flat.split(_CHUNK))


def check_finite(t: torch.Tensor, source: TensorSource, key: str) -> None:
    """A NaN or inf weight would export and verify as "max_abs=nan" graphs later: name it now."""
    if not _nonfinite(t):
        return
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    counts = _and([f"{n} {kind} value{'s' if n != 1 else ''}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n])
    raise CheckpointError(f"checkpoint '{_file_of(source, key)}': tensor '{key}' has {counts} (of {t.numel()}); "
                          "the file is damaged or was saved from a diverged run")


def _cast(t: torch.Tensor, dtype: torch.dtype, source: TensorSource, key: str) -> torch.Tensor:
    """``t`` in ``dtype``; finite values beyond its range (fp32 -> fp16 above 65504) are named."""
    out = t.to(dtype)
    if out.is_floating_point() and _nonfinite(out):
        raise _out_of_range(_file_of(source, key), key, float(t.abs().max()), dtype)
    return out


def _out_of_range(file: str, key: str, peak: float, dtype: torch.dtype) -> CheckpointError:
    return CheckpointError(f"checkpoint '{file}': tensor '{key}' has values up to {peak:.4g}, beyond "
                           f"{str(dtype).removeprefix('torch.')}'s range; export with --dtype float32")


def _file_of(source: TensorSource, key: str) -> str:
    file_of = getattr(source, "file_of", None)
    return str(file_of(key)) if file_of else source.name


def on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` on the meta device: parameter names and shapes without allocating the weights."""
    with torch.device("meta"):
        return build()


def assign(build: Callable[[], torch.nn.Module], state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """``build()`` on the meta device, then given the checkpoint tensors themselves (no copy)."""
    module = on_meta(build)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def expected_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    """The shapes ``module.load_state_dict`` wants (build ``module`` with ``on_meta``)."""
    return {k: v.shape for k, v in module.state_dict().items()}
