"""What an export checks before torch is imported: the output folder, the checkpoint folder and
the JSON configs in it. A mistyped path or a broken config.json is then named in a fraction of a
second, not after the seconds torch takes to import and the minutes a checkpoint takes to map.

Torch-free, like ``options.py``; the checkpoint readers (``checkpoints.py``) raise the same
``CheckpointError`` for what only the tensors can tell.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from vlm2om.runtime.errors import InputError, Vlm2omError

# The JSON files a family reads from a checkpoint folder (or one of its subfolders).
CONFIG_NAMES = ("config.json", "tokenizer_config.json")


class CheckpointError(Vlm2omError):
    """A checkpoint file is missing, unreadable, unsafe, or does not fit the module."""


def read_json(path: Path, what: str = "config") -> dict:
    """A JSON object from ``path``; CheckpointError naming the file for anything else."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        detail = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise CheckpointError(f"{path}: cannot read {what} ({detail})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def check_checkpoint_folder(folder: Path) -> None:
    """``--checkpoint``: an existing folder whose configs (and shard indexes) parse."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"--checkpoint '{folder}' does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"--checkpoint '{folder}' is a file; give the folder that holds the checkpoint files")
    for path in sorted([*folder.glob("*.json"), *folder.glob("*/*.json")]):
        if path.name in CONFIG_NAMES or path.name.endswith(".index.json"):
            read_json(path, "shard index" if path.name.endswith(".index.json") else "config")


def check_out(out: Path) -> None:
    """``--out``: a bundle folder (or a new path) that is not inside a file and whose folder this
    process can write. The staging folder and the lock are made beside ``out``, in its parent."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"cannot write the bundle to '{out}': it is a file, not a folder")
    existing = next(p for p in [out.parent, *out.parent.parents] if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise InputError(f"cannot write the bundle to '{out}': '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write the bundle to '{out}': '{existing}' {unwritable_reason(existing)}; "
                         "nothing was written")


def unwritable_reason(folder: Path) -> str:
    """Why ``folder`` cannot be written: a read-only file system (a mount that even root cannot
    write) or the folder's permissions."""
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return "is on a read-only file system" if read_only else "is not writable by this user"


def os_reason(err: OSError) -> str:
    """'no space left on device', 'disk quota exceeded', ...: the OS's words for ``err``."""
    text = os.strerror(err.errno) if err.errno else (err.strerror or type(err).__name__)
    return text[:1].lower() + text[1:]



def piece_ids(model: bytes, where, pieces, whose: str) -> dict[str, int]:
    """The ids of ``pieces`` in a serialized SentencePiece model; CheckpointError naming the file
    (``where``) when it is not one or lacks a piece (``whose``: the tokenizer it should be)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model)
    except Exception as err:  # sentencepiece raises RuntimeError/OSError by version
        raise CheckpointError(f"{where}: not a SentencePiece model ({err})") from None
    out = {}
    for piece in pieces:
        pid = sp.PieceToId(piece)
        if sp.IdToPiece(pid) != piece:
            raise CheckpointError(f"{where}: has no {piece} piece; is this {whose}?")
        out[piece] = pid
    return out
