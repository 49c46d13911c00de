"""`vlm2om export MODEL`: a family's checkpoint or preset to a verified bundle.

The shared CLI names no family's options. A family's own options are the fields its
ExportOptions adds to RecipeOptions; once MODEL is known they become real options of this
command (typed, listed by `vlm2om export MODEL --help`), and `--opt NAME=VALUE` sets them too.
Importing this module imports no torch: the families are listed from the registry's names.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from types import ModuleType, UnionType
from typing import Union, get_args, get_origin, get_type_hints

import click

from vlm2om.exporters.cli.common import int_list
from vlm2om.exporters.families import FAMILIES, get_family

CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING, bool: click.BOOL}
_PEEKED = "vlm2om.export.family"  # ctx.meta key of the _Peeked record


@dataclass(frozen=True)
class FamilyOption:
    """One field of a family's ExportOptions that a command line can spell (int, float, str, bool);
    its help is the field's ``metadata={"help": ...}``."""

    name: str
    type: type
    default: object
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def describe(self) -> str:
        default = "" if self.default is None else f" (default {self.default})"
        return f"{self.name}={self.type.__name__.upper()}{default}" + (f": {self.help}" if self.help else "")

    def click_option(self) -> click.Option:
        text = self.help + ("" if self.default is None else f"  [default: {self.default}]")
        if self.type is bool:
            return click.Option([f"{self.flag}/--no-{self.flag[2:]}"], default=None, help=text)
        return click.Option([self.flag], type=CLICK_TYPES[self.type], default=None, help=text)

    def parse(self, text: str):
        try:
            return CLICK_TYPES[self.type].convert(text, None, None)
        except click.BadParameter as e:
            raise click.UsageError(f"--opt {self.name}={text}: {e.message}") from None


def family_options(options_cls: type) -> dict[str, FamilyOption]:
    """The fields ``options_cls`` adds to RecipeOptions whose type is a scalar; the others
    (nested model configs) are set from Python only."""
    from vlm2om.exporters.core.options import RecipeOptions

    shared = {f.name for f in fields(RecipeOptions)}
    hints = get_type_hints(options_cls)
    found = {}
    for f in fields(options_cls):
        hint = hints[f.name]
        kinds = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) in (Union, UnionType) else [hint]
        if f.name in shared or not f.init or len(kinds) != 1 or kinds[0] not in CLICK_TYPES:
            continue
        found[f.name] = FamilyOption(f.name, kinds[0], None if f.default is MISSING else f.default,
                                     f.metadata.get("help", ""))
    return found


def own_values(model: str, options: dict[str, FamilyOption], flags: dict, given: tuple[str, ...]) -> dict:
    """The family options set on the command line: its flags (None: not given) and --opt NAME=VALUE."""
    values = {k: v for k, v in flags.items() if v is not None}
    for item in given:
        name, sep, text = item.partition("=")
        key = name.strip().replace("-", "_")
        if key not in options:
            known = "; ".join(o.describe() for o in options.values())
            raise click.UsageError(f"--opt {item}: " + (f"{model}'s own options are {known}" if known
                                                        else f"{model} has no options of its own"))
        if not sep:
            raise click.UsageError(f"--opt {item}: expected NAME=VALUE")
        if key in values:
            raise click.UsageError(f"{model} option {key} given twice")
        values[key] = options[key].parse(text)
    return values


def _family(model: str) -> ModuleType:
    try:
        return get_family(model)
    except ImportError as e:
        raise click.ClickException(f"export needs torch and the export extras: pip install 'vlm2om[export]' "
                                   f"({e})") from None


@dataclass(frozen=True)
class _Peeked:
    name: str
    family: ModuleType
    params: list[click.Option]


class ExportCommand(click.Command):
    """Adds MODEL's own options to the shared ones before the real parse, and lists the models
    (from the registry, without importing torch) in the help."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        name = self._peek_model(ctx, args)
        try:
            family = get_family(name) if name else None
        except ImportError:  # no torch here: the command body says so
            family = None
        if family is not None:
            taken = {p.name for p in self.params}  # a clash with a shared option: --opt only
            own = [o.click_option() for o in family_options(family.ExportOptions).values()]
            ctx.meta[_PEEKED] = _Peeked(name, family, [p for p in own if p.name not in taken])
        return super().parse_args(ctx, args)

    def _peek_model(self, ctx: click.Context, args: list[str]) -> str | None:
        """MODEL, if a registered family is among the positional arguments (a family option
        before MODEL makes the parser take the option's name for MODEL)."""
        parser = self.make_parser(ctx)
        parser.ignore_unknown_options = True
        try:
            found, rest, _ = parser.parse_args(args=list(args))
        except click.UsageError:
            return None
        return next((a for a in (found.get("model"), *rest) if a in FAMILIES), None)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        peeked = ctx.meta.get(_PEEKED)
        return [*super().get_params(ctx), *(peeked.params if peeked else ())]

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        peeked = ctx.meta.get(_PEEKED)
        own = peeked.params if peeked else []
        shared = [p for p in self.get_params(ctx) if p not in own and not isinstance(p, click.Argument)]
        for title, params in (("Options", shared), (f"{peeked.name if peeked else ''} options", own)):
            rows = [r for r in (p.get_help_record(ctx) for p in params) if r is not None]
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        peeked = ctx.meta.get(_PEEKED)
        with formatter.section("Models"):
            formatter.write_dl([(f.name, f.title) for f in FAMILIES.values()])
        formatter.write_paragraph()
        if peeked:
            formatter.write_text(f"{peeked.name} presets: {', '.join(peeked.family.PRESETS)}.")
        else:
            formatter.write_text("A model's own options: `vlm2om export MODEL --help` lists them, with its "
                                 "presets; give them as --NAME VALUE or as --opt NAME=VALUE.")


@click.command(cls=ExportCommand)
@click.argument("model")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Folder with the original checkpoint files (see README for the layout).")
@click.option("--preset", default=None,
              help="Random-weight preset when no --checkpoint: tiny (default); `vlm2om export MODEL --help` "
                   "lists MODEL's.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None,
              help="Dtype of the exported graphs' weights and activations (LayerNorms and softmax "
                   "stay fp32). Default: float16 for --checkpoint (ATC's own default), float32 for a preset.")
@click.option("--seq-gears", callback=int_list, help="Prompt-chunk lengths compiled, e.g. 1,32,128,512.")
@click.option("--cache-gears", callback=int_list, help="KV-cache capacities compiled, e.g. 256,512,1024,2048.")
@click.option("--layers-per-group", type=click.IntRange(min=1), help="Decoder layers per ONNX file.")
@click.option("--kv-layout", type=click.Choice(["stacked", "per_layer"]), default=None,
              help="How decoder graphs take the KV cache: stacked, one tensor per layer group (fewest dynamic "
                   "dims per ATC gear, for every CANN release; the default, except the bench preset's), or "
                   "per_layer, a key and a value per layer "
                   "(no per-step copy of the cache on onnxruntime; two dynamic dims per layer in a gear, which "
                   "needs CANN 7.0 or later).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a random-weight preset.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--keep-going", is_flag=True,
              help="Write the bundle even when the ATC lint finds errors (it still prints them).")
@click.option("--golden", is_flag=True,
              help="Store golden inputs and outputs (golden.npz) so `vlm2om verify --golden` can check the "
                   "bundle, or its OM files, on a box without torch.")
@click.option("--batch-gears", callback=int_list,
              help="Batch sizes compiled for the embed and decoder graphs, e.g. 1,2,4,8 (must include 1); "
                   "seq x cache x batch gears may not exceed ATC's 100.")
@click.option("--opt", "given", multiple=True, metavar="NAME=VALUE",
              help="One of MODEL's own options (repeatable); `vlm2om export MODEL --help` lists them.")
def export(model, out, checkpoint, preset, dtype, seq_gears, cache_gears, layers_per_group, kv_layout, seed,
           no_simplify, keep_going, golden, batch_gears, given, **flags):
    """Export MODEL to a verified bundle of ONNX subgraphs."""
    family = _family(model)
    from vlm2om.exporters.core.driver import write_bundle
    from vlm2om.exporters.core.extras import ExportExtras, check_batch_gears

    extras = ExportExtras(golden=golden, batch_gears=check_batch_gears(batch_gears or ()))
    if checkpoint is not None and preset is not None:
        raise click.UsageError("give either --checkpoint or --preset, not both")
    if checkpoint is not None and not checkpoint.is_dir():
        raise click.BadParameter(f"'{checkpoint}' is not a folder", param_hint="--checkpoint")
    own = own_values(model, family_options(family.ExportOptions), flags, given)
    opts = family.ExportOptions(preset=preset or ("tiny" if checkpoint is None else None),
                                checkpoint=checkpoint, dtype=dtype, seq_gears=seq_gears,
                                cache_gears=cache_gears, layers_per_group=layers_per_group, kv_layout=kv_layout,
                                seed=seed, **own)
    click.echo(f"building {model} subgraphs "
               f"({'checkpoint ' + str(checkpoint) if checkpoint else 'preset ' + opts.preset}) ...")
    plan = family.plan(opts)
    ignored = plan.provenance.get("source", {}).get("ignored_keys", [])
    if ignored:
        click.echo(f"ignoring {len(ignored)} checkpoint keys the model never uses:")
        for line in ignored:
            click.echo(f"  {line}")
    write_bundle(plan, out, echo=click.echo, simplify=not no_simplify, keep_going=keep_going, extras=extras)
