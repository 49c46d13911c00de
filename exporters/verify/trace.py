"""The end-to-end case of `export --golden`: the PyTorch reference's next-token logits for one
image and question, with a fixed answer fed back token by token (teacher forcing).

It is computed while the export builds each graph's module, in pipeline order: the image
graphs turn the pixels into image embeddings, ``embed`` gives the prompt and answer the
reference's layout, each decoder group carries the whole sequence on (no cache). So it costs
one forward pass per graph and never holds two graphs' weights, which keeps a 7B export's
memory where it was. `vlm2om verify --golden` replays the case through the bundle's own
preprocessing, tokenizer, prefill and KV-cache decode, with no torch.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

from vlm2om.runtime.errors import InputError

from vlm2om.exporters.families import make_reference
from vlm2om.exporters.verify.cases import DEFAULT_PROMPTS, synthetic_images

# Teacher-forced answer: any fixed text serves, since the bundle is fed the same tokens.
ANSWER = "The picture shows soft colour gradients with a little noise, and no people at all."
MAX_STEPS = 16


class EndToEndTrace:
    def __init__(self, plan, echo: Callable[[str], None] = print):
        m = plan.manifest
        self.pipe = m["pipeline"]
        self.forward = plan.llm.reference_forward  # a decoder group over the whole sequence
        self.question = DEFAULT_PROMPTS[0]
        self.image = synthetic_images()[0]
        self.logits: np.ndarray | None = None
        self.skipped = ""
        try:
            described = {"family": plan.family, "dtype": plan.dtype, **m}
            ref = make_reference(None, described, plan.assets[m["tokenizer"]["file"]])
        except InputError as e:
            self.skipped = str(e)
            echo(f"export --golden: no end-to-end case ({e}); the per-graph cases are stored")
            return
        self.before, self.after = ref.prompt_ids([(self.question, None)])
        self.answer = ref.text_ids(ANSWER)[:MAX_STEPS]
        self.room, self.echo = max(m["kv_cache"]["capacity_gears"]), echo
        self.prompt_tokens = 0  # known once the image graphs ran (an encoder may vary its token count)
        self.x = ref.pixels(Image.fromarray(self.image)).to(ref.dtype)

    def _fits(self) -> bool:
        """The prompt and the answer fit the largest cache gear (the last answer token is never fed)."""
        self.prompt_tokens = len(self.before) + self.x.shape[1] + len(self.after)
        if self.prompt_tokens + len(self.answer) - 1 <= self.room:
            return True
        self.skipped = (f"the {self.prompt_tokens}-position prompt and {len(self.answer)}-token answer "
                        f"exceed the largest cache gear {self.room}")
        self.echo(f"export --golden: no end-to-end case ({self.skipped})")
        return False

    @torch.no_grad()
    def feed(self, name: str, module: torch.nn.Module) -> None:
        """One graph's module, as the export builds it (graphs arrive in pipeline order)."""
        if self.skipped:
            return
        if name in self.pipe["image_graphs"]:
            self.x = module(self.x)
        elif name == self.pipe["embed_graph"]:
            if not self._fits():
                self.x = None
                return

            def emb(ids):
                return module(torch.tensor([ids], dtype=torch.long))[0]

            text = [emb(self.before), emb(self.after), emb(self.answer[:-1])]
            self.x = torch.cat([text[0], self.x[0], *text[1:]])[None]
        elif name in self.pipe["decoder_graphs"]:
            self.x = self.forward(module, self.x, prompt=self.prompt_tokens)
            if name == self.pipe["decoder_graphs"][-1]:  # the last group's output is the logits
                self.logits = self.x[0, self.prompt_tokens - 1:].float().numpy()
                self.x = None

    def arrays(self) -> dict[str, np.ndarray]:
        """What goes into golden.npz below the case's key (empty when there is no case)."""
        if self.skipped or self.logits is None:
            return {}
        return {"image": self.image, "prompt_before": np.array(self.before, np.int64),
                "prompt_after": np.array(self.after, np.int64), "answer": np.array(self.answer, np.int64),
                "logits": self.logits}

    def entry(self) -> dict:
        return {"prompt": self.question, "answer": ANSWER, "prompt_tokens": self.prompt_tokens,
                "steps": len(self.answer)}
