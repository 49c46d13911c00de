"""Where checkpoint tensors come from: a pickle (``.pth``/``.bin``), a ``.safetensors`` file or a
Hugging Face shard folder, each read safely and lazily.

vlm2om never runs code from a checkpoint (``torch.load(weights_only=True)`` only) and reads
tensors lazily (mmap / ``safe_open``), so peak memory follows the subgraph being built. Every
source tells shapes before any data is read, and ``file_of(key)`` names the file a tensor is in.
"""
from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Protocol

import torch

from vlm2om.exporters.core.preflight import CheckpointError

_NO_CODE = "vlm2om never runs code from a checkpoint (torch.load weights_only=True)"


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
        with warnings.catch_warnings():  # torch warns of a damaged file's "pickle protocol"; ours says it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # a class or function the weights-only unpickler refuses
            raise CheckpointError(
                f"{path}: refused to load: the pickle needs code to run "
                f"({_unpickling_detail(err)}); {_NO_CODE}. Convert it to a plain state dict "
                "of tensors (or safetensors) in a trusted environment.") from None
        raise _corrupt(path, err, _unpickling_detail(err)) from None
    except Exception as err:  # zip/pickle errors come in many types
        raise _corrupt(path, err) from None


def _corrupt(path: Path, err: Exception, detail: str | None = None) -> CheckpointError:
    first = detail or re.split(r"(?<=\.)\s", str(err).strip().split("\n")[0])[0][:200]
    return CheckpointError(f"{path}: cannot read checkpoint, the file is truncated or corrupt "
                           f"({type(err).__name__}{': ' + first if first else ''})")


class TensorSource(Protocol):
    """Name -> tensor, with shapes available before any data is read."""

    name: str

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> torch.Size: ...

    def get(self, key: str) -> torch.Tensor: ...

    def file_of(self, key: str) -> Path: ...


class DictSource:
    """A state dict from a pickle: bare, or under ``subkey`` (e.g. LAVIS' ``['model']``)."""

    def __init__(self, path: str | Path, subkey: str | None = None, loaded: object | None = None):
        """``loaded``: the file's object when the caller has read it already (``load_pickle``)."""
        path = Path(path)
        obj = load_pickle(path) if loaded is None else loaded
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
        self.name, self.path = where, path
        self._tensors: dict[str, torch.Tensor] = dict(obj)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> torch.Size:
        return self._tensors[key].shape

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def file_of(self, key: str) -> Path:
        return self.path


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

    def file_of(self, key: str) -> Path:
        return self.path


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

    def file_of(self, key: str) -> Path:
        return self.index.parent / self._where[key]


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


