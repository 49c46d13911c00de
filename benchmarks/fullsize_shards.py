"""The published ``.bin`` shard layout with full-size random fp16 weights, for the full-size
checkpoint writers (``fullsize_visualglm.py``, ``fullsize_ixc2.py``): ``pytorch_model-K-of-N.bin``
files, their ``pytorch_model.bin.index.json``, and a ``.complete`` marker written last."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch


def write_bin_shards(root: Path, shards: list[dict[str, tuple]], is_norm: Callable[[str], bool]) -> None:
    """One file per shard (key -> shape); norm weights 1 and biases 0 where ``is_norm(key)``, else
    N(0, 0.02), seeded, so that activations stay finite through every layer."""
    gen = torch.Generator().manual_seed(0)

    def value(shape, name: str) -> torch.Tensor:
        if is_norm(name):
            return (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=torch.float16)
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)

    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"pytorch_model-{n:05d}-of-{len(shards):05d}.bin"
        torch.save({k: value(s, k) for k, s in shard.items()}, root / name)
        weight_map.update(dict.fromkeys(shard, name))
        print(f"  wrote {name}", flush=True)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (root / ".complete").write_text("ok")
