"""Manifest schema versions: what each declares, and reading version 1 bundles as version 2.

Version 2 (this vlm2om) declares what version 1 left to literal names and one assumed shape:

* ``task``: ``chat`` (generative, KV-cache decoder) today; the pipeline is chosen from it.
* every embed/decoder graph input and output carries a ``role`` (``hidden``, ``positions``,
  ``valid_mask``, ``past_kv``, ``logits_index``, ...), and the runtime builds feeds by role;
* ``pipeline.attention``: ``causal``, or ``prefix_lm`` (the context sees itself both ways);
* ``pipeline.positions.kind``: how positions are computed, ``linear`` (the default: each token's
  index) or ``glm_2d`` (ChatGLM's [position, block position] pairs from the index and the row's
  prefix length, fed to a ``positions_2d`` input);
* ``pipeline.image_input`` / ``image_output``: where the image chain starts and ends (tensors
  between image graphs are matched by name, so a graph may pass on more than one);
  ``image_tokens`` may be null for encoders whose token count varies with the image;
* ``prompt.kind`` names a prompt kind (version 1 gave FastChat's ``style``).

A version 1 manifest is upgraded in memory (nothing is written): its graphs used exactly the
names below, its task was chat, its attention causal, its image chain one tensor long.
"""
from __future__ import annotations

import copy

from .errors import BundleError

SCHEMA_VERSION = 2
READABLE = (1, 2)
ATTENTION = ("causal", "prefix_lm")
# pipeline.positions.kind: how the runtime computes the positions it feeds (runtime/decoder.py).
POSITIONS = ("linear", "glm_2d")
POSITIONS_2D = ("glm_2d",)  # the kinds that compute a positions_2d input (from each row's context length)
# Schema 1 manifests name the FastChat separator style instead of a prompt kind.
V1_PROMPT_STYLES = {"single": "fastchat_single", "two": "fastchat_two"}
# The literal tensor names of version 1's embed and decoder graphs, and the role each played.
V1_ROLES = {"input_ids": "token_ids", "inputs_embeds": "embeds", "hidden_states": "hidden",
            "position_ids": "positions", "attention_mask": "valid_mask", "past_kv": "past_kv",
            "logits_index": "logits_index", "hidden_states_out": "hidden", "logits": "logits",
            "present_kv": "present_kv"}


def upgrade(manifest: dict, where: str) -> dict:
    """The manifest as version 2 (a copy when it was version 1); refuses unknown versions.

    The upgrade fills in only what it can read; a damaged version 1 manifest is left for the
    schema check (``runtime/manifest_check.py``) to name."""
    if "schema_version" not in manifest:
        raise BundleError(f"{where}: schema_version is missing, so this is no manifest this runtime can read (it "
                          f"reads versions {', '.join(map(str, READABLE))}); re-export the bundle with this vlm2om")
    version = manifest["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE:
        raise BundleError(f"{where}: schema_version {version!r} is not supported by this runtime (it reads "
                          f"versions {', '.join(map(str, READABLE))}); re-export the bundle with this vlm2om "
                          "or upgrade vlm2om")
    if version == 2:
        return manifest
    m = copy.deepcopy(manifest)
    pipe, graphs = _dict(m.get("pipeline")), _dict(m.get("graphs"))
    m["task"] = "chat"
    pipe.setdefault("attention", "causal")
    chain = [graphs[n] for n in _list(pipe.get("image_graphs"))
             if isinstance(n, str) and isinstance(graphs.get(n), dict)]
    if chain:
        for key, entry, kind in (("image_input", chain[0], "inputs"), ("image_output", chain[-1], "outputs")):
            first = _list(entry.get(kind))[:1]
            if first and isinstance(first[0], dict) and "name" in first[0]:
                pipe.setdefault(key, first[0]["name"])
    for name in [pipe.get("embed_graph"), *_list(pipe.get("decoder_graphs"))]:
        entry = _dict(graphs.get(name)) if isinstance(name, str) else {}
        for spec in [*_list(entry.get("inputs")), *_list(entry.get("outputs"))]:
            if isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"] in V1_ROLES:
                spec.setdefault("role", V1_ROLES[spec["name"]])
    prompt = _dict(m.get("prompt"))
    style = prompt.get("style")
    if "kind" not in prompt and isinstance(style, str) and style in V1_PROMPT_STYLES:
        prompt["kind"] = V1_PROMPT_STYLES[prompt.pop("style")]
    m["schema_version"] = 2
    return m


def _dict(value) -> dict:
    """``value`` when it is a dict, else a throwaway one (the schema check names the key)."""
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    return value if isinstance(value, list) else []
