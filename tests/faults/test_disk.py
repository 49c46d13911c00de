"""What the disk can do to an export or a compile: fill up, hit a quota, fail a write, be mounted
read-only, or be a file where a folder should be. Each ends in one line naming the file and the
folder, the previous bundle byte-identical, no staging folder left, and ATC never started on a
bundle it cannot write. Real faults where the machine allows them (a small tmpfs, a read-only
bind mount: root ignores mode bits), skipped with the reason where it does not."""
from __future__ import annotations

import errno

import pytest

from tests.helpers.bundles import copy_bundle
from tests.helpers.fake_cann import install_fake_cann
from tests.helpers.faults import expect_error, invoke, leftovers, snapshot
from tests.helpers.mounts import read_only, tmpfs

KEPT = "the staging folder was removed and the bundle there before is unchanged"


def test_disk_full_during_export(tiny_bundle, tmp_path):
    """A tmpfs that holds the old bundle and 100 KiB more: the first graph does not fit."""
    size = sum(p.stat().st_size for p in tiny_bundle.iterdir()) // 1024 + 100
    with tmpfs(tmp_path / "disk", size) as disk:
        out = copy_bundle(tiny_bundle, disk, "out")
        before = snapshot(out)
        r = invoke("export", "minigpt4", "--out", out)
        expect_error(r, f"no space left on device while writing vision.onnx to the staging folder of '{out}'; {KEPT}",
                     code=1)
        assert len(r.error_lines) == 1
        assert snapshot(out) == before and leftovers(disk) == []


@pytest.mark.parametrize("code,words", [(errno.EDQUOT, "disk quota exceeded"), (errno.EIO, "input/output error")],
                         ids=["quota", "io-error"])
def test_failed_graph_write(old, monkeypatch, code, words):
    """The quota or I/O error comes from deep inside onnx's save; the user sees the file's name."""
    from vlm2om.exporters.core import driver

    real = driver.export_onnx

    def fail_on_bridge(sg, module, folder, **kw):
        if sg.name == "bridge":
            (folder / "bridge.onnx").write_bytes(b"half a graph")
            raise OSError(code, "injected")
        return real(sg, module, folder, **kw)

    monkeypatch.setattr(driver, "export_onnx", fail_on_bridge)
    expect_error(invoke("export", "minigpt4", "--out", old),
                 f"{words} while writing bridge.onnx to the staging folder of '{old}'; {KEPT}", code=1)


def test_failed_manifest_write(old, monkeypatch):
    """The last write of all (after every graph verified) fails: still nothing changes."""
    from vlm2om.exporters.core import driver

    monkeypatch.setattr(driver.json, "dumps", _raise(OSError(errno.ENOSPC, "injected")))
    expect_error(invoke("export", "minigpt4", "--out", old),
                 f"no space left on device while writing manifest.json to the staging folder of '{old}'; {KEPT}",
                 code=1)


def _raise(err):
    def fail(*a, **kw):
        raise err
    return fail


def test_read_only_out(tmp_path):
    (tmp_path / "src").mkdir()
    with read_only(tmp_path / "src", tmp_path / "ro") as ro:
        r = invoke("export", "minigpt4", "--out", ro / "bundle")
        expect_error(r, f"cannot write the bundle to '{ro / 'bundle'}': '{ro}' is on a read-only file system; "
                        "nothing was written", code=1)
        assert "building" not in r.output  # refused before the family (and torch) was imported
    assert list((tmp_path / "src").iterdir()) == []


def test_compile_read_only_bundle(tiny_bundle, tmp_path, monkeypatch):
    cann = install_fake_cann(tmp_path / "Ascend", monkeypatch)
    src = copy_bundle(tiny_bundle, tmp_path, "src")
    before = snapshot(src)
    with read_only(src, tmp_path / "ro") as ro:
        r = invoke("compile", ro)
        expect_error(r, f"bundle '{ro}' is read-only: it is on a read-only file system, and compile writes om/, "
                        "compile_om.sh and manifest.json there; nothing was written", code=1)
        assert len(r.error_lines) == 1 and "lint" not in r.output.lower()
    assert cann.calls() == [] and snapshot(src) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["inside", "is"], ids=["out-inside-a-file", "out-is-a-file"])
def test_out_is_or_is_inside_a_file(tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep")
    out = blocker / "bundle" if where == "inside" else blocker
    r = invoke("export", "minigpt4", "--out", out)
    expect_error(r, f"cannot write the bundle to '{out}': " + (f"'{blocker}' is" if where == "inside" else "it is")
                 + " a file, not a folder", code=1)
    assert "building" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and blocker.read_text() == "keep"


def test_out_is_a_folder_that_is_not_a_bundle(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    expect_error(invoke("export", "minigpt4", "--out", target), f"output '{target}' is a non-empty folder that is "
                 "not a bundle; refusing to replace it", code=1)
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and leftovers(tmp_path) == []


def test_disk_full_during_compile(tiny_bundle, tmp_path, monkeypatch):
    """A tmpfs with room for the bundle and a few KiB: the new manifest does not fit. The old one
    stays, with no temporary file beside it."""
    install_fake_cann(tmp_path / "Ascend", monkeypatch)
    size = sum(-(-p.stat().st_size // 4096) * 4 for p in tiny_bundle.iterdir()) + 8  # KiB, in tmpfs pages
    with tmpfs(tmp_path / "disk", size) as disk:
        bundle = copy_bundle(tiny_bundle, disk, "b")
        before = snapshot(bundle)
        r = invoke("compile", bundle)
        expect_error(r, f"no space left on device while writing manifest.json in bundle '{bundle}'; compile "
                        "stopped there", code=1)
        assert len(r.error_lines) == 1
        assert snapshot(bundle) == before and leftovers(bundle) == []
