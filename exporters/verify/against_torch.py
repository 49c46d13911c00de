"""`vlm2om verify --reference`: the bundle against the PyTorch modules it was exported from.

The modules are rebuilt from the bundle's provenance (a preset and its seed, or the
checkpoint folder, which the user may point elsewhere). Per subgraph, each graph is run on
the verification gears the export used, through the chosen backend; end to end, the bundle
answers each image+prompt case (then each follow-up, in the same conversation) greedily, and
the reference, given the same conversation, builds its own prompt tokens (compared id by id)
and recomputes the whole sequence once on the bundle's tokens (teacher forcing): that gives
every step's next-token logits (cosine) and the reference's greedy choice in the very context
the bundle chose in, so one forward pass per turn suffices.
"""
from __future__ import annotations

import dataclasses
import gc
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlm2om.runtime.backends import open_session
from vlm2om.runtime.errors import BundleError, InputError

from vlm2om.exporters.families import get_family
from vlm2om.exporters.core.driver import torch_outputs
from vlm2om.exporters.core.extras import apply_batch_gears
from vlm2om.exporters.verify.golden import e2e_limits, thresholds_for
from vlm2om.exporters.verify.metrics import Metrics, judge
from vlm2om.exporters.verify.cases import CaseResult, judge_steps, layout_difference, synthetic_images


@dataclass
class ReferenceSource:
    recipe: object
    options: object
    batch_gears: tuple[int, ...]
    label: str


def reference_source(bundle, checkpoint: Path | None = None) -> ReferenceSource:
    """The recipe and export options that rebuild the bundle's torch modules."""
    m = bundle.manifest
    recipe = get_family(m["family"])
    opts = dict((m.get("provenance") or {}).get("options") or {})
    if checkpoint is not None:
        if not Path(checkpoint).is_dir():
            raise InputError(f"--reference '{checkpoint}' is not a checkpoint folder")
        opts.update(checkpoint=str(checkpoint), preset=None)
    elif opts.get("checkpoint") and not Path(opts["checkpoint"]).is_dir():
        raise InputError(f"bundle '{bundle.root}' was exported from checkpoint '{opts['checkpoint']}', which is "
                         "not here: pass --reference CHECKPOINT (or verify with --golden)")
    hints = _hints(recipe.ExportOptions)
    kw = {k: _option(hints[k], v) for k, v in opts.items() if k in hints}
    if kw.get("checkpoint"):
        kw["checkpoint"] = Path(kw["checkpoint"])
    label = f"checkpoint {kw['checkpoint']}" if kw.get("checkpoint") else \
        f"preset {kw.get('preset')} (seed {kw.get('seed', 0)})"
    return ReferenceSource(recipe, recipe.ExportOptions(**kw), tuple(opts.get("batch_gears") or ()), label)


def _hints(cls) -> dict:
    """The option types, resolved: a family's options module names its graph configs only for type
    checkers (it stays torch-free for the CLI), so they are looked up in vlm2om.graphs here."""
    import importlib
    import pkgutil

    import torch

    import vlm2om.graphs

    names = {"nn": torch.nn}
    for info in pkgutil.iter_modules(vlm2om.graphs.__path__):
        names.update(vars(importlib.import_module(f"vlm2om.graphs.{info.name}")))
    return typing.get_type_hints(cls, localns=names)


def _option(hint, value):
    """A provenance value as the option's type: lists back to tuples, dicts to their config dataclass."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        (cls,) = [t for t in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(t)]
        return cls(**value)
    return value


def check_reference(bundle) -> None:
    """Build the family's reference pipeline without modules: a missing package or an unknown
    family is reported before any graph is rebuilt."""
    from vlm2om.exporters.families import make_reference

    make_reference(None, bundle.manifest, bundle.path(bundle.manifest["tokenizer"]["file"]).read_bytes())


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
    for sg in plan.subgraphs:
        theirs = [i["name"] for i in declared.get(sg.name, {}).get("inputs", [])]
        if sg.name in declared and theirs != [d.name for d in sg.inputs]:
            raise BundleError(f"graph '{sg.name}' of bundle '{bundle.root}' takes inputs {theirs}, but this vlm2om "
                              f"exports it with {[d.name for d in sg.inputs]}: the bundle comes from an older "
                              "vlm2om; re-export it to compare it with --reference, or verify it with --golden")
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


def verify_end_to_end(bundle, source: ReferenceSource, images: list[Path], prompts: list[str],
                      follow_ups: list[str] = (), new_tokens: int = 16, backend: str = "ort",
                      exif_transpose: bool = False, **backend_options) -> list[CaseResult]:
    """Every image x prompt, then each follow-up in the same conversation: per turn, the prompt's
    token ids, per-step logits cosine and greedy agreement with the reference. ``exif_transpose``:
    each image file is turned upright (the runtime's loader) and those pixels go to both sides;
    otherwise both read the file as the original loaders do, ignoring its EXIF orientation."""
    from vlm2om.runtime.generation import GenerationConfig
    from vlm2om.runtime.pipeline import open_pipeline

    from vlm2om.exporters.families import make_reference

    limits = e2e_limits(bundle, backend)
    mods = source.recipe.build_modules(source.options)
    ref = make_reference(mods, bundle.manifest)
    pipe = open_pipeline(bundle, backend, exif_transpose=False, **backend_options)  # as the reference loads
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, stop_on_eos=False, stop_strings=())
    results = []
    from PIL import Image

    # (label, image): the given files, else two synthetic pictures (no files ship with vlm2om)
    if exif_transpose:
        from vlm2om.runtime.preprocess import load_image

        cases = [(str(p), load_image(p, exif_transpose=True)) for p in images]
    else:
        cases = [(str(p), Path(p)) for p in images]
    cases = cases or [(f"synthetic{i}", Image.fromarray(rgb)) for i, rgb in enumerate(synthetic_images())]
    try:
        for label, image in cases:
            for prompt in prompts:
                chat, turns = pipe.chat(image), []
                for turn, question in enumerate([prompt, *follow_ups], 1):
                    for _ in chat.ask(question, cfg, record_logits=True):
                        pass
                    turns.append((question, None))
                    last = chat.last
                    res = CaseResult(len(results), label, question, turn, last.prompt_tokens)
                    results.append(res)
                    _judge_case(res, ref, image, turns, last.layout.segments, last.tokens, last.logits, limits)
                    turns[-1] = (question, last.text)  # the history the next turn renders
    finally:
        pipe.close()
    return results


@torch.no_grad()
def _judge_case(res: CaseResult, ref, image, turns, segments, tokens, recorded, limits) -> None:
    res.reason = layout_difference(segments, ref.prompt_ids(turns))
    if res.reason:
        return
    context = ref.context(image, turns)
    follow = ref.m.embed(torch.tensor([tokens[:-1]], dtype=torch.long))[0] if len(tokens) > 1 else context[:0]
    logits = ref.logits(torch.cat([context, follow.to(context.dtype)]), len(context)).float().numpy()[len(context) - 1:]
    judge_steps(res, tokens, recorded, logits, limits)
