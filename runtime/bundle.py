"""Open a bundle directory: schema check, file hashes, graph lookup.

The manifest is the single source of truth: the runtime never derives anything from
file names. See ``docs/bundle.md`` for the schema; version 1 bundles are read as version 2
(``schema.upgrade``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError
from .schema import SCHEMA_VERSION, upgrade

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path, verify_hashes: bool = True) -> "Bundle":
        root = Path(path)
        mpath = root / MANIFEST
        if root.exists() and not root.is_dir():
            raise BundleError(f"'{root}' is a file, not a bundle folder (give the folder that holds {MANIFEST})")
        if not root.is_dir():
            raise BundleError(f"bundle directory '{root}' does not exist")
        if not mpath.is_file():
            raise BundleError(f"'{root}' is not a bundle: {MANIFEST} is missing")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise BundleError(f"cannot read {mpath}: {e}") from e
        bundle = cls(root, upgrade(manifest, str(mpath)))
        bundle.check_files(verify_hashes)
        return bundle

    def check_files(self, verify_hashes: bool = True) -> None:
        """Raise naming every file that is missing, resized or altered."""
        problems = []
        for name, meta in self.manifest.get("files", {}).items():
            p = self.root / name
            if not p.is_file():
                problems.append(f"missing: {name}")
            elif p.stat().st_size != meta["bytes"]:
                problems.append(f"altered: {name} ({p.stat().st_size} bytes, manifest says {meta['bytes']})")
            elif verify_hashes and sha256_file(p) != meta["sha256"]:
                problems.append(f"altered: {name} (sha256 differs from the manifest)")
        if problems:
            raise BundleError(f"bundle '{self.root}' is damaged:\n  " + "\n  ".join(problems))

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
