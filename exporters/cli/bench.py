"""`vlm2om bench`: the performance report of a bundle on the seeds' grid.

Importing this module imports no torch; `--baseline torch` imports it when asked.
"""
from __future__ import annotations

from pathlib import Path

import click

from vlm2om.exporters.cli.common import backend_options, int_list, open_bundle, open_pipeline, report_folder_option


@click.command()
@click.option("--batch", "batches", callback=int_list, default="1,2,4,8", show_default=True,
              help="Batch sizes (each needs a batch gear: export with --batch-gears).")
@click.option("--input-lengths", callback=int_list, default="32,64,128,256,512,1024", show_default=True,
              help="Prompt positions (image tokens included); cells the gears cannot hold are skipped.")
@click.option("--output-lengths", callback=int_list, default=None,
              help="Generated tokens, paired with --input-lengths in order (one value: for all). "
                   "Default: equal to the input lengths, as the seeds measure.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Timed runs per cell (the median is reported) after one warm-up run.")
@click.option("--image", type=click.Path(path_type=str),  # checked by the runtime's reader (a Path mangles a URL)
              help="Image for every prompt (default: a synthetic one).")
@click.option("--exif-transpose/--no-exif-transpose", default=True, show_default=True,
              help="Turn --image upright by its EXIF orientation; --no-exif-transpose reads it as MiniGPT-4's "
                   "and LLaVA's own loaders do, which ignore the orientation.")
@click.option("--baseline", type=click.Choice(["torch"]),
              help="Also run transformers/PyTorch on the same weights and print vlm2om/torch ratios.")
@click.option("--reference", "checkpoint", type=click.Path(file_okay=False, path_type=Path),
              help="With --baseline: the checkpoint folder, if not where the bundle was exported from.")
@backend_options(auto=False)
@report_folder_option
def bench(bundle, batches, input_lengths, output_lengths, repeats, image, exif_transpose, baseline, checkpoint,
          backend, device_id, threads, spin, no_hash_check, out_dir):
    """Performance report of BUNDLE on the seeds' grid: batch sizes x input/output lengths; writes
    {batch}_batch_performance_{model}.csv per batch size and prints the table."""
    from vlm2om.runtime.bench import BenchOptions, run_grid

    try:
        opts = BenchOptions(tuple(batches), tuple(input_lengths), tuple(output_lengths or input_lengths), repeats)
        opts.pairs()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--output-lengths") from None
    if image is not None:  # from its header, before the bundle's files are hashed
        from vlm2om.runtime.preprocess import check_image

        check_image(image)
    b = open_bundle(bundle, no_hash_check)
    pipe, _ = open_pipeline(b, backend, device_id, threads, spin=spin, exif_transpose=exif_transpose)
    click.echo(f"benchmarking {bundle} on {backend} (batch gears {pipe.decoder.batch_gears}) ...")
    rows, cases = run_grid(pipe, opts, image, echo=click.echo)
    pipe.close()
    if not rows:
        raise click.ClickException(f"no cell of the grid fits the gears of {bundle}; choose other lengths")
    base = None
    if baseline:
        try:
            from vlm2om.exporters.verify.baseline import run_baseline
        except ImportError as e:
            raise click.ClickException(f"bench --baseline torch needs torch and transformers ({e})") from None

        base = run_baseline(b, cases, threads, checkpoint, echo=click.echo, repeats=repeats)
    from vlm2om.exporters.verify.bench_table import print_and_write

    print_and_write(rows, base, b.manifest["family"], out_dir, backend, echo=click.echo)
