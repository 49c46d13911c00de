"""What both CLI modules parse the same way."""
from __future__ import annotations

import click


def int_list(ctx, param, value):
    """Click callback: "1,32,128" -> (1, 32, 128); None stays None."""
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got '{value}'") from None
