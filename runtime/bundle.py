"""Open a bundle directory: schema check, file hashes, graph lookup.

The manifest is the single source of truth: the runtime never derives anything from
file names. See ``docs/bundle.md`` for the schema; version 1 bundles are read as version 2
(``schema.upgrade``), then checked against it (``manifest_check``) before any file is hashed,
so a damaged or hand-edited manifest is named at open, by key. Opening writes nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError
from .manifest_check import check_manifest
from .manifest_types import show
from .schema import SCHEMA_VERSION, upgrade

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # a 7B bundle's manifest is about 100 kB; anything this large is no manifest


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(mpath: Path) -> dict:
    """The parsed manifest, or a ``BundleError`` saying why the file is not one (unreadable, empty,
    not UTF-8, not JSON, not a JSON object)."""
    try:
        size = mpath.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{mpath} is {size:,} bytes, far more than any manifest (at most "
                              f"{MAX_MANIFEST_BYTES:,}): it is not a bundle's manifest")
        data = mpath.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read {mpath}: {e.strerror or e}") from None
    if not data.strip():
        raise BundleError(f"{mpath} is empty: the bundle is damaged; re-export it")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BundleError(f"{mpath} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): the file is "
                          "damaged; re-export the bundle") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{e.msg.removesuffix(' at')} at line {e.lineno}, column {e.colno}"
        raise BundleError(f"{mpath} is not valid JSON ({where}): the file is damaged or truncated; "
                          "re-export the bundle") from None
    except RecursionError:
        raise BundleError(f"{mpath} nests too deeply to be a manifest") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} must hold a JSON object, got {show(manifest)}")
    return manifest


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path, verify_hashes: bool = True) -> "Bundle":
        root = Path(path)
        mpath = root / MANIFEST
        try:
            if root.exists() and not root.is_dir():
                raise BundleError(f"'{root}' is a file, not a bundle folder (give the folder that holds {MANIFEST})")
            if not root.is_dir():
                raise BundleError(f"bundle directory '{root}' does not exist")
            if not mpath.is_file():
                raise BundleError(f"'{root}' is not a bundle: {MANIFEST} is missing")
        except (OSError, ValueError) as e:  # a path the system refuses to look at
            raise BundleError(f"cannot open bundle '{root}': {getattr(e, 'strerror', None) or e}") from None
        manifest = upgrade(read_manifest(mpath), str(mpath))
        check_manifest(manifest, str(mpath))
        bundle = cls(root, manifest)
        bundle.check_files(verify_hashes)
        return bundle

    def check_files(self, verify_hashes: bool = True, only: list[str] | None = None) -> None:
        """Raise naming every file that is missing, resized or altered (of ``only``, when given:
        a small file needed before the rest, such as the tokenizer)."""
        problems = []
        for name, meta in self.manifest.get("files", {}).items():
            if only is not None and name not in only:
                continue
            p = self.root / name
            try:
                if not p.is_file():
                    problems.append(f"missing: {name}")
                elif p.stat().st_size != meta["bytes"]:
                    problems.append(f"altered: {name} ({p.stat().st_size} bytes, manifest says {meta['bytes']})")
                elif verify_hashes and sha256_file(p) != meta["sha256"]:
                    problems.append(f"altered: {name} (sha256 differs from the manifest)")
            except OSError as e:
                problems.append(f"unreadable: {name} ({e.strerror or e})")
        if problems:
            raise BundleError(f"bundle '{self.root}' is damaged:\n  " + "\n  ".join(problems))

    def unlisted_files(self) -> list[str]:
        """Files under the bundle folder that the manifest's ``files`` does not list (relative, sorted;
        ``manifest.json`` itself aside): nothing checks or uses them."""
        listed, out = {*self.manifest.get("files", {}), MANIFEST}, []
        for folder, dirs, names in os.walk(self.root):
            dirs.sort()
            for name in names:
                rel = (Path(folder) / name).relative_to(self.root).as_posix()
                if rel not in listed:
                    out.append(rel)
        return sorted(out)

    def graph(self, name: str) -> dict[str, Any]:
        graphs = self.manifest["graphs"]
        if name not in graphs:
            raise BundleError(f"bundle '{self.root}' has no graph '{name}' (it has: {', '.join(graphs)})")
        return graphs[name]

    def path(self, relative: str) -> Path:
        return self.root / relative

    @property
    def pipeline(self) -> dict[str, Any]:
        return self.manifest["pipeline"]

    @property
    def task(self) -> str:
        return self.manifest["task"]
