"""InternLM-XComposer2 (VL-7B and 4KHD-7B) as the remote code's ``chat`` computes it, rebuilt on
the ORIGINAL state dict (tests/helpers/ixc2_checkpoints.py) from installable parts and the
original's rules, sharing no code with vlm2om's graphs, loader or runtime:

- the tower: transformers' own ``CLIPVisionModel`` on the ``vit.vision_tower.vision_model.*``
  weights, ``hidden_states[-1][:, 1:]`` (``select_layer=-1``, CLS dropped);
- VL: ``Resize((S, S), BICUBIC)``, ToTensor, Normalize, the tower, ``vision_proj``;
- 4KHD: ``HD_transform`` of ``ixc_utils.py`` (the family reference's, written from it apart from
  the runtime's numpy path), ToTensor, Normalize, the global view by
  ``F.interpolate(bicubic)``, the row-major crops, the tower on all views at once, then
  ``build_mlp.py``'s merge and separator layout of the whole image, then ``vision_proj``;
- the LLM: transformers' ``LlamaForCausalLM`` with ``wqkv`` unpacked by its grouped row layout
  and Partial LoRA added by forward hooks on every projection, ``B(A(x)) * alpha / r`` on the
  rows where ``im_mask`` is 1, as ``PLoRA.forward`` does;
- the prompt of ``interleav_wrap_chat``: split at ``<ImageHere>``, each part through the
  tokenizer with BOS (the added tokens split out, the text between SentencePiece-encoded);
- greedy decoding with transformers' own KV cache, ``im_mask`` 0 on every generated token.
"""
from __future__ import annotations

import inspect
import re

import numpy as np
import sentencepiece as spm
import torch
import transformers as T
from PIL import Image
from torch import nn
from torch.nn import functional as F

from vlm2om.exporters.families.ixc2.reference import hd_transform as original_hd_transform
from tests.helpers.ixc2_checkpoints import ALPHAS, CLIP, LLM, PATHS, RANKS, ROPE_SCALING, VIT, grid

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
META = ("You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
        "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
        "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
        "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the "
        "user such as English and 中文.\n"
        "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based "
        "on the provided image.")
ADDED = ("[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]")


def original_hd_layout(feats: torch.Tensor, h: int, w: int, glb_GN: torch.Tensor, sub_GN: torch.Tensor):
    """build_mlp.py: [1 + h*w, N, C] tower tokens (global view first) -> [1, L, 4C] before vision_proj."""
    _, N, C = feats.shape
    H = int(N ** 0.5)
    glb = feats[:1].reshape(1, H, H, C).reshape(1, H // 2, 2, H // 2, 2, C).permute(0, 1, 3, 2, 4, 5)
    glb = glb.reshape(1, H // 2, H // 2, 4 * C)
    glb = torch.cat([glb, sub_GN.repeat(1, H // 2, 1, 1)], dim=2).reshape(1, -1, 4 * C)
    t = H // 2
    sub = feats[1:1 + h * w].reshape(h * w, H, H, C).reshape(h * w, t, 2, t, 2, C).permute(0, 1, 3, 2, 4, 5)
    sub = sub.reshape(h * w, -1, 4 * C).reshape(1, h, w, t, t, -1).permute(0, 1, 3, 2, 4, 5)
    sub = sub.reshape(1, h * t, w * t, 4 * C)
    sub = torch.cat([sub, sub_GN.repeat(1, h * t, 1, 1)], dim=2).reshape(1, -1, 4 * C)
    out = torch.cat([glb, glb_GN, sub], dim=1)
    assert out.shape[1] == (h * w + 1) * t * t + 1 + (h + 1) * t
    return out


def qkv_rows(heads: int, kv_heads: int, d: int) -> list[tuple[int, int, str, int, int]]:
    """(wqkv row start, stop, HF projection, its row start, stop): the rows are KV group after KV
    group, each [q_0 .. q_{p-1} | k | v] of head_dim rows (the remote code's
    ``rearrange('b q (h gs d) -> b q h gs d')``)."""
    p, table = heads // kv_heads, []
    for g in range(kv_heads):
        base = g * (p + 2) * d
        for j in range(p):
            table.append((base + j * d, base + (j + 1) * d, "q_proj", (g * p + j) * d, (g * p + j + 1) * d))
        table.append((base + p * d, base + (p + 1) * d, "k_proj", g * d, (g + 1) * d))
        table.append((base + (p + 1) * d, base + (p + 2) * d, "v_proj", g * d, (g + 1) * d))
    return table


# transformers 5.2x names the KV cache argument and output ``cache`` (``past_key_values`` before).
CACHE_ARG = "cache" if "cache" in inspect.signature(T.LlamaForCausalLM.forward).parameters else "past_key_values"
HF_LEAF = {"wo": "self_attn.o_proj", "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj"}


class OriginalIxc2:
    def __init__(self, state: dict[str, torch.Tensor], variant: str, tokenizer: bytes, hd_num: int = 25):
        self.variant, self.hd_num = variant, hd_num
        self.sp = spm.SentencePieceProcessor(model_proto=tokenizer)
        self.size = grid(variant) * CLIP["patch_size"]
        vit_cfg = {k: v for k, v in CLIP.items() if k != "image_size"}
        self.vit = T.CLIPVisionModel(T.CLIPVisionConfig(**vit_cfg, image_size=self.size)).eval()
        vit_state = {k.removeprefix(VIT): v for k, v in state.items() if k.startswith(VIT)}
        if any(k.startswith("vision_model.") for k in self.vit.state_dict()):  # transformers before 5
            vit_state = {"vision_model." + k: v for k, v in vit_state.items()}
        missing, unexpected = self.vit.load_state_dict(vit_state, strict=False)
        assert not missing and all(k.endswith("position_ids") for k in unexpected), (missing, unexpected)
        width = state["vision_proj.0.weight"].shape[1]
        self.proj = nn.Sequential(nn.Linear(width, LLM["hidden_size"]), nn.GELU(),
                                  nn.Linear(LLM["hidden_size"], LLM["hidden_size"])).eval()
        self.proj.load_state_dict({k.removeprefix("vision_proj."): v for k, v in state.items()
                                   if k.startswith("vision_proj.")})
        self.glb_GN, self.sub_GN = state.get("plora_glb_GN"), state.get("plora_sub_GN")
        self.llm = self._llama(state)
        self.mask = None  # [1, L] bool: PLoRA's rows in the running forward

    def _llama(self, state: dict) -> T.LlamaForCausalLM:
        c = LLM
        scaling = ROPE_SCALING[self.variant]
        rope = {"rope_type": "default", "rope_theta": c["rope_theta"]} if scaling is None else \
            {"rope_type": "dynamic", "factor": scaling["factor"], "rope_theta": c["rope_theta"]}
        hf = T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c["num_key_value_heads"], rms_norm_eps=c["rms_norm_eps"], rope_parameters=rope,
            max_position_embeddings=c["max_position_embeddings"], tie_word_embeddings=False, attention_bias=False,
            attn_implementation="eager")).eval()
        d = c["hidden_size"] // c["num_attention_heads"]
        sd = {"model.embed_tokens.weight": state["model.tok_embeddings.weight"],
              "model.norm.weight": state["model.norm.weight"], "lm_head.weight": state["output.weight"]}
        for i in range(c["num_hidden_layers"]):
            o, h = f"model.layers.{i}.", f"model.layers.{i}."
            sd[h + "input_layernorm.weight"] = state[o + "attention_norm.weight"]
            sd[h + "post_attention_layernorm.weight"] = state[o + "ffn_norm.weight"]
            for kind, leaf in HF_LEAF.items():
                sd[f"{h}{leaf}.weight"] = state[f"{o}{PATHS[kind]}.weight"]
            wqkv = state[o + "attention.wqkv.weight"]
            parts = {"q_proj": torch.empty(c["num_attention_heads"] * d, c["hidden_size"]),
                     "k_proj": torch.empty(c["num_key_value_heads"] * d, c["hidden_size"])}
            parts["v_proj"] = parts["k_proj"].clone()
            rows_of = {}
            for a, b, proj, s, e in qkv_rows(c["num_attention_heads"], c["num_key_value_heads"], d):
                parts[proj][s:e] = wqkv[a:b]
                rows_of.setdefault(proj, []).append((a, b, s, e))
            for proj, w in parts.items():
                sd[f"{h}self_attn.{proj}.weight"] = w
            self._hook_layer(hf.model.layers[i], state, o, rows_of)
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
        return hf

    def _hook_layer(self, layer, state: dict, prefix: str, qkv: dict) -> None:
        def hook(a: torch.Tensor, b: torch.Tensor, scale: float):
            def add(module, args, out):  # PLoRA on the prompt's pass only: a decode step has im_mask 0
                if self.mask is None or out.shape[1] != self.mask.shape[1] or not self.mask.any():
                    return out
                delta = (args[0] @ a.T) @ b.T * scale
                return out + delta * self.mask[..., None].to(out.dtype)
            return add

        for kind in ("wqkv", "wo", "w1", "w2", "w3"):
            a = state[f"{prefix}{PATHS[kind]}.Plora_A.weight"]
            b = state[f"{prefix}{PATHS[kind]}.Plora_B.weight"]
            assert a.shape[0] == RANKS[self.variant][kind]
            scale = ALPHAS[self.variant][kind] / RANKS[self.variant][kind]
            if kind != "wqkv":
                module = layer.get_submodule(HF_LEAF[kind])
                module.register_forward_hook(hook(a, b, scale))
                continue
            for proj, spans in qkv.items():  # B's rows of each projection, in its own row order
                rows = torch.empty(sum(e - s for *_, s, e in spans), b.shape[1])
                for r0, r1, s, e in spans:
                    rows[s:e] = b[r0:r1]
                layer.self_attn.get_submodule(proj).register_forward_hook(hook(a, rows, scale))

    @torch.no_grad()
    def image(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB")
        if self.variant == "vl":
            x = self._tensor(img.resize((self.size, self.size), Image.BICUBIC))
            feats = self.vit(x, output_hidden_states=True).hidden_states[-1][:, 1:]
            return self.proj(feats)[0]
        x = self._tensor(original_hd_transform(img, self.hd_num, self.size))
        s = self.size
        h, w = x.shape[2] // s, x.shape[3] // s
        crops = x.reshape(1, 3, h, s, w, s).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, s, s)
        glb = F.interpolate(x.float(), size=(s, s), mode="bicubic")
        feats = self.vit(torch.cat([glb, crops]), output_hidden_states=True).hidden_states[-1][:, 1:]
        return self.proj(original_hd_layout(feats, h, w, self.glb_GN, self.sub_GN))[0]

    @staticmethod
    def _tensor(img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
        return ((x - MEAN) / STD)[None]

    def prompt(self, history: list[tuple[str, str]], query: str, meta: str = META) -> str:
        """interleav_wrap_chat's text; the first query carries <ImageHere> (as the README passes it)."""
        p = f"[UNUSED_TOKEN_146]system\n{meta}[UNUSED_TOKEN_145]\n" if meta else ""
        for q, a in history:
            p += f"[UNUSED_TOKEN_146]user\n{q}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n{a}[UNUSED_TOKEN_145]\n"
        return p + f"[UNUSED_TOKEN_146]user\n{query}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"

    def tokenize(self, part: str) -> list[int]:
        """``tokenizer(part)``: BOS, then the added tokens as their ids and the text between encoded."""
        ids = [1]
        for chunk in re.split("(" + "|".join(map(re.escape, ADDED)) + ")", part):
            if chunk in ADDED:
                ids.append(self.sp.PieceToId(chunk))
            elif chunk:
                ids.extend(self.sp.EncodeAsIds(chunk))
        return ids

    def context(self, image_rows: torch.Tensor, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [L, H], im_mask [L] bool) of interleav_wrap_chat: each part, the image rows."""
        embed = self.llm.model.embed_tokens
        parts, embeds, mask = text.split("<ImageHere>"), [], []
        assert len(parts) == 2
        for i, part in enumerate(parts):
            if part:
                ids = torch.tensor([self.tokenize(part)])
                embeds.append(embed(ids)[0])
                mask.append(torch.zeros(ids.shape[1], dtype=torch.bool))
            if i == 0:
                embeds.append(image_rows)
                mask.append(torch.ones(len(image_rows), dtype=torch.bool))
        return torch.cat(embeds), torch.cat(mask)

    @torch.no_grad()
    def greedy(self, image_rows: torch.Tensor, text: str, steps: int) -> tuple[list[int], list[np.ndarray]]:
        """(tokens, the next-token logits before each)."""
        embed = self.llm.model.embed_tokens
        x, m = self.context(image_rows, text)
        out, logits = [], []
        self.mask = m[None]  # PLoRA on the prompt's image rows; every generated token has im_mask 0
        step = self.llm(inputs_embeds=x[None], use_cache=True)
        self.mask = None
        for _ in range(steps):
            logits.append(step.logits[0, -1].numpy())
            out.append(int(logits[-1].argmax()))
            step = self.llm(inputs_embeds=embed(torch.tensor([[out[-1]]])), use_cache=True,
                            **{CACHE_ARG: step[CACHE_ARG]})
        return out, logits

    @torch.no_grad()
    def beams(self, image_rows: torch.Tensor, text: str, steps: int, eos: list[int], **kwargs) -> list[int]:
        """The README's ``chat(..., do_sample=False, num_beams=n)``: transformers' own beam search."""
        x, m = self.context(image_rows, text)
        self.mask = m[None]
        try:
            out = self.llm.generate(inputs_embeds=x[None], attention_mask=torch.ones(1, len(x), dtype=torch.long),
                                    do_sample=False, max_new_tokens=steps, eos_token_id=eos, pad_token_id=eos[0],
                                    **kwargs)
        finally:
            self.mask = None
        return out[0].tolist()
