"""The PyTorch reference pipelines a bundle is checked against end to end.

Written independently of the runtime, family by family, the way the original code does it:
preprocessing with PIL (and transformers' CLIPImageProcessor for LLaVA), the prompt rendered
and tokenized as MiniGPT-4's ``Conversation.get_prompt``/``get_context_emb`` or LLaVA's
``conv.get_prompt``/``tokenizer_image_token`` do, and generation that recomputes the whole
sequence every step (no KV cache, no gears, no padding), so a mismatch points at the
runtime's cache, gear, splice or prompt logic.

A turn is ``(question, answer)``; the last turn's answer is None (the one being asked).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlm2om.runtime.errors import InputError


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
    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """Full recompute: [T, H] -> logits [T, V]."""
        x = embeds[None]
        for g in self.m.groups:
            x = run_group(g, x)
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


@torch.no_grad()
def run_group(group, x: torch.Tensor) -> torch.Tensor:
    """A decoder group over a whole sequence [1, T, H] with an empty cache (causal attention only)."""
    cfg = group.cfg
    past = torch.zeros(group.stop - group.start, 2, 1, cfg.kv_heads, 0, cfg.head_dim, dtype=x.dtype)
    return group(x, torch.arange(x.shape[1])[None], torch.zeros(1, 0), past)[0]


def _rgb(image) -> Image.Image:
    return (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")


def _normalize(x: torch.Tensor, step: dict) -> torch.Tensor:
    mean = torch.tensor(step["mean"])[:, None, None]
    std = torch.tensor(step["std"])[:, None, None]
    return ((x - mean) / std)[None]


class MiniGPT4Reference(TorchReference):
    """Blip2ImageEvalProcessor; Vicuna v0 SINGLE-style prompt, each side of ``<ImageHere>``
    tokenized on its own with BOS on the first only."""

    def __init__(self, modules, manifest: dict, tokenizer: bytes | None = None):
        import sentencepiece as spm

        super().__init__(modules, manifest, tokenizer)
        self.sp = spm.SentencePieceProcessor(model_proto=self.tokenizer)

    def pixels(self, image) -> torch.Tensor:
        size = self.pre["resize"]["size"]
        img = _rgb(image).resize(tuple(size), Image.BICUBIC)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
        return _normalize(x, self.pre["normalize"])

    def prompt_text(self, turns: list[tuple[str, str | None]]) -> str:
        """The first question carries the image message."""
        p = self.prompt
        text = p["system"] + p["sep"]
        for i, (question, answer) in enumerate(turns):
            q = f"{p['image_message']} {question}" if i == 0 else question
            text += p["roles"][0] + q + p["sep"] + p["roles"][1]
            if answer:  # an empty answer renders as none, as FastChat's ``if message`` does
                text = text + answer + p["sep"]
        return text

    def prompt_ids(self, turns) -> list[list[int]]:
        seg0, seg1 = self.prompt_text(turns).split(self.prompt["image_placeholder"])
        return [[1] + self.sp.EncodeAsIds(seg0), self.sp.EncodeAsIds(seg1)]

    def text_ids(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)


class LlavaReference(TorchReference):
    """LLaVA-1.5's evaluation: ``expand2square`` with the mean colour, then transformers'
    CLIPImageProcessor; the ``vicuna_v1``/``llava_v1`` prompt (FastChat SEP_STYLE.TWO) with
    ``"<image>\\n"`` before the first question; ``tokenizer_image_token`` over transformers'
    LlamaTokenizer (each chunk tokenized with BOS, later chunks' BOS dropped)."""

    def __init__(self, modules, manifest: dict, tokenizer: bytes | None = None):
        try:
            import transformers as T
        except ImportError as e:
            raise InputError(f"the LLaVA-1.5 reference tokenizes and preprocesses with transformers, as LLaVA "
                             f"does ({e}): pip install 'vlm2om[reference]'") from None
        try:  # transformers 5 names the PIL implementation apart; 4.x has only that one
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
        except ImportError:
            from transformers import CLIPImageProcessor as Processor
        super().__init__(modules, manifest, tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tokenizer.model").write_bytes(self.tokenizer)
            try:
                self.tok = T.LlamaTokenizer.from_pretrained(tmp, legacy=bool(self.prompt.get("legacy", False)),
                                                            add_bos_token=True, add_eos_token=False)
            except (ImportError, OSError, ValueError) as e:
                raise InputError(f"transformers' LlamaTokenizer cannot read the bundle's tokenizer.model: "
                                 f"{e}") from None
        size, norm = self.pre["resize_shortest"]["size"], self.pre["normalize"]
        self.processor = Processor(size={"shortest_edge": size}, crop_size=self.pre["center_crop"]["size"],
                                               image_mean=norm["mean"], image_std=norm["std"])

    def pixels(self, image) -> torch.Tensor:
        img = _rgb(image)
        if "pad_to_square" in self.pre:  # LLaVA's expand2square
            w, h = img.size
            square = Image.new("RGB", (max(w, h),) * 2, tuple(self.pre["pad_to_square"]["fill"]))
            square.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
            img = square
        return torch.from_numpy(self.processor(img, return_tensors="np")["pixel_values"])

    def prompt_text(self, turns: list[tuple[str, str | None]]) -> str:
        p = self.prompt
        text = p["system"] + p["sep"]
        for i, (question, answer) in enumerate(turns):
            q = "<image>\n" + question if i == 0 else question
            text += f"{p['roles'][0]}: {q}{p['sep']}{p['roles'][1]}:"
            if answer:
                text += f" {answer}{p['sep2']}"
        return text

    def prompt_ids(self, turns) -> list[list[int]]:
        chunks = [self.tok(c).input_ids for c in self.prompt_text(turns).split("<image>")]
        offset = int(chunks[0][:1] == [self.tok.bos_token_id])
        return [chunks[0], *(c[offset:] for c in chunks[1:])]

    def text_ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids


REFERENCES = {"minigpt4": MiniGPT4Reference, "llava15": LlavaReference}


def make_reference(modules, manifest: dict, tokenizer: bytes | None = None) -> TorchReference:
    """The reference pipeline of the bundle's family (``modules`` None: pixels and prompt ids only)."""
    family = manifest.get("family")
    if family not in REFERENCES:
        raise InputError(f"no PyTorch reference pipeline for {family} bundles (available: {', '.join(REFERENCES)})")
    return REFERENCES[family](modules, manifest, tokenizer)
