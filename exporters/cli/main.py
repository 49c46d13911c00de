"""The ``vlm2om`` command line. Export commands import torch lazily, so ``run`` and
``chat`` work on a deploy box that has only the runtime installed."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from vlm2om.exporters.ascend import atc
from vlm2om.exporters.cli.common import int_list
from vlm2om.runtime.errors import Vlm2omError




def _fail(e: Exception):
    raise click.ClickException(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """vlm2om: export vision-language models to static ONNX subgraphs for Ascend ATC,
    and run the resulting bundle with a KV-cache decoder."""


@main.command()
@click.argument("model")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Folder with the original checkpoint files (see README for the layout).")
@click.option("--preset", default=None,
              help="Random-weight preset when no --checkpoint: tiny (default); minigpt4 also has bench.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None,
              help="Dtype of the exported graphs' weights and activations (LayerNorms and softmax "
                   "stay fp32). Default: float16 for --checkpoint (ATC's own default), float32 for a preset.")
@click.option("--seq-gears", callback=int_list, help="Prompt-chunk lengths compiled, e.g. 1,32,128,512.")
@click.option("--cache-gears", callback=int_list, help="KV-cache capacities compiled, e.g. 256,512,1024,2048.")
@click.option("--layers-per-group", type=click.IntRange(min=1), help="Decoder layers per ONNX file.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a random-weight preset.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--keep-going", is_flag=True,
              help="Write the bundle even when the ATC lint finds errors (it still prints them).")
@click.option("--vision-graphs", type=click.IntRange(min=1),
              help="minigpt4: split EVA-ViT-g's blocks over this many chained graphs "
                   "(default 2 for --checkpoint, which keeps the export's memory near 2.5 GB; 1 for a preset).")
@click.option("--template", help="llava15: prompt template, vicuna_v1 (default) or llava_v1.")
@click.option("--golden", is_flag=True,
              help="Store golden inputs and outputs (golden.npz) so `vlm2om verify --golden` can check the "
                   "bundle, or its OM files, on a box without torch.")
@click.option("--batch-gears", callback=int_list,
              help="Batch sizes compiled for the embed and decoder graphs, e.g. 1,2,4,8 (must include 1); "
                   "seq x cache x batch gears may not exceed ATC's 100.")
def export(model, out, checkpoint, preset, dtype, seq_gears, cache_gears, layers_per_group, seed, no_simplify,
           keep_going, vision_graphs, template, golden, batch_gears):
    """Export MODEL (e.g. minigpt4) to a verified bundle of ONNX subgraphs."""
    try:
        from vlm2om.exporters import get_recipe
        from vlm2om.exporters.core.extras import ExportExtras, check_batch_gears

        extras = ExportExtras(golden=golden, batch_gears=check_batch_gears(batch_gears or ()))
        recipe = get_recipe(model)
        if checkpoint is not None and preset is not None:
            raise click.UsageError("give either --checkpoint or --preset, not both")
        if checkpoint is not None and not checkpoint.is_dir():
            raise click.BadParameter(f"'{checkpoint}' is not a folder", param_hint="--checkpoint")
        own = {k: v for k, v in {"vision_graphs": vision_graphs, "template": template}.items() if v is not None}
        accepted = {f.name for f in dataclasses.fields(recipe.ExportOptions)}
        for name in own:
            if name not in accepted:
                raise click.UsageError(f"--{name.replace('_', '-')} does not apply to {model}")
        opts = recipe.ExportOptions(preset=preset or ("tiny" if checkpoint is None else None),
                                    checkpoint=checkpoint, dtype=dtype, seq_gears=seq_gears,
                                    cache_gears=cache_gears, layers_per_group=layers_per_group, seed=seed, **own)
        click.echo(f"building {model} subgraphs ({'checkpoint ' + str(checkpoint) if checkpoint else 'preset ' + opts.preset}) ...")
        from vlm2om.exporters.core.driver import write_bundle

        plan = recipe.plan(opts)
        ignored = plan.provenance.get("source", {}).get("ignored_keys", [])
        if ignored:
            click.echo(f"ignoring {len(ignored)} checkpoint keys the model never uses:")
            for line in ignored:
                click.echo(f"  {line}")
        write_bundle(plan, out, echo=click.echo, simplify=not no_simplify, keep_going=keep_going, extras=extras)
    except Vlm2omError as e:
        _fail(e)


def _generation(pipe, max_new_tokens, greedy, temperature, top_p, repetition_penalty, seed):
    changes = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
               "repetition_penalty": repetition_penalty, "seed": seed}
    if greedy:
        changes["do_sample"] = False
    return pipe.defaults.but(**changes)


def _bundle_options(f):
    f = click.option("--backend", type=click.Choice(["auto", "ort", "om"]), default="auto", show_default=True,
                     help="Session backend: om runs the OM files `vlm2om compile` recorded, through ais_bench "
                          "on an Ascend NPU; ort runs the ONNX graphs on onnxruntime; auto picks om when the "
                          "bundle has OM files and ais_bench imports, else ort.")(f)
    f = click.option("--device-id", type=click.IntRange(min=0), default=0, show_default=True,
                     help="NPU device id for the om backend.")(f)
    f = click.option("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores).")(f)
    f = click.option("--no-hash-check", is_flag=True, help="Skip sha256 checks of the bundle's files.")(f)
    f = click.option("--low-memory", is_flag=True,
                     help="Load each graph only while it runs: one graph's weights in memory at a time, "
                          "for a bundle larger than this machine's memory (slow: every step reloads).")(f)
    f = click.option("--max-new-tokens", type=click.IntRange(min=1), help="Default: the bundle's.")(f)
    f = click.option("--greedy", is_flag=True, help="Greedy decoding instead of the bundle's sampling.")(f)
    f = click.option("--temperature", type=float, help="Sampling temperature (default: the bundle's).")(f)
    f = click.option("--top-p", type=float, help="Nucleus sampling probability mass (default: the bundle's).")(f)
    f = click.option("--repetition-penalty", type=float, help="Penalty on repeated tokens (default: the bundle's).")(f)
    f = click.option("--seed", type=int, help="Sampling seed.")(f)
    f = click.option("--image", required=True, type=click.Path(path_type=Path), help="Image file.")(f)
    return click.argument("bundle", type=click.Path(path_type=Path))(f)


def _open(bundle, backend, device_id, threads, no_hash_check, low_memory=False):
    from vlm2om.runtime import Bundle
    from vlm2om.runtime.backends import resolve_backend
    from vlm2om.runtime.backends.om import has_om
    from vlm2om.runtime.pipeline import VisionChatPipeline

    b = Bundle.open(bundle, verify_hashes=not no_hash_check)
    chosen = resolve_backend(backend, b)
    if backend == "auto" and chosen == "ort" and has_om(b):
        click.echo("note: the bundle has OM files but ais_bench does not import here; running on onnxruntime",
                   err=True)
    return VisionChatPipeline(b, chosen, threads=threads, device_id=device_id, low_memory=low_memory), chosen


@main.command()
@_bundle_options
@click.option("--prompt", required=True, help="The question about the image.")
@click.option("--stats", is_flag=True, help="Print timings to stderr.")
def run(bundle, image, prompt, stats, backend, device_id, threads, no_hash_check, low_memory, max_new_tokens,
        greedy, temperature, top_p, repetition_penalty, seed):
    """Answer one PROMPT about one image with BUNDLE, streaming tokens as they come."""
    try:
        pipe, chosen = _open(bundle, backend, device_id, threads, no_hash_check, low_memory)
        cfg = _generation(pipe, max_new_tokens, greedy, temperature, top_p, repetition_penalty, seed)
        chat = pipe.chat(image)
        for piece in chat.ask(prompt, cfg):
            click.echo(piece, nl=False)
        click.echo()
        if stats:
            r = chat.last
            click.echo(f"backend {chosen} | image {chat.image_s * 1000:.1f} ms | prompt {r.prompt_tokens} tokens "
                       f"| first token "
                       f"{r.ttft_s * 1000:.1f} ms | {len(r.tokens)} tokens at {r.ms_per_token:.2f} ms/token "
                       f"| finish: {r.finish_reason}", err=True)
    except Vlm2omError as e:
        _fail(e)


@main.command()
@_bundle_options
def chat(bundle, image, backend, device_id, threads, no_hash_check, low_memory, max_new_tokens, greedy,
         temperature, top_p, repetition_penalty, seed):
    """Multi-turn chat about an image. Type /reset to start over, /quit (or Ctrl-D) to leave."""
    try:
        pipe, _ = _open(bundle, backend, device_id, threads, no_hash_check, low_memory)
        cfg = _generation(pipe, max_new_tokens, greedy, temperature, top_p, repetition_penalty, seed)
        conv = pipe.chat(image)
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                click.echo("you> ", nl=False)
            line = sys.stdin.readline()
            if not line or line.strip() == "/quit":
                break
            if line.strip() == "/reset":
                conv = pipe.chat(image)
                click.echo("(conversation reset)")
                continue
            if not line.strip():
                continue
            click.echo("assistant> ", nl=False)
            for piece in conv.ask(line.strip(), cfg):
                click.echo(piece, nl=False)
            click.echo()
    except Vlm2omError as e:
        _fail(e)


@main.command()
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option("--cann", default="7.0", show_default=True,
              help="CANN version whose ATC is targeted (5.0, 6.0, 7.0 or 8.0): opset range, IR version, op list.")
@click.option("--no-info", is_flag=True, help="Hide the info rows (the fp16 precision plan).")
def lint(target, cann, no_info):
    """Check TARGET (a bundle folder or one .onnx file) against what ATC accepts; exits 1 on errors."""
    try:
        from vlm2om.exporters.ascend import lint as atc_lint

        findings = atc_lint.lint_path(target, cann)
        click.echo(atc_lint.format_table(findings, show_info=not no_info))
        if atc_lint.errors(findings):
            sys.exit(1)
    except Vlm2omError as e:
        _fail(e)


@main.command(name="compile")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--soc", default=atc.DEFAULT_SOC, show_default=True,
              help="ATC --soc_version: 'Ascend' + the Name column of `npu-smi info` on the box that runs the OM.")
@click.option("--cann", default="7.0", show_default=True, help="CANN version the lint checks against.")
@click.option("--precision", type=click.Choice(atc.PRECISION_MODES), default=atc.DEFAULT_PRECISION,
              show_default=True,
              help="ATC --precision_mode; with fp16 modes the lint's fp16-risky nodes go to --keep_dtype.")
@click.option("--atc", "atc_cmd", default="atc", show_default=True, help="The ATC executable (looked up on PATH).")
@click.option("--force", is_flag=True, help="Rebuild every graph, even those whose OM is up to date.")
@click.option("--script-only", is_flag=True, help="Only refresh compile_om.sh; do not run ATC.")
@click.option("--ignore-lint", is_flag=True, help="Run ATC even when the lint reports errors.")
def compile_(bundle, soc, cann, precision, atc_cmd, force, script_only, ignore_lint):
    """Compile BUNDLE's graphs to OM with ATC (on the Ascend box) and record them in its manifest."""
    try:
        from vlm2om.exporters.ascend.compile import CompileOptions, compile_bundle

        opts = CompileOptions(soc=soc, cann=cann, precision=precision, atc=atc_cmd, force=force,
                              script_only=script_only, ignore_lint=ignore_lint)
        res = compile_bundle(bundle, opts, echo=click.echo)
        if not script_only:
            click.echo(f"{len(res.built)} built, {len(res.cached)} up to date; run it with "
                       f"`vlm2om chat {bundle} --backend om --image ...`")
    except Vlm2omError as e:
        _fail(e)


from vlm2om.exporters.cli.reports import register as _register_reports  # noqa: E402  verify, bench, export --golden

_register_reports(main)

if __name__ == "__main__":
    main()
