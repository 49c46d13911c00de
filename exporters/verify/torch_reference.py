"""What every family's PyTorch reference pipeline shares (each family's own is its
``reference.py``, found through the family registry's ``make_reference``).

A reference is written independently of the runtime, the way the original code does it:
preprocessing with PIL (or the processor the family uses), the prompt rendered and tokenized
as the family's own conversation code does, and generation that recomputes the whole sequence
every step (no KV cache, no gears, no padding), so a mismatch points at the runtime's cache,
gear, splice or prompt logic.

A turn is ``(question, answer)``; the last turn's answer is None (the one being asked).
"""
from __future__ import annotations

import torch
from PIL import Image


class TorchReference:
    """What every family shares: image embeddings, full-recompute logits, greedy decoding."""

    def __init__(self, modules, manifest: dict, tokenizer: bytes | None = None):
        self.m = modules  # None where only pixels and prompt ids are asked (export --golden)
        self.tokenizer = tokenizer if tokenizer is not None else modules.tokenizer
        self.prompt = manifest["prompt"]
        # The graphs' dtype (a module's first parameter may be an fp32 LayerNorm in an fp16 graph).
        self.dtype = getattr(torch, manifest.get("dtype", "float32"))
        self.pre = {s["op"]: s for s in manifest["preprocess"]["steps"]}

    def pixels(self, image) -> torch.Tensor:
        """An image (path or PIL) as the model's pixel_values [1, 3, H, W] float32."""
        raise NotImplementedError

    def prompt_ids(self, turns: list[tuple[str, str | None]]) -> list[list[int]]:
        """Token ids of the text before and after the image."""
        raise NotImplementedError

    def text_ids(self, text: str) -> list[int]:
        """``text`` alone, as an answer's tokens (no BOS)."""
        raise NotImplementedError

    @torch.no_grad()
    def image_embeds(self, path) -> torch.Tensor:
        return self.m.image(self.pixels(path).to(self.dtype))[0]

    @torch.no_grad()
    def context(self, image, turns) -> torch.Tensor:
        before, after = self.prompt_ids(turns)
        emb = self.m.embed
        return torch.cat([emb(torch.tensor([before]))[0], self.image_embeds(image), emb(torch.tensor([after]))[0]])

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor, prompt: int | None = None) -> torch.Tensor:
        """Full recompute: [T, H] -> logits [T, V]; the first ``prompt`` positions are the prompt
        (a prefix-LM kind attends over them both ways; None: all of them)."""
        x = embeds[None]
        for g in self.m.groups:
            x = self.m.spec.reference_forward(g, x, prompt=prompt)
        return x[0]

    @torch.no_grad()
    def greedy(self, image, turns, new_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy tokens (no EOS stop) and the top-1 vs top-2 logit margin at each step."""
        embeds = self.context(image, turns)
        prompt = embeds.shape[0]
        tokens, margins = [], []
        for _ in range(new_tokens):
            logits = self.logits(embeds, prompt)[-1]
            top = torch.topk(logits, 2).values
            tok = int(torch.argmax(logits))
            tokens.append(tok)
            margins.append(float(top[0] - top[1]))
            embeds = torch.cat([embeds, self.m.embed(torch.tensor([[tok]]))[0]])
        return tokens, margins


def blip2_pixels(image, pre: dict) -> torch.Tensor:
    """BLIP-2's ``Blip2ImageEvalProcessor``/``BlipImageEvalProcessor`` with PIL: Resize((S, S),
    BICUBIC) -> ToTensor -> Normalize, as [1, 3, S, S] (``pre``: the manifest's steps by op)."""
    import numpy as np

    size, norm = pre["resize"]["size"], pre["normalize"]
    img = rgb(image).resize(tuple(size), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
    mean, std = (torch.tensor(norm[k])[:, None, None] for k in ("mean", "std"))
    return ((x - mean) / std)[None]


def rgb(image) -> Image.Image:
    """A path or a PIL image, as RGB."""
    return (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")
