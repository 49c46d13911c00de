"""VisualGLM-6B composed from SwissArmyTransformer's public classes as its ``model/visualglm.py`` and
``model/blip2.py`` compose it (the whole-model oracle of the VisualGLM tests): SAT's ViT and Q-Former
(tests/helpers/sat_models.py), ``glm_proj`` as an ``nn.Linear``, and SAT's ``ChatGLMModel`` with a
mixin whose ``word_embedding_forward`` splices the image embeddings over the placeholder ids at
``pre_image``, as VisualGLM's ``ImageMixin`` does. SAT computes the prefix-LM mask and the 2-D
positions itself from the ids ([gMASK], <sop>), so none of our position or mask code is involved.

``from_reference`` copies the weights of a family's ``ReferenceModules`` (the tiny preset's) through
the explicit name tables of the SAT helpers, which use every parameter on both sides once.
"""
from __future__ import annotations

import torch
from torch import nn

from tests.helpers.chatglm_sat import build_sat_chatglm, load_into_sat, round_sat_inv_freq, sat_or_skip
from tests.helpers.sat_models import build_sat_qformer, build_sat_vit, copy_into_sat, qformer_pairs, vit_pairs
from vlm2om.graphs.chatglm import ChatGLMDecoderGroup


def _splice_mixin():
    from sat.model import BaseMixin

    class Splice(BaseMixin):
        """VisualGLM's ImageMixin with the image embeddings given: ids [pre, pre + n) are replaced."""

        def __init__(self):
            super().__init__()
            self.image, self.pre = None, 0

        def word_embedding_forward(self, input_ids, output_cross_layer=None, **kw):
            words = self.transformer.word_embeddings
            if self.image is None or self.pre + self.image.shape[1] > input_ids.shape[1]:
                return words(input_ids)
            before, _, after = torch.tensor_split(input_ids, [self.pre, self.pre + self.image.shape[1]], dim=1)
            return torch.cat([words(before), self.image, words(after)], dim=1)

    return Splice()


class SatVisualGLM:
    def __init__(self, vit, qformer, glm_proj: nn.Linear, glm, placeholder: int):
        self.vit, self.qformer, self.glm_proj, self.glm = vit, qformer, glm_proj, glm
        self.placeholder = placeholder  # SAT's chat fills the image slot with pad ids
        self.splice = _splice_mixin()
        glm.add_mixin("image-splice", self.splice)

    @classmethod
    def from_reference(cls, modules, vision_cfg, qformer_cfg, special: dict[str, int]) -> "SatVisualGLM":
        sat_or_skip()
        vision, bridge = modules.image  # the tiny preset: one vision graph, then the bridge
        vit, qformer = build_sat_vit(vision_cfg), build_sat_qformer(qformer_cfg)
        copy_into_sat(vision, vit, vit_pairs(vision_cfg))
        copy_into_sat(bridge.encoder, qformer, qformer_pairs(qformer_cfg))
        proj = bridge.projector.proj
        glm_proj = nn.Linear(proj.in_features, proj.out_features)
        glm_proj.load_state_dict(proj.state_dict())
        cfg = modules.llama
        whole = ChatGLMDecoderGroup(cfg, 0, cfg.layers, kv_layout="per_layer")
        for g in modules.groups:
            for j, layer in enumerate(g.layers):
                whole.layers[g.start + j].load_state_dict(layer.state_dict())
            if g.is_last:
                whole.final_layernorm.load_state_dict(g.final_layernorm.state_dict())
                whole.lm_head.load_state_dict(g.lm_head.state_dict())
        glm = build_sat_chatglm(cfg, special)
        load_into_sat(nn.ModuleDict({"embed": modules.embed, "group": whole}), glm, cfg)
        if cfg.rope_precision != "fp32":
            round_sat_inv_freq(glm)  # modeling_chatglm.py's inv_freq.half()
        return cls(vit.eval(), qformer.eval(), glm_proj.eval(), glm.eval(), special["<pad>"])

    @torch.no_grad()
    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """BLIP2.forward: glm_proj(qformer(vit(image)))."""
        return self.glm_proj(self.qformer(self.vit(pixels)[0])[0])

    @torch.no_grad()
    def greedy(self, pixels: torch.Tensor, before: list[int], after: list[int], steps: int) -> list[int]:
        """Greedy tokens after ``before`` + the image slot + ``after`` (which ends [gMASK] <sop>),
        recomputing the whole sequence through SAT every step (SAT's own masks and positions)."""
        self.splice.image = self.image_embeds(pixels)
        self.splice.pre = len(before)
        ids = [*before, *[self.placeholder] * self.splice.image.shape[1], *after]
        out = []
        for _ in range(steps):
            logits = self.glm(input_ids=torch.tensor([ids]))[0][0, -1]
            out.append(int(torch.argmax(logits)))
            ids.append(out[-1])
        return out
