"""A Hugging Face-style weight folder: ``.bin`` or ``.safetensors`` shards with their index, or one
file when there is one shard, the layout every family's tiny checkpoints are written in."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_shards(folder: Path, shards: list[dict[str, torch.Tensor]], layout: str, total_size: int = 0,
                 single_name: bool = True) -> dict[str, str]:
    """Write each shard ({key: tensor}) as ``layout`` ("bin" | "safetensors") and, for several,
    the index; ``single_name`` False names a lone shard ``-00001-of-00001`` with an index too.
    Returns the weight map."""
    n, weight_map = len(shards), {}
    for i, part in enumerate(shards, 1):
        part = {k: v.contiguous() for k, v in part.items()}
        one = n == 1 and single_name
        if layout == "safetensors":
            name = "model.safetensors" if one else f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            name = "pytorch_model.bin" if one else f"pytorch_model-{i:05d}-of-{n:05d}.bin"
            torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    if n > 1 or not single_name:
        index = "model.safetensors.index.json" if layout == "safetensors" else "pytorch_model.bin.index.json"
        (folder / index).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map},
                                               indent=2))
    return weight_map
