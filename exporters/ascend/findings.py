"""What the ATC lint reports: one ``Finding`` per problem, shared by the graph checks (lint.py)
and the fp16 precision plan (fp16.py)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Finding:
    """One problem: which graph, where in it (node, input, file), the value at fault, and why."""

    severity: str  # "error" (ATC rejects it) | "warning" (look at it) | "info" (the fp16 plan)
    graph: str
    check: str
    where: str
    value: str
    message: str
    nodes: tuple[str, ...] = field(default=(), compare=False)  # --keep_dtype names for fp16 findings
