"""The fault corpus's harness (tests/faults/): run one command as a user would, then check what
a user sees and what is left on disk.

Every fault case asserts the same four things: the exit status, a one-line (or short-list)
error that names the culprit, no traceback, and nothing left behind: no hidden staging or lock
folders, and a previous bundle byte-identical. ``invoke`` runs the CLI in this process (fast);
``invoke_fresh`` in a new one, for signals, stdin and "torch never imported" cases.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Outcome:
    code: int
    output: str  # stdout and stderr together, as a terminal shows them
    exception: BaseException | None = None

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("Error")]


def invoke(*args, input: str | bytes | None = None) -> Outcome:
    """``vlm2om ARGS`` through click's runner in this process; an uncaught exception is kept."""
    from click.testing import CliRunner

    from vlm2om.exporters.cli.main import main

    r = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=True)
    exc = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    return Outcome(r.exit_code, r.output, exc)


def invoke_fresh(*args, input: str | bytes | None = None, timeout: int = 300, **kw) -> Outcome:
    """``python -m vlm2om ARGS`` in a new process (its own imports, signals and stdin)."""
    from tests.helpers import run_cli

    if isinstance(input, bytes):
        r = run_cli(*args, input=input, timeout=timeout, text=False, **kw)
        out = (r.stdout + r.stderr).decode("utf-8", "replace")
    else:
        r = run_cli(*args, input=input, timeout=timeout, **kw)
        out = r.stdout + r.stderr
    return Outcome(r.returncode, out)


def expect_error(outcome: Outcome, *needles: str, code: int | tuple[int, ...] = (1, 2)) -> str:
    """Assert a clean failure: the exit status, no traceback, every needle in the output.
    Returns the output for further checks."""
    codes = (code,) if isinstance(code, int) else code
    assert outcome.exception is None, f"uncaught {type(outcome.exception).__name__}: {outcome.exception}"
    assert "Traceback" not in outcome.output, outcome.output
    assert outcome.code in codes, f"exit status {outcome.code}, expected {codes}:\n{outcome.output}"
    for needle in needles:
        assert needle in outcome.output, f"{needle!r} not in:\n{outcome.output}"
    return outcome.output


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256), to prove a bundle byte-identical."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Hidden entries an export or compile may leave beside its output (staging, swap, lock)."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith("."))
