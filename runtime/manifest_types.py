"""The vocabulary of the manifest check (``runtime/manifest_check.py``): kinds of JSON values,
key paths as a user reads them (``graphs.decoder_0.inputs[2].shape``), and the collector of
problems, so every check reads as one line per key."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

# The tensor dtypes the runtime feeds and reads (numpy names; bfloat16 has no numpy dtype).
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


@dataclass(frozen=True)
class Kind:
    """What a value must be: ``what`` for the message, ``ok`` to test it."""

    what: str
    ok: Callable[[Any], bool]


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return (_int(v) or isinstance(v, float)) and math.isfinite(v)


def nullable(kind: Kind) -> Kind:
    return Kind(f"{kind.what} or null", lambda v: v is None or kind.ok(v))


OBJECT = Kind("an object", lambda v: isinstance(v, dict))
LIST = Kind("a list", lambda v: isinstance(v, list))
NAME = Kind("a non-empty string", lambda v: isinstance(v, str) and v != "")
TEXT = Kind("a string", lambda v: isinstance(v, str))
TEXTS = Kind("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
NAMES = Kind("a list of non-empty strings", lambda v: isinstance(v, list) and all(NAME.ok(x) for x in v))
POSITIVE = Kind("a positive integer", lambda v: _int(v) and v > 0)
COUNT = Kind("an integer >= 0", lambda v: _int(v) and v >= 0)
BOOL = Kind("true or false", lambda v: isinstance(v, bool))
NUMBER = Kind("a finite number", _number)
DTYPE = Kind(f"one of {', '.join(DTYPES)}", lambda v: isinstance(v, str) and v in DTYPES)
SHA256 = Kind("64 lowercase hex digits", lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def join(path: str, key) -> str:
    """``path.key``, ``path[3]`` for a list index, ``path['a.b']`` for a key a dot would split."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _IDENT.fullmatch(str(key)):
        return f"{path}.{key}" if path else str(key)
    return f"{path}[{str(key)!r}]"


def show(v) -> str:
    """A value as the message quotes it: short, JSON's words for null and booleans."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v if len(v) <= 40 else v[:40] + "...")
    if isinstance(v, dict):
        return "an object" if v else "{}"
    text = json.dumps(v, default=str)
    if isinstance(v, list) and len(text) > 40:
        return f"a list of {len(v)} item{'s' * (len(v) != 1)}"
    return text


class Checker:
    """Collects one line per problem, key path first."""

    def __init__(self):
        self.problems: list[str] = []

    def bad(self, path: str, text: str) -> None:
        self.problems.append(f"{path} {text}")

    def get(self, obj: dict, key: str, path: str, kind: Kind, required: bool = True):
        """``obj[key]`` when it is of ``kind``, else None and a problem (a missing optional key is
        none)."""
        where = join(path, key)
        if key not in obj:
            if required:
                self.bad(where, "is missing")
            return None
        value = obj[key]
        if not kind.ok(value):
            self.bad(where, f"must be {kind.what}, got {show(value)}")
            return None
        return value
