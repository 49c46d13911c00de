"""The session protocol every backend implements, the gear-exact feed check, and the check that a
graph file is the one its manifest entry describes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import BundleError, InputError


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as the manifest declares it; str dims are gear dims. ``role``
    says what the runtime feeds it or reads from it (decoder graphs; see runtime/schema.py)."""

    name: str
    dtype: str
    shape: tuple
    role: str | None = None

    @classmethod
    def from_manifest(cls, entry: dict) -> "TensorSpec":
        return cls(entry["name"], entry["dtype"], tuple(entry["shape"]), entry.get("role"))

    def concrete(self, gear: dict[str, int]) -> tuple[int, ...]:
        return tuple(gear[d] if isinstance(d, str) else d for d in self.shape)


class Session(Protocol):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def check_feeds(graph_name: str, specs: list[TensorSpec], gears: list[dict] | None,
                feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Every backend feeds exactly one declared gear (what ATC's OM requires); return it."""
    missing = [s.name for s in specs if s.name not in feeds]
    if missing:
        raise InputError(f"graph '{graph_name}': missing inputs {missing}")
    for gear in gears or [{}]:
        if all(tuple(feeds[s.name].shape) == s.concrete(gear) for s in specs):
            return gear
    got = {s.name: tuple(feeds[s.name].shape) for s in specs}
    raise InputError(f"graph '{graph_name}': input shapes {got} match none of its gears {gears}")


@dataclass(frozen=True)
class FileTensor:
    """One input or output as the graph file itself reports it: ``dtype`` a numpy name (None when
    the backend does not say), ``shape`` ints for static dims, anything else for a dynamic one."""

    name: str
    dtype: str | None
    shape: tuple


def _show(dtype, shape) -> str:
    dims = ",".join(str(d) if isinstance(d, (int, str)) and not isinstance(d, bool) and d != -1 else "?"
                    for d in shape)
    return f"{dtype or ''}[{dims}]"


def io_problems(kind: str, declared: list[TensorSpec], actual: list[FileTensor], gears: list[dict] | None,
                by_name: bool = True, ranks_may_differ: bool = False, strict_gears: bool = True) -> list[str]:
    """How a graph file's inputs or outputs (``kind``) differ from the manifest's: names in order
    (``by_name``; else only their count), dtypes where the file reports them, and every static dim.
    A manifest gear dim must be dynamic in the file, or static at the one value every gear gives it
    (``strict_gears``; a compiled file may report a gear dim at one of its values)."""
    names, want = [a.name for a in actual], [s.name for s in declared]
    if (names != want) if by_name else (len(names) != len(want)):
        return [f"the file has {kind}s {names}, the manifest declares {want}"]
    out = []
    for a, s in zip(actual, declared):
        if ranks_may_differ and len(a.shape) != len(s.shape):
            continue  # a backend that reports some outputs flat
        fixed = [d if isinstance(d, int) else {g.get(d) for g in gears or [{}]} if strict_gears else None
                 for d in s.shape]
        if (len(a.shape) != len(s.shape) or (a.dtype is not None and a.dtype != s.dtype)
                or any(_static(d) and m is not None and (d != m if isinstance(m, int) else m != {d})
                       for d, m in zip(a.shape, fixed))):
            out.append(f"{kind} '{s.name}' is {_show(a.dtype, a.shape)} in the file, the manifest declares "
                       f"{_show(s.dtype, s.shape)}")
    return out


def _static(d) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0


def check_graph_file(graph_name: str, label: str, problems: list[str], fix: str) -> None:
    """Raise naming the graph, its file and every difference from the manifest (``fix``: what to do)."""
    if not problems:
        return
    if len(problems) == 1:
        raise BundleError(f"graph '{graph_name}' ({label}): {problems[0]}; the file does not belong to this "
                          f"bundle ({fix})")
    raise BundleError(f"graph '{graph_name}' ({label}) does not match the manifest, so the file does not belong to "
                      f"this bundle ({fix}):\n  " + "\n  ".join(problems))
