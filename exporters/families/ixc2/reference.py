"""InternLM-XComposer2's torch reference, as its ``chat`` runs: the image preprocessed with PIL
(VL: Resize((S, S), bicubic); 4KHD: HD_transform, the global view by bicubic interpolation of the
normalised tensor, the row-major crops, the views laid out with their separators), the prompt of
``interleav_wrap_chat`` with every text part tokenized on its own with BOS and the chat pieces split
out, and PLoRA switched on exactly at the image positions; written from those rules here, apart
from the runtime's numpy path."""
from __future__ import annotations

import math
import re

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from vlm2om.exporters.verify.torch_reference import TorchReference, rgb


def hd_transform(img: Image.Image, hd_num: int, size: int) -> Image.Image:
    """``HD_transform``: the largest crop grid of at most ``hd_num`` views keeping the aspect, a
    bilinear resize, white padding of the short side to a multiple of ``size`` (centred)."""
    width, height = img.size
    trans = width < height
    if trans:
        img = img.transpose(Image.TRANSPOSE)
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * size)
    new_h = int(new_w / ratio)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    target = int(math.ceil(new_h / size) * size)
    top = int((target - new_h) / 2)
    canvas = Image.new("RGB", (new_w, target), (255, 255, 255))
    canvas.paste(img, (0, top))
    return canvas.transpose(Image.TRANSPOSE) if trans else canvas


class Ixc2Reference(TorchReference):
    def __init__(self, modules, manifest: dict, tokenizer: bytes | None = None):
        import sentencepiece as spm

        super().__init__(modules, manifest, tokenizer)
        self.sp = spm.SentencePieceProcessor(model_proto=self.tokenizer)
        self.assembly = manifest["pipeline"].get("image_assembly")
        p = self.prompt
        self.split = re.compile("(" + "|".join(re.escape(t) for t in p["specials"]) + ")")
        self.image_mask = None  # [T] of the last context: 1 on its image positions

    def pixels(self, image) -> torch.Tensor:
        img, norm = rgb(image), self.pre["normalize"]
        if "hd_transform" in self.pre:
            step = self.pre["hd_transform"]
            img = hd_transform(img, step["hd_num"], step["size"])
        else:
            img = img.resize(tuple(self.pre["resize"]["size"]), Image.BICUBIC)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
        mean, std = (torch.tensor(norm[k])[:, None, None] for k in ("mean", "std"))
        return ((x - mean) / std)[None]

    @torch.no_grad()
    def image_embeds(self, image) -> torch.Tensor:
        x = self.pixels(image)
        if not self.assembly:
            return self.m.image(x.to(self.dtype))[0]
        a = self.assembly
        s, t = a["view_size"], a["tokens_per_side"]
        h, w = x.shape[2] // s, x.shape[3] // s
        glb = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False)
        crops = x.reshape(1, 3, h, s, w, s).permute(0, 2, 4, 1, 3, 5).reshape(h * w, 3, s, s)
        views = torch.cat([self.m.image(v[None].to(self.dtype)) for v in torch.cat([glb, crops])])
        tokens, glb_sep, row_sep = views[:, :t * t], views[0, a["global_separator_row"]], views[0, a["row_separator_row"]]
        c = tokens.shape[-1]
        seps = row_sep.expand(t, 1, c)
        g = torch.cat([tokens[0].reshape(t, t, c), seps], dim=1).reshape(-1, c)
        sub = tokens[1:].reshape(h, w, t, t, c).permute(0, 2, 1, 3, 4).reshape(h * t, w * t, c)
        sub = torch.cat([sub, row_sep.expand(h * t, 1, c)], dim=1).reshape(-1, c)
        return torch.cat([g, glb_sep[None], sub])

    def prompt_text(self, turns: list[tuple[str, str | None]]) -> str:
        p = self.prompt
        b, e = p["begin"], p["end"]
        text = f"{b}{p['system_role']}\n{p['system']}{e}\n" if p["system"] else ""
        for i, (question, answer) in enumerate(turns):
            q = p["image_placeholder"] + question if i == 0 else question
            text += f"{b}{p['roles'][0]}\n{q}{e}\n{b}{p['roles'][1]}\n"
            if answer is not None:
                text += f"{answer}{e}\n"
        return text

    def encode(self, part: str) -> list[int]:
        """One text part: the chat pieces as their ids, each chunk between them SentencePiece-encoded."""
        ids = []
        for j, chunk in enumerate(self.split.split(part)):
            if j % 2:
                ids.append(int(self.prompt["specials"][chunk]))
            elif chunk:
                ids.extend(self.sp.EncodeAsIds(chunk))
        return ids

    def prompt_ids(self, turns) -> list[list[int]]:
        return [[1, *self.encode(part)] if part else [] for part in
                self.prompt_text(turns).split(self.prompt["image_placeholder"])]

    def text_ids(self, text: str) -> list[int]:
        return self.encode(text)

    @torch.no_grad()
    def context(self, image, turns) -> torch.Tensor:
        before, after = self.prompt_ids(turns)
        emb, img = self.m.embed, self.image_embeds(image)
        parts = [emb(torch.tensor([ids]))[0] for ids in (before, after)]
        self.image_mask = torch.cat([torch.zeros(len(before)), torch.ones(len(img)), torch.zeros(len(after))])
        return torch.cat([parts[0], img.to(parts[0].dtype), parts[1]])

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor, prompt: int | None = None) -> torch.Tensor:
        """Full recompute with PLoRA on the last context's image positions (never on later tokens)."""
        mask = torch.zeros(embeds.shape[0])
        if self.image_mask is not None:
            n = min(len(self.image_mask), len(mask))
            mask[:n] = self.image_mask[:n]
        x = embeds[None]
        for g in self.m.groups:
            x = self.m.spec.reference_forward(g, x, image_mask=mask[None])
        return x[0]
