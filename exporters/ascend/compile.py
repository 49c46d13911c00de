"""``vlm2om compile``: turn a bundle's gear plan into ATC runs on the Ascend box.

It lints first (ATC takes minutes to fail on what the lint sees in a second), writes each
graph's ``--keep_dtype`` list from the lint's fp16 plan, runs ``atc`` from the bundle folder
(external weights resolve relative to it) and passes ATC's output through verbatim. Each OM
file is recorded in the manifest with its sha256 and the exact command, and a graph whose
ONNX hash, flags, SoC and ATC version match an OM already built is skipped. Without ``atc``
it refreshes ``compile_om.sh`` and says that ATC is needed. Never imports torch: this runs
where only the runtime and the CANN toolkit are installed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from vlm2om.runtime.bundle import MANIFEST, Bundle, sha256_file
from vlm2om.runtime.errors import InputError, Vlm2omError

from vlm2om.exporters.ascend import atc
from vlm2om.exporters.ascend.lint import DEFAULT_CANN, cann_target
from vlm2om.exporters.core.preflight import os_reason, unwritable_reason

SCRIPT = "compile_om.sh"


class CompileError(Vlm2omError):
    """ATC failed, is missing, or the bundle does not pass the lint."""


@dataclass(frozen=True)
class CompileOptions:
    soc: str = atc.DEFAULT_SOC
    cann: str = DEFAULT_CANN
    precision: str = atc.DEFAULT_PRECISION
    atc: str = "atc"  # the executable, looked up on PATH
    force: bool = False  # rebuild even where the compile cache matches
    script_only: bool = False  # only refresh compile_om.sh
    ignore_lint: bool = False  # compile despite lint errors

    def __post_init__(self):
        if self.precision not in atc.PRECISION_MODES:
            raise InputError(f"unknown precision mode '{self.precision}' (ATC knows: {', '.join(atc.PRECISION_MODES)})")
        if not re.fullmatch(r"Ascend[A-Za-z0-9_-]+", self.soc):
            raise InputError(f"SoC '{self.soc}' is not 'Ascend' + the Name column of `npu-smi info` (e.g. Ascend910B3)")
        cann_target(self.cann)


@dataclass
class CompileResult:
    built: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    script: Path | None = None
    atc_version: str | None = None


def atc_version(atc_path: str) -> str:
    """The CANN version as its installation records it: ``compiler/version.info`` (``Version=``)
    or ``<arch>-linux/ascend_toolkit_install.info`` (``version=``), looked for upwards from the
    real ``atc`` file, then under ``$ASCEND_TOOLKIT_HOME``. Unknown installs are identified by
    the sha256 of the atc file, so the compile cache still notices a different toolkit."""
    real = Path(os.path.realpath(atc_path))
    roots = list(real.parents)[:5]
    if os.environ.get("ASCEND_TOOLKIT_HOME"):
        roots.append(Path(os.environ["ASCEND_TOOLKIT_HOME"]))
    for root in roots:
        for info in [root / "compiler" / "version.info", root / "version.info",
                     *sorted(root.glob("*-linux/ascend_toolkit_install.info"))]:
            version = _read_version(info)
            if version:
                return version
    return f"unknown (atc sha256 {sha256_file(real)[:16]})"


def _read_version(path: Path) -> str | None:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip().lower() == "version" and value.strip():
            return value.strip()
    return None


def _om_pattern(name: str) -> re.Pattern:
    """``name.om`` or ``name_<os>_<arch>.om`` (ATC's suffix), never another graph's file."""
    return re.compile(rf"{re.escape(name)}(_[a-z]+_[a-z0-9_]+)?\.om")


def _om_files(root: Path, name: str) -> list[Path]:
    d = root / atc.OUT_DIR
    return sorted(p for p in d.iterdir() if _om_pattern(name).fullmatch(p.name)) if d.is_dir() else []


def precision_plan(bundle: Bundle, opts: CompileOptions, echo) -> dict[str, list[str]]:
    """Lint the bundle and return its --keep_dtype plan; refuse on lint errors unless told."""
    from vlm2om.exporters.ascend import lint

    if importlib.util.find_spec("onnx") is None:  # a deploy box without it: the plan recorded at export
        recorded = bundle.manifest.get("atc", {}).get("keep_dtype")
        echo("warning: the 'onnx' package is not installed, so the ATC lint cannot run; "
             + ("using the --keep_dtype plan recorded at export" if recorded is not None
                else "compiling without a --keep_dtype list (pip install onnx to get one)"))
        return recorded or {}
    findings = lint.lint_bundle_files(bundle.root, bundle.manifest["graphs"], opts.cann)
    if lint.errors(findings):
        table = lint.format_table(findings, show_info=False)
        if not opts.ignore_lint:
            raise CompileError(f"the bundle fails the ATC lint for CANN {opts.cann}:\n{table}\n"
                               "fix the export, or pass --ignore-lint to let ATC decide")
        echo(table)
    return lint.keep_dtype_plan(findings)


def open_for_compile(path) -> Bundle:
    """Open the bundle with every file checked, except that compile outputs (OM files and
    --keep_dtype lists) that are gone or altered are dropped from the manifest to be rebuilt."""
    root = Path(path)
    mpath = root / MANIFEST
    try:
        data = json.loads(mpath.read_text())
    except (OSError, ValueError):
        return Bundle.open(root)  # let it name the problem
    files, oms = data.get("files", {}), data.get("atc", {}).get("om", {})
    changed = False
    for name, om in list(oms.items()):
        for rel in (om.get("file"), om.get("keep_dtype")):
            meta = files.get(rel) if rel else None
            if meta and (not (root / rel).is_file() or sha256_file(root / rel) != meta["sha256"]):
                files.pop(rel)
                oms.pop(name, None)
                changed = True
    if changed:
        write_manifest(root, data)
    return Bundle.open(root)


def write_manifest(root: Path, data: dict) -> None:
    """manifest.json replaced atomically; a write that fails leaves the old one and no temp file."""
    tmp = root / f".{MANIFEST}.tmp-{os.getpid()}"
    try:
        with _writing(root / MANIFEST):
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, root / MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError of the block names ``path`` (a failed write() names no file)."""
    try:
        yield
    except OSError as e:
        if e.filename is None or Path(e.filename).name.startswith("."):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


class _Manifest:
    """The bundle's manifest.json, rewritten atomically after every change."""

    def __init__(self, bundle: Bundle):
        self.root, self.data = bundle.root, bundle.manifest
        self.atc = self.data.setdefault("atc", {})
        self.atc.setdefault("om", {})

    def record_file(self, rel: str) -> dict:
        p = self.root / rel
        meta = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        self.data.setdefault("files", {})[rel] = meta
        return meta

    def forget_file(self, rel: str) -> None:
        self.data.get("files", {}).pop(rel, None)

    def save(self) -> None:
        write_manifest(self.root, self.data)


def _write_script(man: _Manifest, opts: CompileOptions, plan: dict[str, list[str]]) -> Path:
    graphs = man.data["graphs"]
    path = man.root / SCRIPT
    with _writing(path):
        path.write_text(atc.compile_script(graphs, keep_dtype=plan, soc=opts.soc, precision=opts.precision))
        path.chmod(0o755)
    man.record_file(SCRIPT)
    man.atc.update({
        "commands": {n: atc.render(a) for n, a in atc.graph_commands(graphs, precision=opts.precision,
                                                                      keep_dtype=plan).items()},
        "default_soc": opts.soc, "precision_mode": opts.precision, "keep_dtype": plan})
    return path


def _cache_key(man: _Manifest, entry: dict, args: list[str], opts: CompileOptions, version: str,
               keep: str | None) -> dict:
    files = man.data.get("files", {})
    onnx = {f: files[f]["sha256"] if f in files else sha256_file(man.root / f)
            for f in [entry["file"], *entry.get("external_data", [])]}
    return {"onnx_sha256": onnx, "args": args, "soc": opts.soc, "precision_mode": opts.precision,
            "atc_version": version, "keep_dtype_sha256": sha256_file(man.root / keep) if keep else None}


def _cached(man: _Manifest, name: str, key: dict) -> bool:
    """The OM was built from the same inputs; open_for_compile already checked its hash."""
    om = man.atc["om"].get(name)
    return bool(om) and all(om.get(k) == v for k, v in key.items()) and om["file"] in man.data.get("files", {})


def _run_atc(cmd: list[str], cwd: Path, echo) -> int:
    """Run ATC with its stdout and stderr passed through line by line, verbatim."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        echo(line.rstrip("\n"))
    return proc.wait()


HINTS = (  # (text in ATC's output, what to do)
    ("te_padv3", "ATC's Pad kernel fails on some SoCs (te_padv3): export the padding as Slice/Concat"),
    ("No parser is registered", "an op this ATC cannot parse: run `vlm2om lint --cann <version>` and "
                                "decompose it into listed ops"),
    ("E10001", "an option value is invalid: check --soc against `npu-smi info` and the --input_shape "
               "names against the manifest"),
)


def _failure(name: str, rc: int, command: str, output: list[str]) -> CompileError:
    text = "\n".join(output)
    hints = [f"  hint: {hint}" for needle, hint in HINTS if needle in text]
    return CompileError(f"atc failed on graph '{name}' (exit {rc}); its output is above.\n"
                        f"  command (run in the bundle folder): {command}\n"
                        + ("\n".join(hints) + "\n" if hints else "")
                        + "  ATC's detailed logs: $HOME/ascend/log, or rerun with ASCEND_SLOG_PRINT_TO_STDOUT=1")


def check_writable(root: Path) -> None:
    """compile writes om/, compile_om.sh and manifest.json into the bundle: refuse at once, before
    the lint or any ATC run, where it cannot (a read-only mount: root cannot write it either)."""
    targets = [root, *(p for p in (root / MANIFEST, root / SCRIPT, root / atc.OUT_DIR) if p.exists())]
    bad = next((p for p in targets if not os.access(p, os.W_OK)), None)
    if bad is not None:
        what = "it" if bad == root else f"its {bad.name}"
        raise CompileError(f"bundle '{root}' is read-only: {what} {unwritable_reason(bad)}, and compile writes "
                           f"{atc.OUT_DIR}/, {SCRIPT} and {MANIFEST} there; nothing was written. Copy the bundle "
                           "to a writable folder and compile the copy")


def compile_bundle(path, opts: CompileOptions = CompileOptions(), echo: Callable[[str], None] = print) -> CompileResult:
    """Compile every graph of the bundle at ``path`` to OM (see the module docstring)."""
    root = Path(path)
    if (root / MANIFEST).is_file():  # else Bundle.open names what is wrong
        check_writable(root)
    try:
        return _compile(root, opts, echo)
    except OSError as e:
        path = Path(e.filename).resolve() if e.filename else None
        if path is not None and root.resolve() in path.parents:
            doing = f"while writing {path.relative_to(root.resolve())} in bundle '{root}'"
        else:
            doing = (f"on '{e.filename}' " if e.filename else "") + f"while compiling bundle '{root}'"
        raise CompileError(f"{os_reason(e)} {doing}; compile stopped there (run it again once that is "
                           "fixed: the OM files built so far are reused)") from None


def _compile(path: Path, opts: CompileOptions, echo: Callable[[str], None]) -> CompileResult:
    bundle = open_for_compile(path)
    man, result = _Manifest(bundle), CompileResult()
    plan = precision_plan(bundle, opts, echo)
    result.script = _write_script(man, opts, plan)
    man.save()
    if opts.script_only:
        echo(f"wrote {result.script}")
        return result
    atc_path = shutil.which(opts.atc)
    if atc_path is None:
        raise CompileError(f"ATC is needed to compile, and '{opts.atc}' is not on PATH: on the Ascend box, "
                           "source the CANN toolkit's set_env.sh (e.g. <install>/ascend-toolkit/set_env.sh) "
                           f"and run this again, or run {result.script} there. Wrote {result.script}.")
    version = result.atc_version = atc_version(atc_path)
    graphs = man.data["graphs"]
    (man.root / atc.OUT_DIR).mkdir(exist_ok=True)
    echo(f"ATC {version} ({atc_path}), SoC {opts.soc}, {opts.precision}, {len(graphs)} graphs")
    for i, (name, entry) in enumerate(graphs.items(), 1):
        keep = atc.keep_dtype_file(name) if atc.uses_keep_dtype(opts.precision, plan.get(name)) else None
        if keep:
            with _writing(man.root / keep):
                (man.root / keep).write_text("\n".join(plan[name]) + "\n")
        args = atc.atc_args(name, entry, opts.soc, opts.precision, keep_dtype=keep)
        key = _cache_key(man, entry, args, opts, version, keep)
        if not opts.force and _cached(man, name, key):
            echo(f"[{i}/{len(graphs)}] {name}: up to date ({man.atc['om'][name]['file']})")
            result.cached.append(name)
            continue
        _build(man, name, entry, args, key, keep, atc_path, echo, f"[{i}/{len(graphs)}]")
        result.built.append(name)
    return result


def _build(man: _Manifest, name: str, entry: dict, args: list[str], key: dict, keep: str | None,
           atc_path: str, echo, step: str) -> None:
    gears = len(entry.get("gears") or [])
    echo(f"{step} {name}: atc {'with ' + str(gears) + ' gears' if gears else 'static'} ...")
    for stale in _om_files(man.root, name):  # so that what is found afterwards is this run's
        stale.unlink()
        man.forget_file(stale.relative_to(man.root).as_posix())
    old = man.atc["om"].pop(name, None)
    if old and old.get("keep_dtype") and old["keep_dtype"] != keep:
        man.forget_file(old["keep_dtype"])
    man.save()
    command, lines = atc.render(args), []
    t0 = time.perf_counter()
    rc = _run_atc([atc_path, *args[1:]], man.root, lambda s: (lines.append(s), echo(s)))
    if rc != 0:
        raise _failure(name, rc, command, lines)
    found = _om_files(man.root, name)
    if len(found) != 1:
        raise CompileError(f"atc reported success for graph '{name}' but wrote {len(found)} files matching "
                           f"{atc.OUT_DIR}/{name}*.om: {[p.name for p in found]}")
    rel = found[0].relative_to(man.root).as_posix()
    meta = man.record_file(rel)
    if keep:
        man.record_file(keep)
    man.atc["om"][name] = {"file": rel, **meta, "command": command, "keep_dtype": keep, **key,
                           "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    man.save()
    echo(f"{step} {name}: {rel} ({meta['bytes'] / 2 ** 20:.1f} MiB, {time.perf_counter() - t0:.1f} s)")
