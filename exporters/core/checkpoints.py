"""Read checkpoint tensors safely and map them onto our modules' parameter names.

Why this exists: released VLM checkpoints are pickles (``.pth``/``.bin``) or safetensors,
single files or Hugging Face shard folders. vlm2om never runs code from a checkpoint
(``torch.load(weights_only=True)`` only), reads tensors lazily (mmap / ``safe_open``) so
peak memory follows the subgraph being built, and checks every name and shape against
the module before any tensor is read, reporting all problems in one error.
"""
from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import torch

from vlm2om.runtime.errors import Vlm2omError

_NO_CODE = "vlm2om never runs code from a checkpoint (torch.load weights_only=True)"


class CheckpointError(Vlm2omError):
    """A checkpoint file is missing, unreadable, unsafe, or does not fit the module."""


def _shape(s: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in s) + "]"


def _unpickling_detail(err: Exception) -> str:
    """The useful line(s) of torch's long 'Weights only load failed' message."""
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(err).splitlines()]
    detail = [ln for ln in lines if ln and not ln.startswith(skip)]
    return " ".join(detail)[:300] or type(err).__name__


def load_pickle(path: str | Path) -> object:
    """``torch.load`` with weights_only and mmap; every failure becomes a CheckpointError.

    mmap keeps tensor data on disk until used; files in the pre-1.6 (non-zip) format
    cannot be mmapped and are read whole instead.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    with open(path, "rb") as fh:
        is_zip = fh.read(4) == b"PK\x03\x04"
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: the pickle needs code to run "
            f"({_unpickling_detail(err)}); {_NO_CODE}. Convert it to a plain state dict "
            "of tensors (or safetensors) in a trusted environment.") from None
    except Exception as err:  # zip/pickle errors come in many types
        raise CheckpointError(
            f"{path}: cannot read checkpoint, the file is truncated or corrupt "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
        ) from None


class TensorSource(Protocol):
    """Name -> tensor, with shapes available before any data is read."""

    name: str

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> torch.Size: ...

    def get(self, key: str) -> torch.Tensor: ...


class DictSource:
    """A state dict from a pickle: bare, or under ``subkey`` (e.g. LAVIS' ``['model']``)."""

    def __init__(self, path: str | Path, subkey: str | None = None):
        path = Path(path)
        obj = load_pickle(path)
        where = f"{path}" + (f"['{subkey}']" if subkey else "")
        if subkey is not None:
            if not isinstance(obj, Mapping) or subkey not in obj:
                top = list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
                raise CheckpointError(
                    f"{path}: no '{subkey}' entry (top level holds {top}); is this the right file?")
            obj = obj[subkey]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{where}: expected a state dict, found {type(obj).__name__}")
        bad = [(k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            k, v = bad[0]
            hint = (f" (it looks like a training checkpoint that keeps its weights under "
                    f"'{k}'); is this the right file?") if isinstance(v, Mapping) else ""
            raise CheckpointError(
                f"{where}: expected a state dict of tensors, but entry '{k}' is a "
                f"{type(v).__name__}{hint}")
        self.name = where
        self._tensors: dict[str, torch.Tensor] = dict(obj)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> torch.Size:
        return self._tensors[key].shape

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def _safe_open(path: Path):
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot read safetensors file, it is truncated or corrupt ({err})") from None


class SafetensorsSource:
    """One ``.safetensors`` file, read lazily through ``safe_open``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(self.path)
        self._fh = _safe_open(self.path)

    def keys(self) -> list[str]:
        return list(self._fh.keys())

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._fh.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._fh.get_tensor(key)


class ShardedSource:
    """A Hugging Face shard folder: ``*.index.json`` maps each key to its shard file.

    safetensors shards stay open (they are mmapped); ``.bin`` shards are unpickled with
    mmap and only the most recent one is cached, so memory follows what is read.
    """

    def __init__(self, index_path: str | Path):
        self.index = Path(index_path)
        self.name = str(self.index.parent)
        try:
            weight_map = json.loads(self.index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except Exception as err:
            raise CheckpointError(f"{self.index}: not a valid shard index ({err})") from None
        self._where: dict[str, str] = dict(weight_map)
        missing = sorted({s for s in self._where.values() if not (self.index.parent / s).is_file()})
        if missing:
            raise CheckpointError(
                f"{self.index}: shard(s) named in the index are missing: {', '.join(missing)} "
                f"(looked in {self.index.parent})")
        self._open: dict[str, object] = {}  # safetensors handles
        self._names: dict[str, set[str]] = {}  # keys per safetensors shard
        self._cached: tuple[str, DictSource] | None = None  # the one .bin shard in memory

    def keys(self) -> list[str]:
        return list(self._where)

    def order(self, keys: Iterable[str]) -> list[str]:
        """Group keys by shard so a .bin shard is unpickled once per pass."""
        return sorted(keys, key=lambda k: self._where.get(k, ""))

    def _shard(self, key: str):
        shard = self._where[key]
        path = self.index.parent / shard
        if shard.endswith(".safetensors"):
            if shard not in self._open:
                self._open[shard] = _safe_open(path)
                self._names[shard] = set(self._open[shard].keys())
            fh = self._open[shard]
            present = key in self._names[shard]
        else:
            if self._cached is None or self._cached[0] != shard:
                self._cached = None  # drop the previous shard before mapping the next
                self._cached = (shard, DictSource(path))
            fh = self._cached[1]
            present = key in fh
        if not present:
            raise CheckpointError(f"{self.index}: says '{key}' is in {shard}, but {path} lacks it")
        return fh

    def shape(self, key: str) -> torch.Size:
        fh = self._shard(key)
        if isinstance(fh, DictSource):
            return fh.shape(key)
        return torch.Size(fh.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        fh = self._shard(key)
        return fh.get(key) if isinstance(fh, DictSource) else fh.get_tensor(key)


HF_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                   "pytorch_model.bin.index.json", "pytorch_model.bin")


def open_hf_folder(folder: str | Path) -> TensorSource:
    """The weights of a Hugging Face model folder (sharded or single file, safetensors first)."""
    folder = Path(folder)
    for name in HF_WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".index.json"):
                return ShardedSource(path)
            return SafetensorsSource(path) if name.endswith(".safetensors") else DictSource(path)
    raise CheckpointError(
        f"{folder}: no weights found (expected one of {', '.join(HF_WEIGHT_FILES)})")


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

    def ignored_lines(self) -> list[str]:
        return [f"{src}: {key} ({why})" for src, key, why in self.ignored]


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


def check_plans(plans: Sequence[Plan], what: str = "weights") -> None:
    """Raise one CheckpointError listing every problem of every plan (reads no tensor)."""
    problems = [p for plan in plans for p in plan.problems]
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise CheckpointError(f"cannot load {what}: {len(problems)} problem(s):\n{lines}")


def load_plans(plans: Sequence[Plan], dtype: torch.dtype | None = None,
               what: str = "weights") -> LoadReport:
    """Raise if any plan has problems; else read exactly the planned tensors.

    Floating tensors are cast to ``dtype`` when given; integer buffers keep their type.
    """
    check_plans(plans, what)
    state: dict[str, torch.Tensor] = {}
    report = LoadReport(state)
    for plan in plans:
        for ours, theirs in _in_read_order(plan.source, plan.pairs):
            t = plan.source.get(theirs)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            state[ours] = t
        report.ignored.extend((plan.source.name, k, why) for k, why in plan.ignored)
    return report


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
