"""`vlm2om verify --reference`: the bundle against the PyTorch modules it was exported from.

The modules are rebuilt from the bundle's provenance (a preset and its seed, or the
checkpoint folder, which the user may point elsewhere). Per subgraph, each graph is run on
the verification gears the export used, through the chosen backend; end to end, the bundle
answers each image+prompt case greedily and the reference recomputes the whole sequence
once on the bundle's tokens (teacher forcing), which gives every step's next-token logits
(cosine) and the reference's greedy choice at every step: the two greedy runs agree up to
the first step where those choices differ, so one forward pass per case suffices.
"""
from __future__ import annotations

import dataclasses
import gc
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runtime.backends import open_session
from runtime.errors import BundleError, InputError

from . import get_recipe
from .export import torch_outputs
from .export_extras import apply_batch_gears
from .golden import thresholds_for
from .verify import E2E_THRESHOLDS, Metrics, compare, judge

DEFAULT_PROMPTS = ("Describe this image in detail.", "What is unusual about this picture?")
DEFAULT_FOLLOW_UPS = ("Which colours stand out?",)  # a second turn: cache reuse and the history's layout


@dataclass
class ReferenceSource:
    recipe: object
    options: object
    batch_gears: tuple[int, ...]
    label: str


def reference_source(bundle, checkpoint: Path | None = None) -> ReferenceSource:
    """The recipe and export options that rebuild the bundle's torch modules."""
    m = bundle.manifest
    recipe = get_recipe(m["family"])
    opts = dict((m.get("provenance") or {}).get("options") or {})
    if checkpoint is not None:
        if not Path(checkpoint).is_dir():
            raise InputError(f"--reference '{checkpoint}' is not a checkpoint folder")
        opts.update(checkpoint=str(checkpoint), preset=None)
    elif opts.get("checkpoint") and not Path(opts["checkpoint"]).is_dir():
        raise InputError(f"bundle '{bundle.root}' was exported from checkpoint '{opts['checkpoint']}', which is "
                         "not here: pass --reference CHECKPOINT (or verify with --golden)")
    hints = typing.get_type_hints(recipe.ExportOptions)
    kw = {k: _option(hints[k], v) for k, v in opts.items() if k in hints}
    if kw.get("checkpoint"):
        kw["checkpoint"] = Path(kw["checkpoint"])
    label = f"checkpoint {kw['checkpoint']}" if kw.get("checkpoint") else \
        f"preset {kw.get('preset')} (seed {kw.get('seed', 0)})"
    return ReferenceSource(recipe, recipe.ExportOptions(**kw), tuple(opts.get("batch_gears") or ()), label)


def _option(hint, value):
    """A provenance value as the option's type: lists back to tuples, dicts to their config dataclass."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        (cls,) = [t for t in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(t)]
        return cls(**value)
    return value


def verify_subgraphs(bundle, source: ReferenceSource, backend: str = "ort", thresholds: dict | None = None,
                     graphs: list[str] | None = None, **backend_options) -> list[Metrics]:
    """Each graph against its torch module on the export's verification gears, one graph's
    weights in memory at a time."""
    plan = source.recipe.plan(source.options)
    apply_batch_gears(plan, source.batch_gears)
    dtype, limits = thresholds_for(bundle, backend)
    limits.update(thresholds or {})
    declared = bundle.manifest["graphs"]
    missing = [n for n in declared if n not in {sg.name for sg in plan.subgraphs}]
    if missing:
        raise BundleError(f"bundle '{bundle.root}' has graphs {missing} that the {source.label} recipe does not make")
    rows: list[Metrics] = []
    for sg in plan.subgraphs:
        if sg.name not in declared or (graphs and sg.name not in graphs):
            continue
        module = sg.build()
        cases = torch_outputs(sg, module)
        del module
        gc.collect()
        sess = open_session(backend, bundle, sg.name, **backend_options)
        try:
            for gear, feeds, expected in cases:
                actual = sess.run(feeds)
                shown = {k: v for k, v in gear.items() if k in sg.dynamic_dims}
                for decl, want in zip(sg.outputs, expected):
                    got = actual[decl.name]
                    rows.append(judge(sg.name, decl.name, shown, got, want.astype(got.dtype), dtype, limits))
        finally:
            sess.close()
    return rows


@dataclass
class StepRow:
    case: int
    step: int
    token: int  # the bundle's greedy token
    reference_token: int  # the reference's greedy choice in the same context
    cosine: float
    margin: float  # reference top-1 minus top-2 logit


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
        """Leading greedy tokens the bundle and the reference share."""
        return next((s.step for s in self.steps if s.token != s.reference_token), len(self.steps))


def default_images(folder: Path) -> list[Path]:
    """Two deterministic synthetic images (no files ship with an installed vlm2om)."""
    from PIL import Image

    y, x = np.mgrid[0:256, 0:256] / 256
    rng = np.random.default_rng(0)
    pictures = [np.stack([x, y, 1 - x * y], -1), np.stack([np.sin(9 * x), np.cos(7 * y), x * 0 + 0.3], -1) ** 2]
    paths = []
    for i, rgb in enumerate(pictures):
        rgb = np.clip(rgb + rng.normal(0, 0.04, rgb.shape), 0, 1)
        paths.append(folder / f"case{i}.png")
        Image.fromarray((rgb * 255).astype(np.uint8)).save(paths[-1])
    return paths


def verify_end_to_end(bundle, source: ReferenceSource, images: list[Path], prompts: list[str],
                      follow_ups: list[str] = (), new_tokens: int = 16, backend: str = "ort",
                      **backend_options) -> list[CaseResult]:
    """Every image x prompt, then each follow-up in the same conversation: per turn, the prompt's
    token ids, per-step logits cosine and greedy agreement with the reference."""
    from runtime.generation import GenerationConfig
    from runtime.pipeline import VisionChatPipeline

    from .reference import make_reference

    limits = (bundle.manifest.get("verification") or {}).get("end_to_end") or \
        E2E_THRESHOLDS[thresholds_for(bundle, backend)[0]]
    mods = source.recipe.build_modules(source.options)
    ref = make_reference(mods, bundle.manifest)
    pipe = VisionChatPipeline(bundle, backend, **backend_options)
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, stop_on_eos=False, stop_strings=())
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for image in [Path(p) for p in images] or default_images(Path(tmp)):
                for prompt in prompts:
                    chat, turns = pipe.chat(image), []
                    for turn, question in enumerate([prompt, *follow_ups], 1):
                        recorded: list[np.ndarray] = []
                        pipe.decoder.on_logits = recorded.append
                        for _ in chat.ask(question, cfg):
                            pass
                        turns.append((question, None))
                        res = CaseResult(len(results), str(image), question, turn, chat.last.prompt_tokens)
                        results.append(res)
                        prompt_keys = chat.cached_keys[:chat.last.prompt_tokens]
                        _judge_case(res, ref, image, turns, prompt_keys, chat.last.tokens, recorded, limits)
                        turns[-1] = (question, chat.last.text)  # the history the next turn renders
    finally:
        pipe.decoder.on_logits = None
        pipe.close()
    return results


def _split_at_images(keys: list) -> list[list[int]]:
    """The bundle's prompt (token ids, and (image, row) for image positions) as text segments."""
    segments: list[list[int]] = [[]]
    for prev, k in zip([None, *keys], keys):
        if isinstance(k, int):
            segments[-1].append(k)
        elif not isinstance(prev, tuple):
            segments.append([])
    return segments


@torch.no_grad()
def _judge_case(res: CaseResult, ref, image, turns, prompt_keys, tokens, recorded, limits) -> None:
    ours, theirs = _split_at_images(prompt_keys), ref.prompt_ids(turns)
    if ours != theirs:
        seg = next(i for i, (a, b) in enumerate(zip(ours + [[]] * 2, theirs + [[]] * 2)) if a != b)
        at = next((i for i, (a, b) in enumerate(zip(ours[seg], theirs[seg])) if a != b),
                  min(len(ours[seg]), len(theirs[seg])))
        side = "before" if seg == 0 else "after"
        res.reason = (f"prompt tokens differ {side} the image at text position {at}: bundle "
                      f"{ours[seg][at:at + 6]}..., reference {theirs[seg][at:at + 6]}...")
        return
    context = ref.context(image, turns)
    follow = ref.m.embed(torch.tensor([tokens[:-1]], dtype=torch.long))[0] if len(tokens) > 1 else context[:0]
    logits = ref.logits(torch.cat([context, follow.to(context.dtype)])).float().numpy()[len(context) - 1:]
    for t, (tok, got, want) in enumerate(zip(tokens, recorded, logits)):
        top = np.sort(want)[-2:]
        res.steps.append(StepRow(res.case, t, int(tok), int(np.argmax(want)),
                                 compare(got, want)["cosine"], float(top[1] - top[0])))
    k = res.agreed
    low = [s for s in res.steps if s.cosine < limits["logits_cosine"]]
    if low:
        res.reason = f"logits cosine {low[0].cosine:.6f} < {limits['logits_cosine']} at step {low[0].step}"
    elif k < len(res.steps) and res.steps[k].margin >= limits["tie_margin"]:
        res.reason = (f"greedy tokens differ at step {k} (bundle {res.steps[k].token}, reference "
                      f"{res.steps[k].reference_token}, reference margin {res.steps[k].margin:.3e})")
    res.passed = not res.reason
