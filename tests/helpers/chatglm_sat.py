"""SwissArmyTransformer's ``ChatGLMModel`` (the library VisualGLM-6B runs on) as the ChatGLM oracle.

SAT is an optional test dependency: ``sat_or_skip`` skips a test where it is missing. SAT imports
``triton`` (a ``@triton.jit`` kernel that is never run on the CPU) and ``wandb`` (training only) when
it is imported; where they are not installed, ``install_stubs`` puts empty stand-ins in
``sys.modules`` so that the import succeeds. ``deepspeed`` is a real dependency of SAT's
``get_args`` and installs with it.

The weights go from our modules into SAT's through one explicit name table (``sat_pairs``) that
uses every parameter on both sides exactly once; SAT's GLM ``query_key_value`` is [Q|K|V]
contiguous, ours (the HF checkpoint's) per head [q_h|k_h|v_h], so those rows are permuted.
"""
from __future__ import annotations

import os
import random
import socket
import sys
import types
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn

from vlm2om.graphs.chatglm import ChatGLMConfig

SAT_REQUIREMENT = "SwissArmyTransformer==0.4.12"
# Small special ids for a tiny vocabulary (the real ones are 130000/130001/130004/130005/3).
MASK, GMASK, SOP, EOP, PAD = 119, 120, 121, 122, 3


def install_stubs() -> list[str]:
    """Empty ``triton``/``wandb`` modules where the real ones are not importable; returns the names stubbed."""
    stubbed = []
    try:
        import triton  # noqa: F401
    except ImportError:
        tr, tl = types.ModuleType("triton"), types.ModuleType("triton.language")
        tr.jit = lambda fn=None, **_: fn if fn is not None else (lambda f: f)
        tr.cdiv = lambda a, b: -(-a // b)
        tl.constexpr = object
        tr.language = tl
        sys.modules.update({"triton": tr, "triton.language": tl})
        stubbed.append("triton")
    try:
        import wandb  # noqa: F401
    except ImportError:
        sys.modules["wandb"] = types.ModuleType("wandb")
        stubbed.append("wandb")
    return stubbed


def sat_or_skip():
    """SAT's ``ChatGLMModel`` and ``get_args``, or a skip that says how to install them."""
    reason = f"SwissArmyTransformer (the ChatGLM oracle) is not installed: pip install '{SAT_REQUIREMENT}' requests"
    pytest.importorskip("deepspeed", reason=reason)
    import torch._dynamo  # noqa: F401  (it probes triton as it first loads: before any stub exists)

    stubbed = install_stubs()
    official = pytest.importorskip("sat.model.official", reason=reason)
    import sat

    for name in stubbed:  # SAT holds them now; left in sys.modules they mislead later probes
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    return official.ChatGLMModel, sat.get_args


@contextmanager
def single_process_env():
    """What SAT's get_args reads to set up a one-process gloo group; the caller's env and RNG
    states come back afterwards (get_args seeds torch, numpy and random)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    want = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "1", "RANK": "0",
            "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in want}
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    os.environ.update(want)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def build_sat_chatglm(cfg: ChatGLMConfig, ids: dict[str, int] | None = None) -> nn.Module:
    """A SAT ChatGLMModel of ``cfg``'s sizes, composed as VisualGLM's SAT config does (post
    layernorm order, which selects the GLM residual), on the CPU, fp32, without dropout.
    ``ids``: its special ids (``[MASK]``, ``[gMASK]``, ``<sop>``, ``<pad>``) where not this module's."""
    ids = {"[MASK]": MASK, "[gMASK]": GMASK, "<sop>": SOP, "<pad>": PAD, **(ids or {})}
    model_cls, get_args = sat_or_skip()
    import argparse

    parser = argparse.ArgumentParser()
    model_cls.add_model_specific_args(parser)
    argv = ["--mode", "inference", "--device", "-1", "--distributed-backend", "gloo",
            "--num-layers", str(cfg.layers), "--hidden-size", str(cfg.hidden),
            "--num-attention-heads", str(cfg.heads), "--vocab-size", str(cfg.vocab_size),
            "--inner-hidden-size", str(cfg.ffn), "--max-sequence-length", str(cfg.max_positions),
            "--layernorm-order", "post", "--layernorm-epsilon", str(cfg.ln_eps),
            "--hidden-dropout", "0", "--attention-dropout", "0", "--make-vocab-size-divisible-by", "1",
            "--bos-token-id", str(ids["<sop>"]), "--mask-token-id", str(ids["[MASK]"]),
            "--gmask-token-id", str(ids["[gMASK]"]), "--pad-token-id", str(ids["<pad>"])]
    with single_process_env():
        args = get_args(argv, parser=parser)
        model = model_cls(args)
    return model.eval()


LAYER_LEAVES = [f"{m}.{p}" for m in ("input_layernorm", "attention.query_key_value", "attention.dense",
                                     "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
                for p in ("weight", "bias")]


def sat_pairs(cfg: ChatGLMConfig, embed: str = "embed", group: str = "group") -> list[tuple[str, str]]:
    """(our name, SAT name) for an embedding ``embed`` and one group ``group`` of all layers."""
    pairs = [(f"{embed}.word_embeddings.weight", "transformer.word_embeddings.weight"),
             (f"{group}.final_layernorm.weight", "transformer.final_layernorm.weight"),
             (f"{group}.final_layernorm.bias", "transformer.final_layernorm.bias"),
             (f"{group}.lm_head.weight", "mixins.chatglm-final.lm_head.weight")]
    pairs += [(f"{group}.layers.{i}.{leaf}", f"transformer.layers.{i}.{leaf}")
              for i in range(cfg.layers) for leaf in LAYER_LEAVES]
    return pairs


def interleaved_to_contiguous(t: torch.Tensor, heads: int) -> torch.Tensor:
    """query_key_value rows (or bias) per head [q_h|k_h|v_h] -> [Q|K|V] (SAT's layout)."""
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def load_into_sat(ours: nn.Module, sat: nn.Module, cfg: ChatGLMConfig) -> None:
    """Copy our parameters into SAT by ``sat_pairs``: SAT is NaN-filled first, and every parameter
    on both sides must be named once, so nothing can be skipped silently."""
    src, dst = dict(ours.named_parameters()), dict(sat.named_parameters())
    pairs = sat_pairs(cfg)
    assert {o for o, _ in pairs} == set(src), f"ours not mapped: {set(src) - {o for o, _ in pairs}}"
    assert {s for _, s in pairs} == set(dst), f"SAT not mapped: {set(dst) - {s for _, s in pairs}}"
    with torch.no_grad():
        for p in dst.values():
            p.fill_(float("nan"))
        for o, s in pairs:
            value = src[o]
            if ".query_key_value." in o:
                value = interleaved_to_contiguous(value, cfg.heads)
            assert value.shape == dst[s].shape, f"{o} {tuple(value.shape)} -> {s} {tuple(dst[s].shape)}"
            dst[s].copy_(value)
    assert not [n for n, p in dst.items() if torch.isnan(p).any()]
    sat.eval()


def round_sat_inv_freq(sat: nn.Module) -> None:
    """The HF code's ``inv_freq.half()`` (SAT 0.4.12 keeps fp32): for rope_precision fp16_inv_freq."""
    rotary = sat.mixins["chatglm-attn"].rotary_emb
    rotary.inv_freq.copy_(rotary.inv_freq.half().float())
    rotary.max_seq_len_cached = None


def glm_positions(context: int, total: int) -> torch.Tensor:
    """[2, total] positions of a sequence whose [gMASK] is at ``context - 1`` and <sop> at ``context``:
    positions count in the context and stay at the [gMASK] index after it; block positions are 0 in
    the context and count 1, 2, ... from <sop> on (padding keeps counting)."""
    t = torch.arange(total)
    pos = torch.where(t < context, t, torch.full_like(t, context - 1))
    block = torch.where(t < context, torch.zeros_like(t), t - context + 1)
    return torch.stack([pos, block])


def glm_ids(context_tokens: list[int], generated: list[int]) -> torch.Tensor:
    """A VisualGLM-style sequence: text ids, [gMASK], <sop>, then the generated ids."""
    return torch.tensor([*context_tokens, GMASK, SOP, *generated])
