"""`vlm2om lint` and `vlm2om compile`: the Ascend side, torch-free (they run on the Ascend box)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from vlm2om.exporters.ascend import atc


@click.command()
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option("--cann", default="7.0", show_default=True,
              help="CANN version whose ATC is targeted (5.0, 6.0, 7.0 or 8.0): opset range, IR version, op list.")
@click.option("--no-info", is_flag=True, help="Hide the info rows (the fp16 precision plan).")
def lint(target, cann, no_info):
    """Check TARGET (a bundle folder or one .onnx file) against what ATC accepts; exits 1 on errors."""
    from vlm2om.exporters.ascend import lint as atc_lint

    findings = atc_lint.lint_path(target, cann)
    click.echo(atc_lint.format_table(findings, show_info=not no_info))
    if atc_lint.errors(findings):
        sys.exit(1)


@click.command(name="compile")
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
    from vlm2om.exporters.ascend.compile import CompileOptions, compile_bundle

    opts = CompileOptions(soc=soc, cann=cann, precision=precision, atc=atc_cmd, force=force,
                          script_only=script_only, ignore_lint=ignore_lint)
    res = compile_bundle(bundle, opts, echo=click.echo)
    if not script_only:
        click.echo(f"{len(res.built)} built, {len(res.cached)} up to date; run it with "
                   f"`vlm2om chat {bundle} --backend om --image ...`")
