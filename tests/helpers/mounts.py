"""Real file-system faults for tests that run as root (root ignores mode bits): a small tmpfs
that fills up, and a read-only bind mount. Each skips the test, with the reason, where mounting
is not allowed (no root, no CAP_SYS_ADMIN, a container without mount), and always unmounts."""
from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here (mount {' '.join(args)}: {r.stderr.strip() or r.returncode})")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextmanager
def tmpfs(path: Path, size_kib: int) -> Iterator[Path]:
    """``path`` (made if needed) as an empty tmpfs of ``size_kib`` KiB."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


@contextmanager
def read_only(src: Path, at: Path) -> Iterator[Path]:
    """``src`` seen read-only at ``at`` (a bind mount, remounted read-only where one step does not
    take): writes there fail with EROFS, for root too."""
    at.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(src), str(at))
    try:
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(at)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {r.stderr.strip()}")
        probe = at / ".write-probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip(f"the read-only bind mount at {at} still takes writes")
        yield at
    finally:
        _umount(at)


def free_kib(path: Path) -> int:
    import os

    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize // 1024
