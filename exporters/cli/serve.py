"""`vlm2om run` and `vlm2om chat`: answer questions about an image with a bundle.

The decoding options follow each family's own conventions both ways: a bundle that samples by
default (MiniGPT-4) decodes greedily with --greedy or --temperature 0, one that decodes greedily
(LLaVA-1.5) samples with --sample or a --temperature above 0, as LLaVA's scripts do. An option
that the chosen decoding never reads is refused, never ignored.
"""
from __future__ import annotations

import codecs
import re
import sys
import warnings
from contextlib import contextmanager

import click

from vlm2om.exporters.cli.common import backend_options, finite, open_bundle, open_pipeline, stack
from vlm2om.runtime.errors import Vlm2omError
from vlm2om.runtime.generation import GenerationConfig


def generation_config(defaults: GenerationConfig, *, sample: bool = False, greedy: bool = False, temperature: float | None = None,
                      top_p: float | None = None, seed: int | None = None, max_new_tokens: int | None = None,
                      repetition_penalty: float | None = None, num_beams: int | None = None) -> GenerationConfig:
    """The bundle's GenerationConfig ``defaults`` changed by the run/chat options (None: not given).

    Greedy when --greedy or --temperature 0; sampling when --sample or a temperature > 0; else
    the bundle's choice. --top-p and --seed only steer sampling, so with greedy decoding they are
    refused (click.UsageError) with the reason. --repetition-penalty and --max-new-tokens apply to both.
    --num-beams above 1 searches greedily, so it is refused with sampling; a bundle whose own
    default is beam search samples with one beam when sampling is asked for.
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
    if num_beams is not None and num_beams > 1 and do_sample:
        why = ("--sample asks for sampling" if sample else f"--temperature {temperature:g} turns sampling on"
               if temperature else "this bundle samples by default")
        raise click.UsageError(f"--num-beams {num_beams} is greedy beam search (beam sampling is not offered), "
                               f"and {why}: add --greedy or drop --num-beams")
    if num_beams is None and do_sample and defaults.num_beams > 1:
        num_beams = 1
    return defaults.but(do_sample=do_sample, temperature=temperature or None, top_p=top_p, seed=seed,
                        max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, num_beams=num_beams)


def normal(ctx, param, value):
    """Click callback: a finite number, 0 or normal (nan, inf and denormals break the sampler's
    arithmetic: a denormal temperature divides the scores into inf)."""
    value = finite(ctx, param, value)
    if value and abs(value) < sys.float_info.min:
        greedy = "; 0 means greedy decoding" if param.name == "temperature" else ""
        raise click.BadParameter(f"{value:g} is too close to 0 to compute with (the smallest normal "
                                 f"number is {sys.float_info.min:.3g}){greedy}")
    return value


def question(ctx, param, value):
    """Click callback: an empty or blank --prompt (an unset shell variable, say) is refused, not
    answered as if it were a question; bytes that are not UTF-8 become U+FFFD with a warning, as
    chat's input does."""
    if value is None:
        return value
    if not value.strip():
        raise click.BadParameter("the prompt is empty" + (" (only white space)" if value else "") +
                                 ": give the question about the image")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # the command line's undecodable bytes, kept as lone surrogates
        click.echo("warning: --prompt is not UTF-8 text; its undecodable bytes are read as U+FFFD", err=True)
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


decoding_options = stack(  # what generation_config reads
    click.option("--sample", is_flag=True,
                 help="Sample each next token (at the bundle's temperature and top-p unless given), "
                      "also where the bundle decodes greedily by default."),
    click.option("--greedy", is_flag=True,
                 help="Take the most likely next token every step (the same as --temperature 0), "
                      "also where the bundle samples by default."),
    click.option("--temperature", type=click.FloatRange(min=0), callback=normal,
                 help="Divide the logits by this before sampling; a temperature > 0 turns sampling on, "
                      "0 means greedy decoding. Default: the bundle's (1.0 unless it sets one)."),
    click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), callback=normal,
                 help="Sample only from the most likely tokens that hold this probability mass; "
                      "sampling only. Default: the bundle's (1.0: all tokens, unless it sets one)."),
    click.option("--seed", type=click.IntRange(min=0),
                 help="Seed of the sampler, for a repeatable answer; sampling only. "
                      "Default: a fresh seed each run."),
    click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), callback=normal,
                 help="Penalty on the scores of tokens already generated (1.0: none), greedy or "
                      "sampling. Default: the bundle's."),
    click.option("--max-new-tokens", type=click.IntRange(min=1),
                 help="At most this many new tokens per answer. Default: the bundle's."),
    click.option("--num-beams", type=click.IntRange(min=1),
                 help="Beam search with this many beams, as transformers' generate(num_beams=N, "
                      "do_sample=False): greedy only, on the bundle's batch gears (it needs one of at "
                      "least N rows: export with --batch-gears); the answer prints whole at the end. "
                      "1: no beam search. Default: the bundle's (1 unless it sets one)."))

serving_options = stack(  # BUNDLE and where it runs
    backend_options(auto=True),
    click.option("--low-memory", is_flag=True,
                 help="Load each graph only while it runs: one graph's weights in memory at a time, "
                      "for a bundle larger than this machine's memory (slow: every step reloads)."))
image_option = stack(
    click.option("--image", required=True, type=click.Path(path_type=str),  # a Path would mangle a URL
                 help="Image file."),
    click.option("--exif-transpose/--no-exif-transpose", default=True, show_default=True,
                 help="Turn a photo upright by its EXIF orientation; --no-exif-transpose reads it as "
                      "MiniGPT-4's and LLaVA's own loaders do, which ignore the orientation."),
    click.option("--hd-num", type=click.IntRange(min=1),
                 help="Most 336 px crops an InternLM-XComposer2-4KHD bundle cuts the image into (its "
                      "HD_transform; the original chats with 25 or 55). Default: the bundle's. The cache "
                      "gears must hold the image rows it implies: (h*w+1)*144 + 1 + (h+1)*12."))


@contextmanager
def plain_warnings():
    """Warnings (a damaged image that still decodes, say) print as one ``warning: ...`` line, not
    in Python's form with a source file and line."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *args, **kw: click.echo(f"warning: {message}", err=True)
        yield


def _start(bundle, image, prompt, backend, device_id, threads, spin, no_hash_check, low_memory, exif_transpose,
           decoding: dict, hd_num: int | None = None):
    """The inputs are checked before anything slow is read, each as early as it can be: the image
    (decoded, so a truncated file is found too) before the bundle is opened, the decoding options
    and the question's length (from the manifest and tokenizer) before the bundle's files are
    hashed, and all of them before its graphs load (minutes for a 7B bundle).
    -> (pipeline, backend it runs on, GenerationConfig, the decoded image)."""
    from vlm2om.runtime.pipeline import check_hd_num, check_prompt
    from vlm2om.runtime.preprocess import load_image

    img = load_image(image, exif_transpose=exif_transpose)
    b = open_bundle(bundle, no_hash_check=True)  # the manifest, and every file there at its size
    cfg = generation_config(GenerationConfig.from_manifest(b.manifest["generation"]), **decoding)
    check_hd_num(b, hd_num)
    if prompt is not None:
        if not no_hash_check:  # the tokenizer counts the question: its own hash first (a small file)
            b.check_files(only=[b.manifest["tokenizer"]["file"]])
        check_prompt(b, prompt, image_sizes=[img.size], hd_num=hd_num)
    if not no_hash_check:
        b.check_files()
    # The image reaches the pipeline decoded and already turned (or not) as asked: it must not
    # read the EXIF block again.
    pipe, chosen = open_pipeline(b, backend, device_id, threads, low_memory, spin, exif_transpose=False, hd_num=hd_num)
    return pipe, chosen, cfg, img


@click.command()
@image_option
@click.option("--prompt", required=True, callback=question, help="The question about the image.")
@decoding_options
@serving_options
@click.option("--stats", is_flag=True, help="Print timings to stderr.")
def run(bundle, image, exif_transpose, hd_num, prompt, stats, backend, device_id, threads, spin, no_hash_check,
        low_memory, **decoding):
    """Answer one PROMPT about one image with BUNDLE, streaming tokens as they come."""
    with plain_warnings():
        pipe, chosen, cfg, img = _start(bundle, image, prompt, backend, device_id, threads, spin, no_hash_check,
                                        low_memory, exif_transpose, decoding, hd_num)
        chat = pipe.chat(img)
    for piece in chat.ask(prompt, cfg):
        click.echo(piece, nl=False)
    click.echo()
    if stats:
        r = chat.last
        click.echo(f"backend {chosen} | image {chat.image_s * 1000:.1f} ms | prompt {r.prompt_tokens} tokens "
                   f"| first token {r.ttft_s * 1000:.1f} ms | {len(r.tokens)} tokens at {r.ms_per_token:.2f} "
                   f"ms/token | finish: {r.finish_reason}", err=True)


_COMMAND = re.compile(r"/([A-Za-z][\w-]*)(?:\s|$)")  # "/reset", not "/usr/bin/env" or "//x"


def stdin_lines():
    """stdin's lines as text. Bytes that are not UTF-8 become U+FFFD with a warning, instead of
    ending the chat in a decode error."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream without bytes underneath
        yield from iter(sys.stdin.readline, "")
        return
    for raw in iter(stream.readline, b""):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            click.echo("warning: the line is not UTF-8 text; its undecodable bytes are read as U+FFFD", err=True)
            yield codecs.decode(raw, "utf-8", "replace")


def command_error(name: str) -> str:
    if name == "image":
        return ("/image: a chat is about the one image given with --image; start a new chat to ask about "
                "another image")
    return (f"unknown command '/{name}' (the commands are /reset and /quit); to ask a question that starts "
            "with '/', begin it with '//'")


@click.command()
@image_option
@decoding_options
@serving_options
def chat(bundle, image, exif_transpose, hd_num, backend, device_id, threads, spin, no_hash_check, low_memory,
         **decoding):
    """Multi-turn chat about an image. Type /reset to start over, /quit (or Ctrl-D) to leave."""
    with plain_warnings():
        pipe, _, cfg, img = _start(bundle, image, None, backend, device_id, threads, spin, no_hash_check,
                                   low_memory, exif_transpose, decoding, hd_num)
        conv = pipe.chat(img)
    del img  # the chat keeps the image's embeddings, not its pixels
    interactive = sys.stdin.isatty()
    lines = stdin_lines()
    while True:
        if interactive:
            click.echo("you> ", nl=False)
        line = next(lines, None)
        if line is None:  # end of input (Ctrl-D)
            if interactive:
                click.echo()
            break
        text = line.strip()
        command = _COMMAND.match(text)
        if command:
            name = command.group(1).lower()
            if name == "quit":
                break
            if name == "reset":
                conv.reset()
                click.echo("(conversation reset)")
            else:
                click.echo(f"Error: {command_error(name)}", err=True)
            continue
        if text.startswith("//"):
            text = text[1:]
        if not text:
            continue
        answer, started = conv.ask(text, cfg), False
        try:
            first = next(answer, "")  # the prompt's prefill: where a turn fails
            click.echo("assistant> " + first, nl=False)
            started = True
            for piece in answer:
                click.echo(piece, nl=False)
        except Vlm2omError as e:  # a turn that fails leaves the conversation as it was before it
            if started:
                click.echo()
            click.echo(f"Error: {e} (the conversation goes on; /reset starts over)", err=True)
            continue
        click.echo()
