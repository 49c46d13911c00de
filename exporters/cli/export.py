"""`vlm2om export MODEL`: a family's checkpoint or preset to a verified bundle.

The shared CLI names no family's options. A family's own options are the fields its
ExportOptions adds to RecipeOptions; once MODEL is known they become real options of this
command (typed, listed by `vlm2om export MODEL --help`), and `--opt NAME=VALUE` sets them too.
Importing this module imports no torch: the families are listed from the registry's names.

Fail fast: the shared options, the gear lists, ``--out`` and ``--checkpoint`` (and the configs in
it) are checked before a family is imported (``ExportCommand.preflight``), MODEL's own options
from its ``options`` module alone, and only then is the recipe (and torch) imported.
"""
from __future__ import annotations

import importlib
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from types import ModuleType, UnionType
from typing import Union, get_args, get_origin, get_type_hints

import click

from vlm2om.exporters.cli.common import int_list
from vlm2om.exporters.core import preflight
from vlm2om.exporters.core.options import check_gear_lists
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
    try:
        hints = get_type_hints(options_cls)
    except NameError:  # a config type imported for type checkers only: read the annotations' text
        hints = {f.name: f.type for f in fields(options_cls)}
    found = {}
    for f in fields(options_cls):
        kind = _scalar(hints[f.name])
        if f.name in shared or not f.init or kind is None:
            continue
        found[f.name] = FamilyOption(f.name, kind, None if f.default is MISSING else f.default,
                                     f.metadata.get("help", ""))
    return found


def _scalar(hint) -> type | None:
    """int, float, str or bool from ``X`` or ``X | None`` (a type, or its text); else None."""
    if isinstance(hint, str):
        kinds = {part.strip() for part in hint.split("|")} - {"None"}
        names = {t.__name__: t for t in CLICK_TYPES}
        return names.get(kinds.pop()) if len(kinds) == 1 else None
    kinds = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) in (Union, UnionType) else [hint]
    return kinds[0] if len(kinds) == 1 and kinds[0] in CLICK_TYPES else None


def export_options_class(model: str) -> type | None:
    """MODEL's ExportOptions from its ``options`` module, without the recipe; None where that
    cannot be imported here (no torch, when the module needs it)."""
    try:
        return importlib.import_module(f"{FAMILIES[model].module}.options").ExportOptions
    except ImportError:
        return None


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
    params: list[click.Option]


class ExportCommand(click.Command):
    """Checks the shared options before any family is imported, adds MODEL's own options before the
    real parse, and lists the models (from the registry, without importing torch) in the help."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        name, found = self._peek(ctx, args)
        if found is not None and not ctx.resilient_parsing and not set(args) & set(ctx.help_option_names):
            self.preflight(ctx, found)
        options_cls = export_options_class(name) if name else None
        if options_cls is not None:
            taken = {p.name for p in self.params}  # a clash with a shared option: --opt only
            own = [o.click_option() for o in family_options(options_cls).values()]
            ctx.meta[_PEEKED] = _Peeked(name, [p for p in own if p.name not in taken])
        return super().parse_args(ctx, args)

    def _peek(self, ctx: click.Context, args: list[str]) -> tuple[str | None, dict | None]:
        """MODEL, if a registered family is among the positional arguments (a family option
        before MODEL makes the parser take the option's name for MODEL), and the shared options
        as given (None where they do not parse)."""
        parser = self.make_parser(ctx)
        parser.ignore_unknown_options = True
        try:
            found, rest, _ = parser.parse_args(args=list(args))
        except click.UsageError:
            return None, None
        return next((a for a in (found.get("model"), *rest) if a in FAMILIES), None), found

    def preflight(self, ctx: click.Context, found: dict) -> None:
        """The shared options' types and callbacks, then what they say together (torch-free)."""
        given = {}
        for p in self.params:
            if isinstance(p, click.Option) and found.get(p.name) is not None:
                try:
                    given[p.name] = p.process_value(ctx, found[p.name])
                except click.BadParameter as e:  # name the option, as click's own parse does
                    e.ctx, e.param = e.ctx or ctx, e.param or p
                    raise
        check_export_args(**{k: given.get(k) for k in ("out", "checkpoint", "preset", "seq_gears", "cache_gears",
                                                       "batch_gears", "given")})

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
            try:
                presets = ", ".join(get_family(peeked.name).PRESETS)
            except ImportError:  # no torch here: the presets are the recipe's
                presets = "(listed where torch is installed)"
            formatter.write_text(f"{peeked.name} presets: {presets}.")
        else:
            formatter.write_text("A model's own options: `vlm2om export MODEL --help` lists them, with its "
                                 "presets; give them as --NAME VALUE or as --opt NAME=VALUE.")


def check_export_args(out: Path | None, checkpoint: Path | None, preset: str | None, seq_gears, cache_gears,
                      batch_gears, given: tuple[str, ...] | None) -> None:
    """Everything the shared options tell without a family or torch (the command's first step)."""
    if checkpoint is not None and preset is not None:
        raise click.UsageError("give either --checkpoint or --preset, not both")
    for item in given or ():
        if "=" not in item:
            raise click.UsageError(f"--opt {item}: expected NAME=VALUE")
    check_gear_lists(seq_gears, cache_gears, batch_gears)
    if out is not None:
        preflight.check_out(out)
    if checkpoint is not None:
        preflight.check_checkpoint_folder(checkpoint)


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
    from vlm2om.exporters.core.extras import ExportExtras, check_batch_gears

    options_cls = _options_class(model)
    own = own_values(model, family_options(options_cls), flags, given)
    opts = options_cls(preset=preset or ("tiny" if checkpoint is None else None), checkpoint=checkpoint, dtype=dtype,
                       seq_gears=seq_gears, cache_gears=cache_gears, layers_per_group=layers_per_group,
                       kv_layout=kv_layout, seed=seed, **own)
    extras = ExportExtras(golden=golden, batch_gears=check_batch_gears(batch_gears or ()))
    family = _family(model)  # the recipe, and torch with it
    from vlm2om.exporters.core.driver import write_bundle

    click.echo(f"building {model} subgraphs "
               f"({'checkpoint ' + str(checkpoint) if checkpoint else 'preset ' + opts.preset}) ...")
    plan = family.plan(opts)
    ignored = plan.provenance.get("source", {}).get("ignored_keys", [])
    if ignored:
        click.echo(f"ignoring {len(ignored)} checkpoint keys the model never uses:")
        for line in ignored:
            click.echo(f"  {line}")
    from vlm2om.exporters.core.staging import ExportInterrupted

    try:
        write_bundle(plan, out, echo=click.echo, simplify=not no_simplify, keep_going=keep_going, extras=extras)
    except ExportInterrupted as e:
        raise Interrupted(str(e)) from None


class Interrupted(click.ClickException):
    exit_code = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def _options_class(model: str) -> type:
    if model not in FAMILIES:
        get_family(model)  # raises, naming the models there are
    return export_options_class(model) or _family(model).ExportOptions  # the latter says what to install
