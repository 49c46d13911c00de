"""The PyTorch reference pipeline a bundle is checked against end to end.

Written independently of the runtime: torch preprocessing, the prompt assembled the way
MiniGPT-4's ``Conversation.get_prompt`` / ``get_context_emb`` do, and generation that
recomputes the whole sequence every step (no KV cache, no gears, no padding), so a
mismatch points at the runtime's cache, gear or splice logic.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class TorchReference:
    def __init__(self, modules, manifest: dict):
        import sentencepiece as spm

        self.m = modules
        self.prompt = manifest["prompt"]
        self.pre = {s["op"]: s for s in manifest["preprocess"]["steps"]}
        self.sp = spm.SentencePieceProcessor(model_proto=modules.tokenizer)

    def pixels(self, path) -> torch.Tensor:
        size = self.pre["resize"]["size"]
        img = Image.open(path).convert("RGB").resize(tuple(size), Image.BICUBIC)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.pre["normalize"]["mean"])[:, None, None]
        std = torch.tensor(self.pre["normalize"]["std"])[:, None, None]
        return ((x - mean) / std)[None]

    @torch.no_grad()
    def image_embeds(self, path) -> torch.Tensor:
        return self.m.bridge(self.m.vision(self.pixels(path)))[0]

    def prompt_text(self, turns: list[tuple[str, str | None]]) -> str:
        """Vicuna v0 SINGLE style; the first question carries the image message."""
        p = self.prompt
        text = p["system"] + p["sep"]
        for i, (question, answer) in enumerate(turns):
            q = f"{p['image_message']} {question}" if i == 0 else question
            text += p["roles"][0] + q + p["sep"] + p["roles"][1]
            if answer is not None:
                text = text + answer + p["sep"]
        return text

    @torch.no_grad()
    def context(self, image, turns) -> torch.Tensor:
        seg0, seg1 = self.prompt_text(turns).split(self.prompt["image_placeholder"])
        ids0 = torch.tensor([[1] + self.sp.EncodeAsIds(seg0)])  # BOS on the first segment only
        ids1 = torch.tensor([self.sp.EncodeAsIds(seg1)])
        emb = self.m.embed
        return torch.cat([emb(ids0)[0], self.image_embeds(image), emb(ids1)[0]])

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """Full recompute: [T, H] -> logits [T, V]."""
        x = embeds[None]
        pos = torch.arange(x.shape[1])[None]
        for g in self.m.groups:
            cfg = g.cfg
            past = torch.zeros(g.stop - g.start, 2, 1, cfg.kv_heads, 0, cfg.head_dim, dtype=x.dtype)
            x, _ = g(x, pos, torch.zeros(1, 0), past)
        return x[0]

    @torch.no_grad()
    def greedy(self, image, turns, new_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy tokens (no EOS stop) and the top-1 vs top-2 logit margin at each step."""
        embeds = self.context(image, turns)
        tokens, margins = [], []
        for _ in range(new_tokens):
            logits = self.logits(embeds)[-1]
            top = torch.topk(logits, 2).values
            tok = int(torch.argmax(logits))
            tokens.append(tok)
            margins.append(float(top[0] - top[1]))
            embeds = torch.cat([embeds, self.m.embed(torch.tensor([[tok]]))[0]])
        return tokens, margins
