"""SwissArmyTransformer's public ``ViTModel``/``BaseModel`` composed as VisualGLM-6B's ``blip2.py`` does
(the oracle for graphs/sat_vit.py and graphs/sat_qformer.py), and the name tables that copy our
random weights into them.

- The ViT: SAT's ``ViTModel`` (its patch-embedding and position mixins kept) with the ``cls``
  mixin swapped for one whose ``final_forward`` is ``ln_vision`` (nn.LayerNorm, eps 1e-5), fed
  ``input_ids = zeros(B, 1)`` (the CLS row) and a full ``[[1.]]`` mask.
- The Q-Former: a ``BaseModel`` with layernorm_order "post", ``is_decoder`` true on even layers,
  no position embeddings, identity ``final_forward``, fed ``input_ids = arange(num_query)``.
Both are built with ``Model.get_args(**kw)`` + ``Model(args)`` (SAT's model-only mode), on the
CPU in fp32 without dropout. SAT-missing skips come from ``sat_or_skip``.
"""
from __future__ import annotations


import torch
from torch import nn

from tests.helpers.chatglm_sat import single_process_env, sat_or_skip
from vlm2om.graphs.eva_vit import EvaVitConfig
from vlm2om.graphs.qformer import QFormerConfig

SAT_LAYER = ("input_layernorm", "attention.query_key_value", "attention.dense", "post_attention_layernorm",
             "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
SAT_CROSS = ("cross_attention.query", "cross_attention.key_value", "cross_attention.dense",
             "post_cross_attention_layernorm")


def _sat():
    sat_or_skip()
    from sat.model import BaseMixin, BaseModel, ViTModel

    return BaseMixin, BaseModel, ViTModel


def _classes():
    """The two VisualGLM-style SAT models (defined lazily: SAT may be missing)."""
    BaseMixin, BaseModel, ViTModel = _sat()

    class LnVision(BaseMixin):
        def __init__(self, width: int):
            super().__init__()
            self.ln_vision = nn.LayerNorm(width)

        def final_forward(self, logits, **kw):
            return self.ln_vision(logits)

    class Vit(ViTModel):
        def __init__(self, args):
            super().__init__(args)
            self.del_mixin("cls")
            self.add_mixin("cls", LnVision(args.hidden_size))

        def forward(self, image):
            ids = torch.zeros(image.shape[0], 1, dtype=torch.long)
            return super().forward(input_ids=ids, position_ids=None, attention_mask=torch.ones(1, 1), image=image)

    class QFormer(BaseModel):
        def __init__(self, args):
            super().__init__(args, activation_func=nn.functional.gelu)
            self.transformer.position_embeddings = None

        def final_forward(self, logits, **kw):
            return logits

        def position_embedding_forward(self, position_ids, **kw):
            return None

        def forward(self, encoder_outputs):
            b, n = encoder_outputs.shape[0], self.transformer.word_embeddings.weight.shape[0]
            ids = torch.arange(n).expand(b, -1)
            full = torch.ones(1, 1)
            return super().forward(input_ids=ids, position_ids=None, attention_mask=full,
                                   encoder_outputs=encoder_outputs, cross_attention_mask=full)

    return Vit, QFormer


COMMON_ARGS = dict(hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=1, skip_init=False)


def build_sat_vit(cfg: EvaVitConfig) -> nn.Module:
    """VisualGLM's EVA args at ``cfg``'s sizes."""
    vit_cls, _ = _classes()
    args = vit_cls.get_args(num_layers=cfg.depth, hidden_size=cfg.width, num_attention_heads=cfg.heads,
                            vocab_size=1, layernorm_order="pre", inner_hidden_size=cfg.mlp_dim,
                            use_final_layernorm=False, layernorm_epsilon=cfg.eps,
                            image_size=[cfg.image_size, cfg.image_size], pre_len=1, post_len=0,
                            patch_size=cfg.patch_size, in_channels=3, **COMMON_ARGS)
    with single_process_env():
        return vit_cls(args).eval()


def build_sat_qformer(cfg: QFormerConfig) -> nn.Module:
    """VisualGLM's qformer args at ``cfg``'s sizes (use_final_layernorm left at SAT's default, True)."""
    _, qf_cls = _classes()
    args = qf_cls.get_args(num_layers=cfg.layers, hidden_size=cfg.hidden, num_attention_heads=cfg.heads,
                           vocab_size=cfg.num_query, layernorm_order="post", inner_hidden_size=cfg.ffn,
                           layernorm_epsilon=cfg.eps, max_sequence_length=cfg.num_query,
                           is_decoder=[cfg.has_cross(i) for i in range(cfg.layers)],
                           cross_attn_hidden_size=cfg.encoder_width, **COMMON_ARGS)
    with single_process_env():
        return qf_cls(args).eval()


def _leaves(names) -> list[str]:
    return [f"{n}.{p}" for n in names for p in ("weight", "bias")]


def vit_pairs(cfg: EvaVitConfig) -> list[tuple[str, str]]:
    """(our name, SAT name) for a whole ``SatEvaVisionEncoder``."""
    pairs = [("word_embeddings.weight", "transformer.word_embeddings.weight"),
             ("position_embeddings.weight", "transformer.position_embeddings.weight"),
             ("patch_embedding.proj.weight", "mixins.patch_embedding.proj.weight"),
             ("patch_embedding.proj.bias", "mixins.patch_embedding.proj.bias"),
             ("ln_vision.weight", "mixins.cls.ln_vision.weight"),
             ("ln_vision.bias", "mixins.cls.ln_vision.bias")]
    return pairs + [(f"layers.{i}.{leaf}", f"transformer.layers.{i}.{leaf}")
                    for i in range(cfg.depth) for leaf in _leaves(SAT_LAYER)]


def qformer_pairs(cfg: QFormerConfig) -> list[tuple[str, str]]:
    """(our name, SAT name) for a ``SatQFormer``; cross-attention names on even layers only."""
    pairs = [("word_embeddings.weight", "transformer.word_embeddings.weight"),
             ("final_layernorm.weight", "transformer.final_layernorm.weight"),
             ("final_layernorm.bias", "transformer.final_layernorm.bias")]
    for i in range(cfg.layers):
        leaves = _leaves(SAT_LAYER + (SAT_CROSS if cfg.has_cross(i) else ()))
        pairs += [(f"layers.{i}.{leaf}", f"transformer.layers.{i}.{leaf}") for leaf in leaves]
    return pairs


def copy_into_sat(ours: nn.Module, sat: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Our parameters into SAT's by ``pairs``: SAT is NaN-filled first, and every parameter on both
    sides must be named exactly once, so nothing is skipped silently; shapes must agree as they are."""
    src, dst = dict(ours.named_parameters()), dict(sat.named_parameters())
    mine, theirs = [o for o, _ in pairs], [s for _, s in pairs]
    assert len(set(mine)) == len(mine) and len(set(theirs)) == len(theirs), "a name is mapped twice"
    assert set(mine) == set(src), f"ours not mapped: {set(src) - set(mine)}; unknown: {set(mine) - set(src)}"
    assert set(theirs) == set(dst), f"SAT not mapped: {set(dst) - set(theirs)}; unknown: {set(theirs) - set(dst)}"
    with torch.no_grad():
        for p in dst.values():
            p.fill_(float("nan"))
        for o, s in pairs:
            assert src[o].shape == dst[s].shape, f"{o} {tuple(src[o].shape)} -> {s} {tuple(dst[s].shape)}"
            dst[s].copy_(src[o])
    assert not [n for n, p in dst.items() if torch.isnan(p).any()]
    sat.eval()
