"""What several commands share: the group that turns vlm2om's errors into one-line messages,
option parsers, the backend options and opening a bundle or its pipeline.

Torch-free: every command that runs a bundle works on a deploy box without torch.
"""
from __future__ import annotations

import math
from pathlib import Path

import click

from vlm2om.runtime.errors import Vlm2omError


class Group(click.Group):
    """The ``vlm2om`` group: a Vlm2omError from any command is the user's to fix (a bad file,
    option or input), so it prints as ``Error: <message>`` with exit status 1, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Vlm2omError as e:
            raise click.ClickException(str(e)) from None


def int_list(ctx, param, value):
    """Click callback: "1,32,128" -> (1, 32, 128); None stays None."""
    if value is None:
        return None
    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got '{value}'") from None
    if not values:  # an empty list would silently mean "the default"
        raise click.BadParameter(f"expected comma-separated integers, got '{value}'; leave the option out "
                                 "for the default")
    return values


def finite(ctx, param, value):
    """Click callback: refuse nan and inf (click's FloatRange lets nan through)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"expected a finite number, got {value}")
    return value


def stack(*decorators):
    """One decorator made of several, written in the order --help lists them."""
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def backend_options(auto: bool):
    """BUNDLE and the options that choose where its graphs run. ``auto``: offer (and default to)
    --backend auto, which runs the OM files when the bundle has them and ais_bench imports."""
    choices, default = (["auto", "ort", "om"], "auto") if auto else (["ort", "om"], "ort")
    picks = (" auto picks om when the bundle has OM files and ais_bench imports, else ort." if auto else "")
    return stack(
        click.argument("bundle", type=click.Path(path_type=Path)),
        click.option("--backend", type=click.Choice(choices), default=default, show_default=True,
                     help="Session backend: om runs the OM files `vlm2om compile` recorded, through "
                          "ais_bench on an Ascend NPU; ort runs the ONNX graphs on onnxruntime;" + picks),
        click.option("--device-id", type=click.IntRange(min=0), default=0, show_default=True,
                     help="NPU device id for the om backend."),
        click.option("--threads", type=click.IntRange(min=0), default=0,
                     help="onnxruntime intra-op threads (0: all cores)."),
        click.option("--spin/--no-spin", default=False, show_default=True,
                     help="onnxruntime: --spin makes every graph share one thread pool whose threads spin "
                          "between ops (about 15% faster decoding on a quiet machine, much slower when other "
                          "work competes for the cores); --no-spin, the default, gives each graph a pool that "
                          "sleeps between ops."),
        click.option("--no-hash-check", is_flag=True, help="Skip the sha256 checks of the bundle's files."))


def report_folder_option(f):
    """--out for the commands that write CSV and JSON reports."""
    return click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
                        show_default=True, help="Folder for the CSV and JSON reports.")(f)


def open_bundle(path: Path, no_hash_check: bool):
    from vlm2om.runtime import Bundle

    return Bundle.open(path, verify_hashes=not no_hash_check)


def open_pipeline(bundle, backend: str, device_id: int, threads: int, low_memory: bool = False, spin: bool = False,
                  exif_transpose: bool = True, hd_num: int | None = None):
    """The pipeline of an open bundle's task on the chosen backend -> (pipeline, backend it runs on).
    ``hd_num``: the most views an hd_transform bundle cuts an image into (None: the manifest's)."""
    from vlm2om.runtime.backends import resolve_backend
    from vlm2om.runtime.backends.om import has_om
    from vlm2om.runtime.pipeline import open_pipeline as pipeline_of

    chosen = resolve_backend(backend, bundle)
    if backend == "auto" and chosen == "ort" and has_om(bundle):
        click.echo("note: the bundle has OM files but ais_bench does not import here; running on onnxruntime",
                   err=True)
    return pipeline_of(bundle, chosen, exif_transpose=exif_transpose, threads=threads, device_id=device_id,
                       low_memory=low_memory, spin=spin, hd_num=hd_num), chosen
