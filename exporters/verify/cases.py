"""Judging one end-to-end case: the bundle's prompt tokens and per-step next-token logits
against a reference's. No torch here: `verify --reference` feeds it the PyTorch pipeline's
logits, `verify --golden` the logits `export --golden` stored, on the Ascend box too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlm2om.exporters.verify.metrics import compare

DEFAULT_PROMPTS = ("Describe this image in detail.", "What is unusual about this picture?")
DEFAULT_FOLLOW_UPS = ("Which colours stand out?",)  # a second turn: cache reuse and the history's layout


@dataclass
class StepRow:
    case: int
    step: int
    token: int  # the bundle's token at this step (its greedy choice, or the golden answer's)
    reference_token: int  # the reference's greedy choice in the same context
    cosine: float
    margin: float  # reference top-1 minus top-2 logit
    bundle_token: int = -1  # the bundle's own greedy choice when the answer is given (golden)

    @property
    def agrees(self) -> bool:
        return (self.bundle_token if self.bundle_token >= 0 else self.token) == self.reference_token


@dataclass
class CaseResult:
    case: int
    image: str
    prompt: str
    turn: int  # 1: the first question; 2, 3...: follow-ups in the same conversation
    prompt_tokens: int
    steps: list[StepRow] = field(default_factory=list)
    passed: bool = False
    reason: str = ""

    @property
    def min_cosine(self) -> float:
        return min((s.cosine for s in self.steps), default=float("nan"))

    @property
    def agreed(self) -> int:
        """Leading steps where the bundle's greedy choice is the reference's."""
        return next((s.step for s in self.steps if not s.agrees), len(self.steps))


def synthetic_images(size: int = 256) -> list[np.ndarray]:
    """Two deterministic RGB pictures [size, size, 3] uint8 (no files ship with an installed vlm2om)."""
    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(0)
    pictures = [np.stack([x, y, 1 - x * y], -1), np.stack([np.sin(9 * x), np.cos(7 * y), x * 0 + 0.3], -1) ** 2]
    return [(np.clip(rgb + rng.normal(0, 0.04, rgb.shape), 0, 1) * 255).astype(np.uint8) for rgb in pictures]


def layout_difference(ours: list[list[int]], theirs: list[list[int]]) -> str:
    """Where two prompts' text tokens first differ ('' when equal)."""
    if ours == theirs:
        return ""
    seg = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if seg is None:
        return f"prompt layouts differ: the bundle has {len(ours)} text segments, the reference {len(theirs)}"
    a, b = ours[seg], theirs[seg]
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    side = "before" if seg == 0 else "after"
    return f"prompt tokens differ {side} the image at text position {at}: bundle {a[at:at + 6]}..., " \
           f"reference {b[at:at + 6]}..."


def judge_steps(res: CaseResult, tokens: list[int], ours: list[np.ndarray], reference: np.ndarray,
                limits: dict, forced: bool = False) -> None:
    """Fill ``res`` from the bundle's logits ``ours`` and the reference's [steps, vocab] in the
    same contexts (the reference ran on the same tokens), so every step is judged: cosine, and a
    greedy choice that may differ only where the reference's top two are within ``tie_margin``.
    ``forced``: ``tokens`` were fed (a golden answer), not the bundle's own choices."""
    for t, (tok, got, want) in enumerate(zip(tokens, ours, reference)):
        top = np.sort(want)[-2:]
        res.steps.append(StepRow(res.case, t, int(tok), int(np.argmax(want)), compare(got, want)["cosine"],
                                 float(top[1] - top[0]), int(np.argmax(got)) if forced else -1))
    low = [s for s in res.steps if s.cosine < limits["logits_cosine"]]
    split = [s for s in res.steps if not s.agrees and s.margin >= limits["tie_margin"]]
    if low:
        res.reason = f"logits cosine {low[0].cosine:.6f} < {limits['logits_cosine']} at step {low[0].step}"
    elif split:
        s = split[0]
        res.reason = (f"greedy tokens differ at step {s.step} (bundle {s.bundle_token if forced else s.token}, "
                      f"reference {s.reference_token}, reference margin {s.margin:.3e})")
    res.passed = not res.reason
