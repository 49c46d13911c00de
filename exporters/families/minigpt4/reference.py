"""MiniGPT-4's torch reference: ``Blip2ImageEvalProcessor`` with PIL, and the Vicuna v0 prompt
rendered as ``Conversation.get_prompt`` and tokenized as ``Chat.get_context_emb`` do."""
from __future__ import annotations

import torch

from vlm2om.exporters.verify.torch_reference import TorchReference, blip2_pixels


class MiniGPT4Reference(TorchReference):
    """Vicuna v0 SINGLE-style prompt, each side of ``<ImageHere>`` tokenized on its own with
    BOS on the first only."""

    def __init__(self, modules, manifest: dict, tokenizer: bytes | None = None):
        import sentencepiece as spm

        super().__init__(modules, manifest, tokenizer)
        self.sp = spm.SentencePieceProcessor(model_proto=self.tokenizer)

    def pixels(self, image) -> torch.Tensor:
        """Resize((S, S), BICUBIC) -> ToTensor -> Normalize."""
        return blip2_pixels(image, self.pre)

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
