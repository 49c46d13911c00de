"""VisualGLM-6B's torch reference: ``BlipImageEvalProcessor`` with PIL, the prompt rendered as
VisualGLM's chat renders it, and ChatGLM-6B's tokenizer rules (``tokenization_chatglm.py``) over
the SentencePiece model, written here from those originals rather than through the runtime."""
from __future__ import annotations

import re

import torch

from vlm2om.exporters.verify.torch_reference import TorchReference, blip2_pixels


class VisualGLMReference(TorchReference):
    """``<img></img>问：{q0}\\n答：{r0}\\n问：{q}\\n答：``; the image goes at ``rfind("<img>") + 5``,
    each side encoded without special tokens, ``[gMASK] <sop>`` appended."""

    def __init__(self, modules, manifest: dict, tokenizer: bytes | None = None):
        import sentencepiece as spm

        super().__init__(modules, manifest, tokenizer)
        self.sp = spm.SentencePieceProcessor(model_proto=self.tokenizer)
        t = manifest["tokenizer"]
        self.offset, self.max_blank = t["id_offset"], t.get("max_blank", 80)
        self.suffix = [self.sp.PieceToId(p) + self.offset for p in ("[gMASK]", "<sop>")]

    def pixels(self, image) -> torch.Tensor:
        return blip2_pixels(image, self.pre)

    def prompt_text(self, turns: list[tuple[str, str | None]]) -> str:
        ask, answer = self.prompt["roles"]
        text = "<img></img>"
        for question, response in turns:
            text += f"{ask}{question}\n{answer}" + (f"{response}\n" if response is not None else "")
        return text

    def encode(self, text: str) -> list[int]:
        """SPTokenizer.encode: newlines to <n>; a tab to <|tab|>; space runs, longest first, to
        <|blank_k|> (k <= max_blank); SentencePiece; plus the image-token offset."""
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        text = re.sub(" {2,}", lambda m: self._blanks(len(m.group(0))), text)
        return [i + self.offset for i in self.sp.EncodeAsIds(text)]

    def _blanks(self, n: int) -> str:
        out = ""
        while n > 1:
            k = min(n, self.max_blank)
            out, n = out + f"<|blank_{k}|>", n - k
        return out + " " * n

    def prompt_ids(self, turns) -> list[list[int]]:
        text = self.prompt_text(turns)
        at = text.rfind("<img>") + len("<img>")
        return [self.encode(text[:at]), self.encode(text[at:]) + self.suffix]

    def text_ids(self, text: str) -> list[int]:
        return self.encode(text)
