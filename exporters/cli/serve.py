"""`vlm2om run` and `vlm2om chat`: answer questions about an image with a bundle.

The decoding options follow each family's own conventions both ways: a bundle that samples by
default (MiniGPT-4) decodes greedily with --greedy or --temperature 0, one that decodes greedily
(LLaVA-1.5) samples with --sample or a --temperature above 0, as LLaVA's scripts do. An option
that the chosen decoding never reads is refused, never ignored.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import click

from vlm2om.exporters.cli.common import backend_options, finite, open_bundle, open_pipeline, stack
from vlm2om.runtime.errors import Vlm2omError
from vlm2om.runtime.generation import GenerationConfig


def generation_config(defaults: GenerationConfig, *, sample: bool = False, greedy: bool = False, temperature: float | None = None,
                      top_p: float | None = None, seed: int | None = None, max_new_tokens: int | None = None,
                      repetition_penalty: float | None = None) -> GenerationConfig:
    """The bundle's GenerationConfig ``defaults`` changed by the run/chat options (None: not given).

    Greedy when --greedy or --temperature 0; sampling when --sample or a temperature > 0; else
    the bundle's choice. --top-p and --seed only steer sampling, so with greedy decoding they are
    refused (click.UsageError) with the reason. --repetition-penalty and --max-new-tokens apply to both.
    """
    if sample and greedy:
        raise click.UsageError("give either --sample or --greedy, not both")
    if temperature == 0 and sample:
        raise click.UsageError("--temperature 0 means greedy decoding; drop --sample or give a temperature > 0")
    if temperature and greedy:
        raise click.UsageError(f"--temperature {temperature:g} applies only to sampling, and --greedy turns "
                               "sampling off (--temperature 0 is greedy)")
    if sample or temperature:
        do_sample = True
    elif greedy or temperature == 0:
        do_sample = False
    else:
        do_sample = defaults.do_sample
    if not do_sample:
        why = (", and --greedy turns sampling off" if greedy else
               ", and --temperature 0 means greedy decoding" if temperature == 0 else
               "; this bundle decodes greedily by default: add --sample")
        for name, value in (("--top-p", top_p), ("--seed", seed)):
            if value is not None:
                raise click.UsageError(f"{name} applies only to sampling{why}")
    return defaults.but(do_sample=do_sample, temperature=temperature or None, top_p=top_p, seed=seed,
                        max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)


decoding_options = stack(  # what generation_config reads
    click.option("--sample", is_flag=True,
                 help="Sample each next token (at the bundle's temperature and top-p unless given), "
                      "also where the bundle decodes greedily by default."),
    click.option("--greedy", is_flag=True,
                 help="Take the most likely next token every step (the same as --temperature 0), "
                      "also where the bundle samples by default."),
    click.option("--temperature", type=click.FloatRange(min=0), callback=finite,
                 help="Divide the logits by this before sampling; a temperature > 0 turns sampling on, "
                      "0 means greedy decoding. Default: the bundle's (1.0 unless it sets one)."),
    click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), callback=finite,
                 help="Sample only from the most likely tokens that hold this probability mass; "
                      "sampling only. Default: the bundle's (1.0: all tokens, unless it sets one)."),
    click.option("--seed", type=int,
                 help="Seed of the sampler, for a repeatable answer; sampling only. "
                      "Default: a fresh seed each run."),
    click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), callback=finite,
                 help="Penalty on the scores of tokens already generated (1.0: none), greedy or "
                      "sampling. Default: the bundle's."),
    click.option("--max-new-tokens", type=click.IntRange(min=1),
                 help="At most this many new tokens per answer. Default: the bundle's."))

serving_options = stack(  # BUNDLE and where it runs
    backend_options(auto=True),
    click.option("--low-memory", is_flag=True,
                 help="Load each graph only while it runs: one graph's weights in memory at a time, "
                      "for a bundle larger than this machine's memory (slow: every step reloads)."))
image_option = stack(
    click.option("--image", required=True, type=click.Path(path_type=Path), help="Image file."),
    click.option("--exif-transpose/--no-exif-transpose", default=True, show_default=True,
                 help="Turn a photo upright by its EXIF orientation; --no-exif-transpose reads it as "
                      "MiniGPT-4's and LLaVA's own loaders do, which ignore the orientation."))


def _start(bundle, image, backend, device_id, threads, spin, no_hash_check, low_memory, exif_transpose,
           decoding: dict):
    """Open BUNDLE; the image (from its header) is checked before the bundle's files are hashed, and
    the decoding options before its graphs load (minutes for a 7B bundle)."""
    from vlm2om.runtime.preprocess import check_image

    check_image(image)
    b = open_bundle(bundle, no_hash_check)
    cfg = generation_config(GenerationConfig.from_manifest(b.manifest["generation"]), **decoding)
    pipe, chosen = open_pipeline(b, backend, device_id, threads, low_memory, spin, exif_transpose)
    return pipe, chosen, cfg


@click.command()
@image_option
@click.option("--prompt", required=True, help="The question about the image.")
@decoding_options
@serving_options
@click.option("--stats", is_flag=True, help="Print timings to stderr.")
def run(bundle, image, exif_transpose, prompt, stats, backend, device_id, threads, spin, no_hash_check, low_memory,
        **decoding):
    """Answer one PROMPT about one image with BUNDLE, streaming tokens as they come."""
    pipe, chosen, cfg = _start(bundle, image, backend, device_id, threads, spin, no_hash_check, low_memory, exif_transpose,
                               decoding)
    chat = pipe.chat(image)
    for piece in chat.ask(prompt, cfg):
        click.echo(piece, nl=False)
    click.echo()
    if stats:
        r = chat.last
        click.echo(f"backend {chosen} | image {chat.image_s * 1000:.1f} ms | prompt {r.prompt_tokens} tokens "
                   f"| first token {r.ttft_s * 1000:.1f} ms | {len(r.tokens)} tokens at {r.ms_per_token:.2f} "
                   f"ms/token | finish: {r.finish_reason}", err=True)


@click.command()
@image_option
@decoding_options
@serving_options
def chat(bundle, image, exif_transpose, backend, device_id, threads, spin, no_hash_check, low_memory, **decoding):
    """Multi-turn chat about an image. Type /reset to start over, /quit (or Ctrl-D) to leave."""
    pipe, _, cfg = _start(bundle, image, backend, device_id, threads, spin, no_hash_check, low_memory, exif_transpose,
                               decoding)
    conv = pipe.chat(image)
    interactive = sys.stdin.isatty()
    # Bytes that are not UTF-8 become U+FFFD instead of ending the chat in a decode error.
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace") \
        if hasattr(sys.stdin, "buffer") else sys.stdin
    while True:
        if interactive:
            click.echo("you> ", nl=False)
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            conv = pipe.chat(image)
            click.echo("(conversation reset)")
            continue
        if not line.strip():
            continue
        click.echo("assistant> ", nl=False)
        try:
            for piece in conv.ask(line.strip(), cfg):
                click.echo(piece, nl=False)
        except Vlm2omError as e:  # a turn that fails leaves the conversation as it was before it
            click.echo()
            click.echo(f"Error: {e} (the conversation goes on; /reset starts over)", err=True)
            continue
        click.echo()
