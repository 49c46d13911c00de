"""Our seeded weights copied into transformers' models by explicit name maps, and compared.

transformers' modules are the oracles that nobody here wrote: the graphs/ tests load the SAME
weights into both and compare outputs. ``load_mapped`` NaN-fills every HF parameter and demands a
map that uses each parameter on both sides once, so no weight can be skipped silently.
"""
from __future__ import annotations

import torch
import transformers as T
from torch import nn

from vlm2om.graphs.common import init_random_

ATOL = 1e-4
CLIP_TINY = dict(image_size=56, patch_size=14, width=32, layers=3, heads=4, mlp_dim=64)


def randomize(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """init_random_, then jitter the norms too (init_random_ leaves them at 1/0, which would hide
    a swapped norm in the name map)."""
    init_random_(module, seed, std)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name.lower() or "ln_" in name.lower() or "LayerNorm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


def load_mapped(ours: nn.Module, hf: nn.Module, pairs) -> None:
    """pairs: (our_name | None, hf_name | None, slice | None). our None = zeros (EVA k-bias);
    hf None = our parameter is fed to HF as an input instead (Q-Former query tokens)."""
    src, dst = dict(ours.named_parameters()), dict(hf.named_parameters())
    used_src = [o for o, _, _ in pairs if o is not None]
    used_dst = {h for _, h, _ in pairs if h is not None}
    assert len(used_src) == len(set(used_src)), "an our-side parameter is mapped twice"
    assert set(used_src) == set(src), f"unmapped ours: {set(src) - set(used_src)}, " \
                                      f"unknown: {set(used_src) - set(src)}"
    assert used_dst == set(dst), f"unmapped HF: {set(dst) - used_dst}, unknown: {used_dst - set(dst)}"
    with torch.no_grad():
        for p in dst.values():
            p.fill_(float("nan"))
        for o, h, sl in pairs:
            if h is None:
                continue
            target = dst[h] if sl is None else dst[h][sl]
            value = torch.zeros_like(target) if o is None else src[o]
            assert value.shape == target.shape, f"{o} {tuple(value.shape)} -> {h} {tuple(target.shape)}"
            target.copy_(value)
    left = [n for n, p in dst.items() if torch.isnan(p).any()]
    assert not left, f"HF parameters (partly) not written: {left}"
    hf.eval()


def close(ours: torch.Tensor, ref: torch.Tensor, what: str, atol: float = ATOL) -> float:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.3e} > {atol:.0e}"
    return diff


def hf_clip_config(**over) -> T.CLIPVisionConfig:
    return T.CLIPVisionConfig(
        hidden_size=CLIP_TINY["width"], intermediate_size=CLIP_TINY["mlp_dim"], num_hidden_layers=CLIP_TINY["layers"],
        num_attention_heads=CLIP_TINY["heads"], image_size=CLIP_TINY["image_size"], patch_size=CLIP_TINY["patch_size"],
        hidden_act="quick_gelu", layer_norm_eps=1e-5, attn_implementation="eager", **over)


def jitter_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, norms included (an all-ones norm would hide a swapped name)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(base + torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


def load_by_prefix(ours: torch.nn.Module, theirs: dict, prefixes: dict[str, str]) -> set[str]:
    """Load ``ours`` from a transformers state dict by swapping name prefixes (theirs -> ours);
    return the transformers keys left unused. transformers 4.x nests CLIP under ``vision_model.``
    (as the checkpoints do), 5.x does not: that level is dropped first."""
    mapped = {}
    for original, value in theirs.items():
        key = original.replace("vision_model.", "", 1) if original.startswith(("vision_model.", "vision_tower.")) \
            else original
        for theirs_prefix, ours_prefix in prefixes.items():
            if key.startswith(theirs_prefix):
                mapped[ours_prefix + key[len(theirs_prefix):]] = (original, value)
    want = ours.state_dict()
    missing = set(want) - set(mapped)
    assert not missing, f"our parameters with no transformers counterpart: {sorted(missing)}"
    ours.load_state_dict({k: mapped[k][1] for k in want}, strict=True)
    return set(theirs) - {mapped[k][0] for k in want}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} vs {tuple(b.shape)}"
    return (a - b).abs().max().item()
