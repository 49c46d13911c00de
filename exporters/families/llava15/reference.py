"""LLaVA-1.5's torch reference, as its evaluation runs: ``expand2square`` with the mean colour,
then transformers' CLIPImageProcessor; the ``vicuna_v1``/``llava_v1`` prompt (FastChat
SEP_STYLE.TWO) with ``"<image>\\n"`` before the first question; ``tokenizer_image_token`` over
transformers' LlamaTokenizer (each chunk tokenized with BOS, later chunks' BOS dropped)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from PIL import Image

from vlm2om.runtime.errors import InputError

from vlm2om.exporters.verify.torch_reference import TorchReference, rgb


class LlavaReference(TorchReference):
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
        img = rgb(image)
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
