"""The token-embedding graph every LLM kind exports the same way: ids [batch, seq] -> embeddings."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl


def embed_subgraph(build: Callable[[], nn.Module], vocab_size: int, hidden: int, seq_gears: list[int],
                   dtype: str) -> Subgraph:
    def make(gear, gen):
        return {"input_ids": torch.randint(0, vocab_size, (gear["batch"], gear["seq"]), generator=gen)}

    return Subgraph(
        "embed", build,
        [TensorDecl("input_ids", "int64", ("batch", "seq"), "token_ids")],
        [TensorDecl("inputs_embeds", dtype, ("batch", "seq", hidden), "embeds")],
        make, [{"batch": 1, "seq": s} for s in seq_gears])
