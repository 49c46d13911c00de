"""`vlm2om verify`: the precision report of a bundle, per subgraph and end to end.

Importing this module imports no torch: `verify --golden` runs on the Ascend box; `verify
--reference` imports torch when asked.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from vlm2om.exporters.cli.common import backend_options, open_bundle, report_folder_option
from vlm2om.exporters.verify.cases import DEFAULT_FOLLOW_UPS, DEFAULT_PROMPTS

UNLISTED_SHOWN = 10  # unlisted files named in the warning; the rest are counted


@click.command()
@click.option("--golden", is_flag=True,
              help="Replay the golden inputs/outputs stored by `export --golden` (no torch needed).")
@click.option("--reference", is_flag=False, flag_value="", default=None, metavar="[CHECKPOINT]",
              help="Rebuild the PyTorch modules (from the bundle's preset and seed, or CHECKPOINT) and "
                   "compare every subgraph and the end-to-end greedy answers. Needs torch.")
@click.option("--graph", "graphs", multiple=True,
              help="Only this subgraph (repeatable); no end-to-end cases then.")
@click.option("--cosine", type=float, help="Override the manifest's cosine-similarity floor.")
@click.option("--rel-euclid", type=float, help="Override the manifest's relative-Euclidean-distance ceiling.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=str),  # a Path mangles a URL
              help="End-to-end case image (repeatable; default: two synthetic images).")
@click.option("--exif-transpose/--no-exif-transpose", default=None,
              help="With --image: --exif-transpose turns each photo upright by its EXIF orientation, as "
                   "`vlm2om run` does by default, and gives the bundle and the reference the same upright "
                   "pixels; --no-exif-transpose, the default here, reads each file as MiniGPT-4's and LLaVA's "
                   "own loaders do, which ignore the orientation. The golden case's image is stored pixels "
                   "(no EXIF).")
@click.option("--prompt", "prompts", multiple=True,
              help="End-to-end case prompt (repeatable); every image is asked every prompt.")
@click.option("--follow-up", "follow_ups", multiple=True,
              help="A later question in the same conversation, checked like the first (repeatable; "
                   "default: one follow-up).")
@click.option("--single-turn", is_flag=True, help="No follow-up questions: one turn per case.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Greedy tokens generated per end-to-end case (--reference; the golden case holds "
                   "its own, at most 16).")
@click.option("--no-e2e", is_flag=True, help="Only the per-subgraph comparison.")
@click.option("--low-memory", is_flag=True,
              help="Load each graph only while it runs (end-to-end cases of a bundle larger than this "
                   "machine's memory, such as a 7B bundle on onnxruntime's CPU kernels; slow).")
@backend_options(auto=False)
@report_folder_option
def verify(bundle, golden, reference, graphs, cosine, rel_euclid, images, exif_transpose, prompts, follow_ups,
           single_turn, new_tokens, no_e2e, low_memory, backend, device_id, threads, spin, no_hash_check, out_dir):
    """Precision report of BUNDLE: per subgraph max/mean abs error, cosine similarity and relative
    Euclidean distance against the thresholds in its manifest, then end to end the per-step
    next-token logits cosine and greedy agreement: the golden case stored at export (--golden),
    or image x prompt cases and follow-ups against PyTorch (--reference). Writes
    verify_<model>.csv/.json; exits 1 on a failure. Files in the bundle folder that its manifest
    does not list are reported (a warning: nothing checks or uses them)."""
    from vlm2om.runtime.tables import format_table, write_csv, write_json

    from vlm2om.exporters.verify.golden import thresholds_label, verify_golden, verify_golden_e2e

    if golden and reference is not None:
        raise click.UsageError("give either --golden or --reference, not both")
    if single_turn and follow_ups:
        raise click.UsageError("give either --follow-up or --single-turn, not both")
    if golden and (images or prompts or follow_ups or exif_transpose):
        raise click.UsageError("--image, --exif-transpose, --prompt and --follow-up make --reference cases; the "
                               "golden end-to-end case is the one stored at export")
    if exif_transpose and not images:
        raise click.UsageError("--exif-transpose applies to --image files; the synthetic images carry no EXIF "
                               "orientation")
    if images:  # each from its header, before the bundle's files are hashed
        from vlm2om.runtime.preprocess import check_image

        for image in images:
            check_image(image)
    b = open_bundle(bundle, no_hash_check)
    unlisted = b.unlisted_files()
    if unlisted:
        shown = ", ".join(unlisted[:UNLISTED_SHOWN]) + (f" and {len(unlisted) - UNLISTED_SHOWN} more"
                                                       if len(unlisted) > UNLISTED_SHOWN else "")
        one = len(unlisted) == 1
        click.echo(f"warning: {bundle} holds {len(unlisted)} file{'' if one else 's'} that its manifest does not "
                   f"list, so nothing checks or uses {'it' if one else 'them'}: {shown}", err=True)
    if not golden and reference is None:  # the golden file if there is one, unless cases are asked for
        cases_asked = images or prompts or follow_ups or single_turn
        golden = bool((b.manifest.get("verification") or {}).get("golden")) and not cases_asked
        if not golden:
            reference = ""
    limits = {k: v for k, v in (("cosine", cosine), ("rel_euclid", rel_euclid)) if v is not None}
    session = {"device_id": device_id, "threads": threads, "spin": spin, "low_memory": low_memory}
    model, cases = b.manifest["family"], []
    if golden:
        click.echo(f"verifying {bundle} on {backend} against its golden file ...")
        rows = verify_golden(b, backend, limits, list(graphs) or None, **session)
        if not graphs and not no_e2e:
            cases = verify_golden_e2e(b, backend, **session)
            missing = b.manifest["verification"]["golden"].get("end_to_end_missing")
            if missing:
                click.echo(f"the golden file has no end-to-end case: {missing}")
    else:
        try:
            from vlm2om.exporters.verify.against_torch import (check_reference, reference_source,
                                                               verify_end_to_end, verify_subgraphs)
        except ImportError as e:
            raise click.ClickException(f"verify --reference needs torch ({e}); on a box without torch "
                                       "verify with --golden (export the bundle with --golden)") from None

        src = reference_source(b, Path(reference) if reference else None)
        e2e = not no_e2e and not graphs
        if e2e:
            check_reference(b)  # before the per-graph work: a missing package fails now
        click.echo(f"verifying {bundle} on {backend} against PyTorch ({src.label}) ...")
        rows = verify_subgraphs(b, src, backend, limits, list(graphs) or None, **session)
        if e2e:
            later = [] if single_turn else list(follow_ups) or list(DEFAULT_FOLLOW_UPS)
            cases = verify_end_to_end(b, src, list(images), list(prompts) or list(DEFAULT_PROMPTS), later,
                                      new_tokens, backend, exif_transpose=bool(exif_transpose), **session)
    heads = ["graph", "output", "gear", "max_abs", "mean_abs", "cosine", "rel_euclid", "result"]
    table = [[r.graph, r.output, r.gear, r.max_abs, r.mean_abs, r.cosine, r.rel_euclid,
              "ok" if r.passed else "FAIL"] for r in rows]
    click.echo(format_table(heads, [[r.graph, r.output, r.gear, f"{r.max_abs:.3e}", f"{r.mean_abs:.3e}",
                                     f"{r.cosine:.7f}", f"{r.rel_euclid:.3e}", t[-1]] for r, t in zip(rows, table)]))
    click.echo(f"thresholds ({thresholds_label(b, backend, limits)})")
    write_csv(out_dir / f"verify_{model}.csv", heads, table)
    payload = {"bundle": str(bundle), "backend": backend, "mode": "golden" if golden else "reference",
               "unlisted_files": unlisted, "subgraphs": [r.as_dict() for r in rows]}
    if cases:
        _report_cases(cases, out_dir, model, payload)
    bad = sorted({r.graph for r in rows if not r.passed})
    bad_cases = [c for c in cases if not c.passed]
    payload["passed"] = not bad and not bad_cases
    write_json(out_dir / f"verify_{model}.json", payload)
    click.echo(f"reports: {out_dir / f'verify_{model}.csv'}, {out_dir / f'verify_{model}.json'}")
    if bad or bad_cases:
        for c in bad_cases:
            click.echo(f"FAIL end-to-end case {c.case} ({Path(c.image).name}, turn {c.turn}, {c.prompt!r}): "
                       f"{c.reason}", err=True)
        if bad:
            click.echo(f"FAIL subgraph(s) {', '.join(bad)} of {bundle} miss the thresholds", err=True)
        sys.exit(1)
    plural = "s" * (len(cases) != 1)
    click.echo(f"PASS: {len(rows)} subgraph outputs"
               + (f", {len(cases)} end-to-end case{plural}" if cases else ""))


def _report_cases(cases, out_dir: Path, model: str, payload: dict) -> None:
    from vlm2om.runtime.tables import format_table, write_csv

    heads = ["case", "image", "turn", "prompt", "prompt_tokens", "steps", "greedy_agreement", "min_cosine", "result"]
    table = [[c.case, Path(c.image).name, c.turn, c.prompt, c.prompt_tokens, len(c.steps),
              f"{c.agreed}/{len(c.steps)}", c.min_cosine, "ok" if c.passed else "FAIL"] for c in cases]
    click.echo(format_table(heads, table, digits=6))
    # token: the bundle's greedy token, or with --golden the stored answer's token it was fed
    step_heads = ["case", "step", "token", "bundle_greedy", "reference_token", "cosine", "reference_margin"]
    steps = [[s.case, s.step, s.token, s.bundle_token if s.bundle_token >= 0 else s.token, s.reference_token,
              s.cosine, s.margin] for c in cases for s in c.steps]
    write_csv(out_dir / f"verify_{model}_e2e.csv", step_heads, steps)
    payload["end_to_end"] = [{"case": c.case, "image": c.image, "turn": c.turn, "prompt": c.prompt,
                              "prompt_tokens": c.prompt_tokens,
                              "greedy_agreement": c.agreed, "steps": len(c.steps), "min_cosine": c.min_cosine,
                              "passed": c.passed, "reason": c.reason,
                              "per_step": [dict(zip(step_heads[1:], row[1:])) for row in steps if row[0] == c.case]}
                             for c in cases]
