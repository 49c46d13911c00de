"""The ``vlm2om`` command line. Export commands import torch lazily, so ``run`` and
``chat`` work on a deploy box that has only the runtime installed."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from runtime.errors import Vlm2omError


def _ints(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got '{value}'") from None


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
@click.option("--preset", default=None, help="Random-weight preset when no --checkpoint: tiny (default) or bench.")
@click.option("--dtype", type=click.Choice(["float32"]), default="float32", show_default=True,
              help="Weight and activation dtype of the exported graphs (float16 export is not in this release).")
@click.option("--seq-gears", callback=_ints, help="Prompt-chunk lengths compiled, e.g. 1,32,128,512.")
@click.option("--cache-gears", callback=_ints, help="KV-cache capacities compiled, e.g. 256,512,1024,2048.")
@click.option("--layers-per-group", type=click.IntRange(min=1), help="Decoder layers per ONNX file.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a random-weight preset.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
def export(model, out, checkpoint, preset, dtype, seq_gears, cache_gears, layers_per_group, seed, no_simplify):
    """Export MODEL (e.g. minigpt4) to a verified bundle of ONNX subgraphs."""
    try:
        from exporters import get_recipe

        recipe = get_recipe(model)
        if checkpoint is not None and preset is not None:
            raise click.UsageError("give either --checkpoint or --preset, not both")
        if checkpoint is not None and not checkpoint.is_dir():
            raise click.BadParameter(f"'{checkpoint}' is not a folder", param_hint="--checkpoint")
        opts = recipe.ExportOptions(preset=preset or ("tiny" if checkpoint is None else None),
                                    checkpoint=checkpoint, dtype=dtype, seq_gears=seq_gears,
                                    cache_gears=cache_gears, layers_per_group=layers_per_group, seed=seed)
        click.echo(f"building {model} subgraphs ({'checkpoint ' + str(checkpoint) if checkpoint else 'preset ' + opts.preset}) ...")
        from exporters.export import write_bundle

        plan = recipe.plan(opts)
        ignored = plan.provenance.get("source", {}).get("ignored_keys", [])
        if ignored:
            click.echo(f"ignoring {len(ignored)} checkpoint keys the model never uses:")
            for line in ignored:
                click.echo(f"  {line}")
        write_bundle(plan, out, echo=click.echo, simplify=not no_simplify)
    except Vlm2omError as e:
        _fail(e)


def _generation(pipe, max_new_tokens, greedy, temperature, top_p, repetition_penalty, seed):
    changes = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
               "repetition_penalty": repetition_penalty, "seed": seed}
    if greedy:
        changes["do_sample"] = False
    return pipe.defaults.but(**changes)


def _bundle_options(f):
    f = click.option("--backend", type=click.Choice(["ort"]), default="ort", show_default=True,
                     help="Session backend.")(f)
    f = click.option("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores).")(f)
    f = click.option("--no-hash-check", is_flag=True, help="Skip sha256 checks of the bundle's files.")(f)
    f = click.option("--max-new-tokens", type=click.IntRange(min=1), help="Default: the bundle's.")(f)
    f = click.option("--greedy", is_flag=True, help="Greedy decoding instead of the bundle's sampling.")(f)
    f = click.option("--temperature", type=float)(f)
    f = click.option("--top-p", type=float)(f)
    f = click.option("--repetition-penalty", type=float)(f)
    f = click.option("--seed", type=int, help="Sampling seed.")(f)
    f = click.option("--image", required=True, type=click.Path(path_type=Path), help="Image file.")(f)
    return click.argument("bundle", type=click.Path(path_type=Path))(f)


def _open(bundle, backend, threads, no_hash_check):
    from runtime import open_bundle

    return open_bundle(bundle, backend=backend, verify_hashes=not no_hash_check, threads=threads)


@main.command()
@_bundle_options
@click.option("--prompt", required=True, help="The question about the image.")
@click.option("--stats", is_flag=True, help="Print timings to stderr.")
def run(bundle, image, prompt, stats, backend, threads, no_hash_check, max_new_tokens, greedy,
        temperature, top_p, repetition_penalty, seed):
    """Answer one PROMPT about one image with BUNDLE, streaming tokens as they come."""
    try:
        pipe = _open(bundle, backend, threads, no_hash_check)
        cfg = _generation(pipe, max_new_tokens, greedy, temperature, top_p, repetition_penalty, seed)
        chat = pipe.chat(image)
        for piece in chat.ask(prompt, cfg):
            click.echo(piece, nl=False)
        click.echo()
        if stats:
            r = chat.last
            click.echo(f"image {chat.image_s * 1000:.1f} ms | prompt {r.prompt_tokens} tokens | first token "
                       f"{r.ttft_s * 1000:.1f} ms | {len(r.tokens)} tokens at {r.ms_per_token:.2f} ms/token "
                       f"| finish: {r.finish_reason}", err=True)
    except Vlm2omError as e:
        _fail(e)


@main.command()
@_bundle_options
def chat(bundle, image, backend, threads, no_hash_check, max_new_tokens, greedy, temperature, top_p,
         repetition_penalty, seed):
    """Multi-turn chat about an image. Type /reset to start over, /quit (or Ctrl-D) to leave."""
    try:
        pipe = _open(bundle, backend, threads, no_hash_check)
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


if __name__ == "__main__":
    main()
