"""The manifest's schema, checked when a bundle opens (``Bundle.open``), so that a damaged or
hand-edited manifest is named by file and key path at open instead of failing later as a
``KeyError`` or ``TypeError`` deep in a run.

It checks what the runtime and ``vlm2om verify`` read, and only that (``docs/bundle.md``,
*Validation*): the types of every key they read, that the names the manifest uses point at
something (a graph's file is listed in ``files``, the pipeline's graphs exist, every gear gives a
value to every gear dim), and that the parts fit each other where the runtime relies on it (the
roles of the embed and decoder tensors, the KV cache's layout and capacities, the image chain).
Known values come from the modules that read them (tensor roles, attention, prompt and KV cache
kinds, BOS rules); the task and the tokenizer kind are only type-checked here, and the pipeline
and the tokenizer name an unknown one. Plain Python over the parsed JSON: no schema package.
"""
from __future__ import annotations

import re
from pathlib import PurePosixPath

from .errors import BundleError, InputError
from .generation import GenerationConfig
from .manifest_pipeline import check_pipeline
from .manifest_types import (BOOL, COUNT, DTYPE, LIST, NAME, NUMBER, OBJECT, POSITIVE, SHA256, TEXT, TEXTS, Checker,
                             Kind, join, nullable, show)
from .prompts import KINDS as PROMPT_KINDS
from .prompts.fastchat import BOS_RULES

MAX_SHOWN = 12  # problems listed; the rest are counted
TOP = {"schema_version": POSITIVE, "family": NAME, "task": NAME, "files": OBJECT, "graphs": OBJECT,
       "pipeline": OBJECT, "kv_cache": OBJECT, "tokenizer": OBJECT, "prompt": OBJECT, "generation": OBJECT,
       "preprocess": OBJECT}
OPTIONAL_TOP = {"variant": TEXT, "dtype": DTYPE, "provenance": OBJECT, "model": OBJECT, "special_tokens": OBJECT,
                "verification": OBJECT, "atc": OBJECT}
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")  # runtime/preprocess.py
SIZE2 = Kind("[width, height], two positive integers",
             lambda v: isinstance(v, list) and len(v) == 2 and all(POSITIVE.ok(x) for x in v))
CHANNELS = Kind("a list of 1 or 3 finite numbers",
                lambda v: isinstance(v, list) and len(v) in (1, 3) and all(NUMBER.ok(x) for x in v))
INTERP = Kind(f"one of {', '.join(INTERPOLATIONS)}", lambda v: v in INTERPOLATIONS)
STEPS = {"rgb": {}, "resize": {"size": SIZE2, "interpolation": INTERP}, "pad_to_square": {"fill": CHANNELS},
         "resize_shortest": {"size": POSITIVE, "interpolation": INTERP},
         "center_crop": {"size": Kind("a positive integer or [width, height]",
                                      lambda v: POSITIVE.ok(v) or SIZE2.ok(v))},
         "to_float": {}, "normalize": {"mean": CHANNELS, "std": CHANNELS},
         "hd_transform": {"hd_num": POSITIVE, "size": POSITIVE, "fill": CHANNELS}}
# What each prompt kind of runtime/prompts/ reads (True: required).
PROMPT_COMMON = {"system": (TEXT, True), "sep": (TEXT, True), "roles": (Kind("two strings", lambda v: isinstance(
    v, list) and len(v) == 2 and all(isinstance(r, str) for r in v)), True), "image_message": (TEXT, True),
    "image_message_end": (TEXT, True), "image_placeholder": (NAME, True), "image_join": (TEXT, False),
    "bos": (NAME, False), "legacy": (BOOL, False), "stop_strings": (TEXTS, False),
    "answer_split": (nullable(TEXT), False),
    "specials": (Kind("an object of token text -> id", lambda v: isinstance(v, dict) and all(
        k and COUNT.ok(i) for k, i in v.items())), False)}
PROMPT_FIELDS = {"fastchat_single": PROMPT_COMMON, "fastchat_two": {**PROMPT_COMMON, "sep2": (TEXT, True)},
                 "glm_qa": {"roles": PROMPT_COMMON["roles"], "sep": (TEXT, True), "image_open": (TEXT, True),
                            "image_close": (TEXT, True), "suffix": (TEXTS, True),
                            "answer_split": (nullable(TEXT), False), "stop_strings": (TEXTS, False),
                            "hf_cleanup": (BOOL, False)},
                 "internlm2_chat": {**{k: PROMPT_COMMON[k] for k in PROMPT_COMMON if k != "sep"},
                                    "system_role": (TEXT, True), "begin": (TEXT, True), "end": (TEXT, True)}}
GENERATION = {"max_new_tokens": POSITIVE, "min_new_tokens": COUNT, "do_sample": BOOL, "temperature": NUMBER,
              "top_p": NUMBER, "top_k": COUNT, "repetition_penalty": NUMBER, "seed": nullable(COUNT),
              "stop_on_eos": BOOL, "stop_strings": nullable(TEXTS), "max_length": nullable(POSITIVE),
              "invalid_score_token": nullable(COUNT), "num_beams": POSITIVE, "length_penalty": NUMBER,
              "early_stopping": BOOL}
INSIDE = Kind("a relative path inside the bundle folder", lambda v: isinstance(v, str) and _inside(v))


def _inside(rel: str) -> bool:
    p = PurePosixPath(rel.replace("\\", "/"))
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and not re.match(r"^[A-Za-z]:", rel)


def check_manifest(m: dict, where: str) -> None:
    """Raise one ``BundleError`` listing every problem of the (upgraded) manifest ``m``;
    ``where`` names its file in the message."""
    problems = manifest_problems(m)
    if not problems:
        return
    if len(problems) == 1:
        raise BundleError(f"{where}: {problems[0]}")
    shown = problems[:MAX_SHOWN] + ([f"... and {len(problems) - MAX_SHOWN} more"] if len(problems) > MAX_SHOWN else [])
    raise BundleError(f"{where} has {len(problems)} problems (a damaged or hand-edited manifest; re-export "
                      "the bundle or fix these keys):\n  " + "\n  ".join(shown))


def manifest_problems(m) -> list[str]:
    """Every problem of the manifest, one line each, in the order of the keys."""
    c = Checker()
    if not isinstance(m, dict):
        return [f"the manifest must be a JSON object, got {show(m)}"]
    top = {k: c.get(m, k, "", kind) for k, kind in TOP.items()}
    for k, kind in OPTIONAL_TOP.items():
        c.get(m, k, "", kind, required=False)
    files = _files(c, top["files"]) if top["files"] is not None else None
    graphs = {name: g for name, g in (top["graphs"] or {}).items() if _graph(c, name, g, files)}
    if top["graphs"] == {}:
        c.bad("graphs", "is empty: a bundle has at least its embed and decoder graphs")
    if top["pipeline"] is not None and top["graphs"] is not None:
        check_pipeline(c, top["pipeline"], top["graphs"], graphs, top["kv_cache"], top["tokenizer"])
    if top["tokenizer"] is not None:
        _tokenizer(c, top["tokenizer"], files)
    if top["prompt"] is not None:
        _prompt(c, top["prompt"])
    if top["generation"] is not None:
        _generation(c, top["generation"])
    if top["preprocess"] is not None:
        _preprocess(c, top["preprocess"])
        if isinstance(top["pipeline"], dict):
            _views(c, top["pipeline"], top["preprocess"])
    _verification(c, m.get("verification"), files)
    _atc(c, m.get("atc"))
    if isinstance(m.get("provenance"), dict):  # what `verify --reference` rebuilds the modules from
        c.get(m["provenance"], "options", "provenance", nullable(OBJECT), required=False)
    return c.problems


def _fields(c: Checker, obj: dict, path: str, fields: dict) -> None:
    for key, (kind, required) in fields.items():
        c.get(obj, key, path, kind, required)


def _files(c: Checker, files: dict) -> set[str]:
    """The names ``files`` lists (each entry's own problems are reported here)."""
    for name, meta in files.items():
        path = join("files", name)
        if not _inside(name):
            c.bad(path, "must name a relative path inside the bundle folder")
        elif not isinstance(meta, dict):
            c.bad(path, f"must be an object with sha256 and bytes, got {show(meta)}")
        else:
            c.get(meta, "sha256", path, SHA256)
            c.get(meta, "bytes", path, COUNT)
    return set(files)


def _listed(c: Checker, path: str, rel, files: set[str] | None, what: str) -> None:
    """``rel`` is listed in ``files`` (None: files itself is broken, already named)."""
    if files is not None and isinstance(rel, str) and INSIDE.ok(rel) and rel not in files:
        c.bad(path, f"names '{rel}', which files does not list ({what} must be hashed like every bundle file)")


def _graph(c: Checker, name: str, g, files: set[str]) -> bool:
    """Check one ``graphs`` entry; True when it is sound enough for the cross checks."""
    path = join("graphs", name)
    before = len(c.problems)
    if not isinstance(g, dict):
        c.bad(path, f"must be an object, got {show(g)}")
        return False
    _listed(c, join(path, "file"), c.get(g, "file", path, INSIDE), files, "a graph's file")
    for i, rel in enumerate(c.get(g, "external_data", path, LIST, required=False) or []):
        at = join(join(path, "external_data"), i)
        if INSIDE.ok(rel):
            _listed(c, at, rel, files, "an external-data file")
        else:
            c.bad(at, f"must be {INSIDE.what}, got {show(rel)}")
    dims: set[str] = set()
    for kind in ("inputs", "outputs"):
        specs = c.get(g, kind, path, LIST)
        if specs == []:
            c.bad(join(path, kind), "is empty")
        seen = set()
        for i, spec in enumerate(specs or []):
            where = join(join(path, kind), i)
            if not isinstance(spec, dict):
                c.bad(where, f"must be an object with name, dtype and shape, got {show(spec)}")
                continue
            tensor = c.get(spec, "name", where, NAME)
            if tensor in seen:
                c.bad(join(where, "name"), f"'{tensor}' is declared twice in {kind}")
            seen.add(tensor)
            c.get(spec, "dtype", where, DTYPE)
            c.get(spec, "role", where, NAME, required=False)
            c.get(spec, "layer", where, COUNT, required=False)
            shape = c.get(spec, "shape", where, LIST)
            for j, d in enumerate(shape or []):
                if isinstance(d, str) and d:
                    dims.add(d)
                elif not POSITIVE.ok(d):
                    c.bad(join(join(where, "shape"), j), f"must be a positive integer (static) or the name of a "
                                                         f"gear dim, got {show(d)}")
    _gears(c, path, g, dims)
    return len(c.problems) == before


def _gears(c: Checker, path: str, g: dict, dims: set[str]) -> None:
    where = join(path, "gears")
    if "gears" not in g:
        c.bad(where, "is missing (null for a graph of static shapes)")
        return
    gears = g["gears"]
    if gears is None:
        if dims:
            c.bad(where, f"is null, but the shapes use gear dims {sorted(dims)}: list the values they take")
        return
    if not isinstance(gears, list) or not gears:
        c.bad(where, f"must be a non-empty list of gears ({{dim: value}}) or null, got {show(gears)}")
        return
    lacking, unused = [], []
    for i, gear in enumerate(gears):
        at = join(where, i)
        if not isinstance(gear, dict):
            c.bad(at, f"must be an object mapping each gear dim to a positive integer, got {show(gear)}")
            continue
        for dim, value in gear.items():
            if not POSITIVE.ok(value):
                c.bad(join(at, dim), f"must be a positive integer, got {show(value)}")
        lacking.append((at, sorted(dims - set(gear))))
        unused.append((at, sorted(set(gear) - dims)))
    for found, text in ((lacking, "gives no value for gear dim {}, which the shapes use"),
                        (unused, "names {}, which no input or output shape of the graph uses")):
        if len(found) == len(gears) > 1 and found[0][1] and all(names == found[0][1] for _, names in found):
            c.bad(where, "(every gear) " + text.format(", ".join(found[0][1])))
            continue
        for at, names in found:
            if names:
                c.bad(at, text.format(", ".join(names)))


def _tokenizer(c: Checker, t: dict, files: set[str]) -> None:
    c.get(t, "kind", "tokenizer", NAME)  # an unknown kind is named by runtime/tokenizer.py
    _listed(c, "tokenizer.file", c.get(t, "file", "tokenizer", INSIDE), files, "the tokenizer")
    c.get(t, "bos_id", "tokenizer", COUNT)
    c.get(t, "eos_id", "tokenizer", COUNT)
    eos = c.get(t, "eos_ids", "tokenizer", LIST)
    if eos is not None and (not eos or not all(COUNT.ok(i) for i in eos)):
        c.bad("tokenizer.eos_ids", f"must be a non-empty list of token ids, got {show(eos)}")
    if t.get("kind") == "chatglm_sentencepiece":
        c.get(t, "id_offset", "tokenizer", COUNT)
        c.get(t, "max_blank", "tokenizer", POSITIVE, required=False)


def _prompt(c: Checker, prompt: dict) -> None:
    kind = c.get(prompt, "kind", "prompt", NAME)
    if kind is not None and kind not in PROMPT_KINDS:
        c.bad("prompt.kind", f"names prompt kind '{kind}', which this runtime does not know (it knows "
                             f"{', '.join(PROMPT_KINDS)}); upgrade vlm2om or re-export the bundle with this one")
    _fields(c, prompt, "prompt", PROMPT_FIELDS.get(kind, {}))
    bos = prompt.get("bos")
    if isinstance(bos, str) and bos and bos not in BOS_RULES:
        c.bad("prompt.bos", f"is '{bos}', which is not a BOS rule this runtime knows ({', '.join(BOS_RULES)})")


def _generation(c: Checker, gen: dict) -> None:
    before = len(c.problems)
    for key, kind in GENERATION.items():
        c.get(gen, key, "generation", kind, required=False)
    if len(c.problems) == before:
        known = {k: v for k, v in gen.items() if k in GENERATION}
        if known.get("stop_strings") is not None:
            known["stop_strings"] = tuple(known["stop_strings"])
        try:  # the ranges GenerationConfig enforces (temperature > 0, top_p in (0, 1], ...)
            GenerationConfig(**known)
        except InputError as e:
            c.bad("generation", f"is refused: {e}")


def _preprocess(c: Checker, pre: dict) -> None:
    steps = c.get(pre, "steps", "preprocess", LIST)
    if steps is None:
        return
    ops = []
    for i, step in enumerate(steps):
        where = join("preprocess.steps", i)
        if not isinstance(step, dict):
            c.bad(where, f"must be an object with an op, got {show(step)}")
            continue
        op = c.get(step, "op", where, NAME)
        if isinstance(op, str) and op not in STEPS:
            c.bad(join(where, "op"), f"'{op}' is not a preprocessing step this runtime knows "
                                     f"({', '.join(STEPS)}); upgrade vlm2om")
            continue
        ops.append(op)
        for key, kind in STEPS.get(op, {}).items():
            c.get(step, key, where, kind)
        if op == "to_float":
            divisor = c.get(step, "divisor", where, NUMBER, required=False)
            if divisor == 0:
                c.bad(join(where, "divisor"), "must not be 0")
        if op == "normalize" and isinstance(step.get("std"), list) and 0 in step["std"]:
            c.bad(join(where, "std"), f"must hold no 0, got {show(step['std'])}")
    if None in ops:
        return
    if "to_float" not in ops:
        c.bad("preprocess.steps", "has no to_float step, which makes the image a float tensor")
    elif "rgb" not in ops[:ops.index("to_float")]:
        c.bad("preprocess.steps", "needs an rgb step before to_float (the graphs take 3 channels)")
    elif "normalize" in ops and ops.index("normalize") < ops.index("to_float"):
        c.bad("preprocess.steps", "has normalize before to_float; it works on the float tensor")


def _views(c: Checker, pipe: dict, pre: dict) -> None:
    """An hd_grid assembly needs an hd_transform step cutting views of its size, and vice versa."""
    steps = pre.get("steps") if isinstance(pre.get("steps"), list) else []
    hd = [(i, s) for i, s in enumerate(steps) if isinstance(s, dict) and s.get("op") == "hd_transform"]
    assembly = pipe.get("image_assembly")
    if hd and not isinstance(assembly, dict):
        c.bad(join("preprocess.steps", hd[0][0]), "is hd_transform, which cuts an image into views, but "
                                                  "pipeline.image_assembly does not say how to lay them out")
    elif isinstance(assembly, dict) and not hd:
        c.bad("pipeline.image_assembly", "lays out views, but preprocess.steps has no hd_transform step cutting them")
    elif hd and POSITIVE.ok(hd[0][1].get("size")) and hd[0][1]["size"] != assembly.get("view_size"):
        c.bad(join(join("preprocess.steps", hd[0][0]), "size"),
              f"is {hd[0][1]['size']}, but pipeline.image_assembly.view_size is {show(assembly.get('view_size'))}")


def _verification(c: Checker, v, files: set[str]) -> None:
    """What ``vlm2om verify`` reads: thresholds per dtype, end-to-end limits, the golden file."""
    if not isinstance(v, dict):
        return
    limits = Kind("an object with finite numbers cosine and rel_euclid", lambda t: isinstance(t, dict) and all(
        NUMBER.ok(t.get(k)) for k in ("cosine", "rel_euclid")))
    c.get(v, "dtype", "verification", DTYPE, required=False)
    c.get(v, "thresholds", "verification", limits, required=False)
    table = c.get(v, "thresholds_by_dtype", "verification", OBJECT, required=False) or {}
    for dtype, t in table.items():
        if not limits.ok(t):
            c.bad(join("verification.thresholds_by_dtype", dtype), f"must be {limits.what}, got {show(t)}")
    c.get(v, "end_to_end", "verification", Kind("an object with finite numbers logits_cosine and tie_margin",
                                                lambda t: isinstance(t, dict) and all(
                                                    NUMBER.ok(t.get(k)) for k in ("logits_cosine", "tie_margin"))),
          required=False)
    golden = c.get(v, "golden", "verification", nullable(OBJECT), required=False)
    if not golden:
        return
    _listed(c, "verification.golden.file", c.get(golden, "file", "verification.golden", INSIDE), files,
            "the golden file")
    case = Kind("a list of objects with a key (string) and a gear (object)", lambda cases: isinstance(cases, list)
                and all(isinstance(x, dict) and NAME.ok(x.get("key")) and isinstance(x.get("gear"), dict)
                        for x in cases))
    for graph, cases in (c.get(golden, "graphs", "verification.golden", OBJECT) or {}).items():
        if not case.ok(cases):
            c.bad(join("verification.golden.graphs", graph), f"must be {case.what}, got {show(cases)}")
    e2e = Kind("a list of objects with a key and a prompt (strings)", lambda cases: isinstance(cases, list) and all(
        isinstance(x, dict) and NAME.ok(x.get("key")) and isinstance(x.get("prompt"), str) for x in cases))
    c.get(golden, "end_to_end", "verification.golden", e2e, required=False)
    c.get(golden, "end_to_end_missing", "verification.golden", TEXT, required=False)


def _atc(c: Checker, atc) -> None:
    """The OM backend reads ``atc.om.<graph>.file`` (``vlm2om compile`` owns the rest)."""
    if not isinstance(atc, dict):
        return
    for graph, om in (c.get(atc, "om", "atc", OBJECT, required=False) or {}).items():
        where = join("atc.om", graph)
        if not isinstance(om, dict):
            c.bad(where, f"must be an object describing the compiled OM file, got {show(om)}")
        else:
            c.get(om, "file", where, INSIDE)


__all__ = ["MAX_SHOWN", "check_manifest", "manifest_problems"]
