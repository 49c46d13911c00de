"""The manifest check's cross checks (see ``runtime/manifest_check.py``): the pipeline names graphs
that exist, the image chain feeds every image graph's inputs, and the embed and decoder graphs
carry the roles, dims and dtypes the decoder feeds, for the KV cache the manifest describes."""
from __future__ import annotations

from .decoder import CACHE_ROLES, INPUT_ROLES, OUTPUT_ROLES
from .kv_cache import KINDS
from .manifest_types import COUNT, DTYPE, LIST, NAME, NAMES, OBJECT, POSITIVE, Checker, join, nullable, show
from .schema import ATTENTION, POSITIONS, POSITIONS_2D

# The dtype the runtime gives each embed/decoder tensor role ("embeds": pipeline.embeds_dtype, "kv":
# kv_cache.dtype); image_mask is fed in the dtype the manifest declares, outputs are cast as read.
FED = {"token_ids": "int64", "hidden": "embeds", "positions": "int64", "valid_mask": "float32",
       "logits_index": "int64", "prefix_length": "int64", "positions_2d": "int64", "past_kv": "kv", "past_key": "kv",
       "past_value": "kv"}
# The dim names the runtime picks, by role and axis: a dim there is static or this gear dim.
AXES = {"token_ids": ("batch", "seq"), "embeds": ("batch", "seq"), "hidden": ("batch", "seq"),
        "positions": ("batch", "seq"), "positions_2d": ("batch", None, "seq"),  # None: axis 1 is 2 (_two_d)
        "valid_mask": ("batch", "cache"), "logits": ("batch",),
        "logits_index": ("batch",), "prefix_length": ("batch",), "image_mask": ("batch", "seq")}
RANKS = {"token_ids": (2,), "embeds": (3,), "hidden": (3,), "positions": (2,), "positions_2d": (3,),
         "valid_mask": (2,), "logits_index": (1,), "prefix_length": (1,), "image_mask": (2,), "logits": (2, 3),
         "past_kv": (6,),
         "present_kv": (6,), "past_key": (4,), "past_value": (4,), "present_key": (4,), "present_value": (4,)}
# A cache tensor's dims: ints from kv_cache ("layers": the group's), names the gear dims it takes.
CACHE_DIMS = {"past_kv": ("layers", 2, "batch", "kv_heads", "cache", "head_dim"),
              "present_kv": ("layers", 2, "batch", "kv_heads", "seq", "head_dim"),
              "past_key": ("batch", "kv_heads", "cache", "head_dim"),
              "present_key": ("batch", "kv_heads", "seq", "head_dim")}
CACHE_DIMS["past_value"], CACHE_DIMS["present_value"] = CACHE_DIMS["past_key"], CACHE_DIMS["present_key"]


def check_pipeline(c: Checker, pipe: dict, declared: dict, graphs: dict, kv, tokenizer) -> None:
    """``declared``: the manifest's ``graphs``; ``graphs``: those of them that passed their own checks."""
    image = c.get(pipe, "image_graphs", "pipeline", NAMES, required=False) or []
    embed = c.get(pipe, "embed_graph", "pipeline", NAME)
    decoders = c.get(pipe, "decoder_graphs", "pipeline", NAMES)
    if decoders == []:
        c.bad("pipeline.decoder_graphs", "is empty: a bundle has at least one decoder group")
    attention = c.get(pipe, "attention", "pipeline", NAME, required=False)
    if attention is not None and attention not in ATTENTION:
        c.bad("pipeline.attention", f"names attention kind '{attention}', which this runtime does not know "
                                    f"({', '.join(ATTENTION)}); upgrade vlm2om")
    kind = _positions(c, pipe, attention)
    hidden = c.get(pipe, "hidden_size", "pipeline", POSITIVE)
    embeds_dtype = c.get(pipe, "embeds_dtype", "pipeline", DTYPE)
    c.get(pipe, "image_tokens", "pipeline", nullable(POSITIVE), required=False)
    refs = [(join("pipeline.image_graphs", i), n) for i, n in enumerate(image)] + \
        ([("pipeline.embed_graph", embed)] if embed else []) + \
        [(join("pipeline.decoder_graphs", i), n) for i, n in enumerate(decoders or [])]
    seen: set[str] = set()
    for path, name in refs:
        if name not in declared:
            c.bad(path, f"names graph '{name}', which graphs does not declare (it has: {', '.join(declared)})")
        elif name in seen:
            c.bad(path, f"names graph '{name}' a second time; each graph has one place in the pipeline")
        seen.add(name)
    if image:
        _image_chain(c, pipe, image, graphs, hidden)
    _assembly(c, pipe, image, graphs)
    kv_ok = isinstance(kv, dict) and _kv_cache(c, kv, decoders)
    if embed in graphs and decoders and all(n in graphs for n in decoders) and kv_ok and not c.problems:
        _decoder(c, graphs, embed, decoders, kv, {"embeds": embeds_dtype, "kv": kv["dtype"]}, hidden, tokenizer)
        _two_d(c, graphs, decoders, kind)


def _positions(c: Checker, pipe: dict, attention) -> str | None:
    """``pipeline.positions.kind`` (default linear); a 2-D kind reads each row's context length,
    which only a prefix-LM prefill (one chunk per context) fixes."""
    positions = c.get(pipe, "positions", "pipeline", OBJECT, required=False)
    if positions is None:
        return None if "positions" in pipe else "linear"
    kind = c.get(positions, "kind", "pipeline.positions", NAME)
    if kind is not None and kind not in POSITIONS:
        c.bad("pipeline.positions.kind", f"names positions kind '{kind}', which this runtime does not know "
                                         f"({', '.join(POSITIONS)}); upgrade vlm2om")
        return None
    if kind in POSITIONS_2D and attention != "prefix_lm":
        c.bad("pipeline.positions.kind", f"is '{kind}', which counts from each row's context, but "
                                         f"pipeline.attention is {show(attention or 'causal')}, not 'prefix_lm'")
    return kind


def _two_d(c: Checker, graphs: dict, decoders: list[str], kind: str | None) -> None:
    """A positions_2d input has two position rows, and the positions kind computes them."""
    for name in decoders:
        for j, spec in enumerate(graphs[name]["inputs"]):
            if spec.get("role") != "positions_2d":
                continue
            where = join(join(join("graphs", name), "inputs"), j)
            if len(spec["shape"]) == 3 and spec["shape"][1] != 2:
                c.bad(join(join(where, "shape"), 1), f"is {show(spec['shape'][1])}, but positions_2d holds 2 rows")
            if kind is not None and kind not in POSITIONS_2D:
                c.bad(where, f"('{spec['name']}') has role positions_2d, but pipeline.positions.kind "
                             f"'{kind}' computes no 2-D positions ({', '.join(POSITIONS_2D)} do)")


def _image_chain(c: Checker, pipe: dict, image: list[str], graphs: dict, hidden) -> None:
    """Every image graph's inputs come from the preprocessed image or an earlier graph's outputs."""
    first = c.get(pipe, "image_input", "pipeline", NAME)
    last = c.get(pipe, "image_output", "pipeline", NAME)
    if first is None or not all(n in graphs for n in image):
        return
    have, made = {first}, {}
    for name in image:
        for j, spec in enumerate(graphs[name]["inputs"]):
            if spec["name"] not in have:
                c.bad(join(join(join("graphs", name), "inputs"), j),
                      f"is '{spec['name']}', which is neither pipeline.image_input nor an output of an earlier "
                      "image graph, so nothing feeds it")
        for spec in graphs[name]["outputs"]:
            have.add(spec["name"])
            made[spec["name"]] = spec
    if last is None:
        return
    if last not in made:
        c.bad("pipeline.image_output", f"is '{last}', which no image graph outputs "
                                       f"(they output: {', '.join(made)})")
        return
    shape = made[last]["shape"]
    if len(shape) != 3 or (isinstance(shape[2], int) and hidden and shape[2] != hidden):
        c.bad("pipeline.image_output", f"'{last}' has shape {shape}; the decoder needs [1, image tokens, "
                                       f"{hidden}] (pipeline.hidden_size)")


ASSEMBLIES = {"hd_grid": {"view_size": POSITIVE, "tokens_per_side": POSITIVE, "global_separator_row": COUNT,
                           "row_separator_row": COUNT, "global_resize": NAME}}  # runtime/hd_grid.py


def _assembly(c: Checker, pipe: dict, image: list[str], graphs: dict) -> None:
    """``pipeline.image_assembly``: a known kind whose rows exist in every view's output."""
    a = c.get(pipe, "image_assembly", "pipeline", nullable(OBJECT), required=False)
    if a is None:
        return
    before = len(c.problems)
    kind = c.get(a, "kind", "pipeline.image_assembly", NAME)
    if kind is not None and kind not in ASSEMBLIES:
        c.bad("pipeline.image_assembly.kind", f"is '{kind}', which this runtime does not know "
                                              f"({', '.join(ASSEMBLIES)}); upgrade vlm2om")
        return
    for key, k in ASSEMBLIES.get(kind, {}).items():
        c.get(a, key, "pipeline.image_assembly", k)
    if not image:
        c.bad("pipeline.image_assembly", "lays out image views, but pipeline.image_graphs is empty")
    if pipe.get("image_tokens") is not None:
        c.bad("pipeline.image_tokens", f"is {show(pipe['image_tokens'])}, but an hd_grid image's row count varies "
                                       "with the image: it must be null")
    if a.get("global_resize") not in (None, "bicubic"):
        c.bad("pipeline.image_assembly.global_resize", f"is {show(a['global_resize'])}; this runtime resizes "
                                                       "the global view bicubic only")
    last = pipe.get("image_output")
    made = {s["name"]: s for n in image if n in graphs for s in graphs[n]["outputs"]}
    shape = made[last]["shape"] if last in made else []
    if len(c.problems) > before or len(shape) != 3 or not isinstance(shape[1], int):
        return
    rows, t = shape[1], a["tokens_per_side"]
    for key in ("global_separator_row", "row_separator_row"):
        if a[key] >= rows:
            c.bad(join("pipeline.image_assembly", key), f"is {a[key]}, but '{last}' has {rows} rows per view")
    if t * t > rows:
        c.bad("pipeline.image_assembly.tokens_per_side", f"is {t}: {t * t} tokens, more than the {rows} rows "
                                                         f"'{last}' has per view")


def _kv_cache(c: Checker, kv: dict, decoders) -> bool:
    before = len(c.problems)
    kind = c.get(kv, "kind", "kv_cache", NAME, required=False)
    if kind is not None and kind not in KINDS:
        c.bad("kv_cache.kind", f"is '{kind}', which this runtime does not know ({', '.join(KINDS)}); upgrade vlm2om")
    groups = c.get(kv, "group_layers", "kv_cache", LIST)
    for name in ("kv_heads", "head_dim"):
        c.get(kv, name, "kv_cache", POSITIVE)
    c.get(kv, "dtype", "kv_cache", DTYPE)
    caps = c.get(kv, "capacity_gears", "kv_cache", LIST)
    for path, values in (("kv_cache.group_layers", groups), ("kv_cache.capacity_gears", caps)):
        if values is not None and (not values or not all(POSITIVE.ok(v) for v in values)):
            c.bad(path, f"must be a non-empty list of positive integers, got {show(values)}")
    total = c.get(kv, "num_layers", "kv_cache", POSITIVE, required=False)
    if len(c.problems) == before and groups and total is not None and total != sum(groups):
        c.bad("kv_cache.num_layers", f"is {total}, but kv_cache.group_layers {groups} add up to {sum(groups)}")
    if len(c.problems) == before and decoders and len(groups) != len(decoders):
        c.bad("kv_cache.group_layers", f"has {len(groups)} groups, but pipeline.decoder_graphs lists "
                                       f"{len(decoders)}")
    return len(c.problems) == before


def _roles(c: Checker, path: str, specs: list[dict], known: tuple[str, ...], what: str) -> dict[str, list]:
    """role -> [(path, spec)]; a missing or unknown role is a problem."""
    out: dict[str, list] = {}
    for j, spec in enumerate(specs):
        where = join(path, j)
        role = spec.get("role")
        if role is None:
            c.bad(where, f"('{spec['name']}') has no role; the runtime feeds and reads {what} by role")
        elif role not in known:
            c.bad(join(where, "role"), f"'{spec['name']}' has role '{role}', which this runtime does not feed "
                                       f"(it knows {', '.join(known)}); upgrade vlm2om")
        else:
            out.setdefault(role, []).append((where, spec))
    return out


def _decoder(c: Checker, graphs: dict, embed: str, decoders: list[str], kv: dict, dtypes: dict, hidden: int,
             tokenizer) -> None:
    e = join("graphs", embed)
    roles = [(_roles(c, join(e, "inputs"), graphs[embed]["inputs"], ("token_ids",), "the embed graph's tensors"),
              "token_ids"),
             (_roles(c, join(e, "outputs"), graphs[embed]["outputs"], ("embeds",), "the embed graph's tensors"),
              "embeds")]
    for found, role in roles:
        _one(c, e, found, role)
        _each(c, found, dtypes, hidden)
    stacked = kv.get("kind", "stacked") == "stacked"
    layers = sum(kv["group_layers"])
    for g, name in enumerate(decoders):
        path, entry = join("graphs", name), graphs[name]
        ins = _roles(c, join(path, "inputs"), entry["inputs"], INPUT_ROLES, "decoder tensors")
        outs = _roles(c, join(path, "outputs"), entry["outputs"], OUTPUT_ROLES, "decoder tensors")
        _one(c, path, ins, "hidden")
        _one(c, path, outs, "logits" if g == len(decoders) - 1 else "hidden")
        for found in (ins, outs):
            for role, specs in found.items():
                if role not in CACHE_ROLES or stacked:
                    _unique(c, specs, role)
                if role in CACHE_ROLES:
                    _cache(c, role, specs, stacked, layers, kv, g)
            _each(c, found, dtypes, hidden, found is outs)
    _shared_gears(c, graphs, decoders, kv)
    _vocab(c, graphs[decoders[-1]], decoders[-1], tokenizer)


def _one(c: Checker, path: str, found: dict, role: str) -> None:
    if not found.get(role):
        c.bad(path, f"has no tensor with role '{role}', which the runtime needs")


def _unique(c: Checker, found: list, role: str) -> None:
    if len(found) > 1:
        c.bad(found[1][0], f"has role '{role}' like {found[0][0]}; one tensor per role")


def _each(c: Checker, found: dict, dtypes: dict, hidden: int, outputs: bool = False) -> None:
    """Rank, gear dim names, fed dtype and hidden size of every tensor with a role."""
    for role, specs in found.items():
        fed = FED.get(role) if not outputs or role == "hidden" else None  # a hidden output feeds the next group
        for where, spec in specs:
            shape = spec["shape"]
            if len(shape) not in RANKS.get(role, (len(shape),)):
                c.bad(join(where, "shape"), f"has rank {len(shape)}, but a '{role}' tensor has rank "
                                            f"{' or '.join(map(str, RANKS[role]))}")
                continue
            for axis, dim in enumerate(AXES.get(role, ())):
                if dim is not None and isinstance(shape[axis], str) and shape[axis] != dim:
                    c.bad(join(join(where, "shape"), axis), f"is gear dim '{shape[axis]}', but the runtime pads axis "
                                                            f"{axis} of '{role}' to the '{dim}' gear: name it '{dim}'")
            if role in ("hidden", "embeds", "logits") and not isinstance(shape[-1], int):
                c.bad(join(join(where, "shape"), len(shape) - 1), f"must be a static size, got {show(shape[-1])}")
            elif role in ("hidden", "embeds") and shape[-1] != hidden:
                c.bad(join(join(where, "shape"), len(shape) - 1), f"is {shape[-1]}, but pipeline.hidden_size is "
                                                                  f"{hidden}")
            want = dtypes.get(fed, fed)
            if want and spec["dtype"] != want:
                c.bad(join(where, "dtype"), f"is {spec['dtype']}, but the runtime gives role '{role}' {want}")


def _cache(c: Checker, role: str, specs: list, stacked: bool, layers: int, kv: dict, group: int) -> None:
    """Cache tensors match kv_cache: the layout's roles, a layer in range, the buffer's dims."""
    sizes = {"layers": kv["group_layers"][group], "kv_heads": kv["kv_heads"], "head_dim": kv["head_dim"]}
    for where, spec in specs:
        if (CACHE_ROLES[role] == "kv") != stacked:
            c.bad(join(where, "role"), f"is '{role}', but kv_cache.kind is "
                                       f"{kv.get('kind', 'stacked')} (stacked: past_kv/present_kv; per_layer: "
                                       "past_key/past_value/present_key/present_value)")
            continue
        if not stacked and not (isinstance(spec.get("layer"), int) and spec["layer"] < layers):
            c.bad(join(where, "layer"), f"must be a layer index below {layers} (kv_cache.group_layers), "
                                        f"got {show(spec.get('layer'))}")
            continue
        want = [sizes.get(d, d) for d in CACHE_DIMS[role]]
        shape = spec["shape"]
        if len(shape) == len(want) and any(d != w if isinstance(w, int) or isinstance(d, str) else False
                                           for d, w in zip(shape, want)):
            c.bad(join(where, "shape"), f"is {show(shape)}, but kv_cache's group_layers, kv_heads and "
                                        f"head_dim make it {show(want)} (names: gear dims or their static size)")


def _gear_set(entry: dict, role: str, axis: int, dim: str) -> set[int]:
    """The values ``dim`` takes: its gears', or the static dim of the role's input."""
    gears = entry.get("gears") or []
    if gears and dim in gears[0]:
        return {g[dim] for g in gears}
    shape = next((s["shape"] for s in entry["inputs"] if s.get("role") == role), None)
    return {shape[axis]} if shape and len(shape) > axis and isinstance(shape[axis], int) else set()


def _shared_gears(c: Checker, graphs: dict, decoders: list[str], kv: dict) -> None:
    """Every decoder group runs at the first group's gear, and the cache capacities are its cache gears."""
    if c.problems:
        return
    first = graphs[decoders[0]]
    key = sorted(tuple(sorted(g.items())) for g in first.get("gears") or [])
    for name in decoders[1:]:
        if sorted(tuple(sorted(g.items())) for g in graphs[name].get("gears") or []) != key:
            c.bad(join(join("graphs", name), "gears"), f"differ from graphs.{decoders[0]}.gears; every decoder group "
                                                       "runs at the same gears")
    caches = _gear_set(first, "valid_mask", 1, "cache")
    if not caches:
        c.bad(join("graphs", decoders[0]), "has neither a cache gear nor a static valid_mask input, so the cache "
                                           "capacity is unknown")
    elif set(kv["capacity_gears"]) - caches:
        c.bad("kv_cache.capacity_gears", f"{kv['capacity_gears']} are not the cache sizes graph '{decoders[0]}' "
                                         f"runs at ({sorted(caches)})")
    if not _gear_set(first, "hidden", 1, "seq"):
        c.bad(join("graphs", decoders[0]), "has neither a seq gear nor a static seq dim in its hidden input")


def _vocab(c: Checker, last: dict, name: str, tokenizer) -> None:
    """Token ids the runtime indexes the logits with are below the vocabulary size."""
    logits = next((s for s in last["outputs"] if s.get("role") == "logits"), None)
    vocab = logits["shape"][-1] if logits and logits["shape"] and isinstance(logits["shape"][-1], int) else None
    if vocab is None or not isinstance(tokenizer, dict) or c.problems:
        return
    for key in ("bos_id", "eos_id", "eos_ids"):
        ids = tokenizer.get(key)
        for i in ids if isinstance(ids, list) else [ids]:
            if isinstance(i, int) and i >= vocab:
                c.bad(f"tokenizer.{key}", f"holds id {i}, outside the {vocab} logits of graph '{name}'")
