"""Which tests cover each registered family, beyond the checks every family gets from
tests/exporters/families/test_every_family.py (tiny export, lint, a greedy answer on the
runtime equal to the family's torch Reference, every graph equal to its torch module).

A family registered in ``vlm2om.exporters.families.FAMILIES`` without an entry here fails
``test_every_registered_family_is_covered``: a new family brings its tiny bundle (a session
fixture in tests/conftest.py), an oracle against an implementation nobody here wrote, its
checkpoint layouts at toy size, and its prompt and preprocessing written out literally.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FamilyCoverage:
    bundle_fixture: str  # session fixture (tests/conftest.py): the tiny bundle
    modules_fixture: str  # session fixture: the same seeded torch modules, built independently
    oracle: tuple[str, ...]  # test modules: the family's parts and whole vs transformers / the original code
    checkpoints: tuple[str, ...]  # test modules: checkpoint folders in the published layouts, at toy size
    prompt: str  # test module: prompt template and preprocessing written out from the original code
    tiny: dict = field(default_factory=dict)  # ExportOptions beyond preset="tiny" of the session bundle


COVERAGE: dict[str, FamilyCoverage] = {
    "minigpt4": FamilyCoverage(
        bundle_fixture="tiny_bundle", modules_fixture="tiny_modules",
        oracle=("tests/graphs/test_eva_vit.py", "tests/graphs/test_qformer.py", "tests/graphs/test_llama.py",
                "tests/exporters/families/minigpt4/test_end_to_end.py"),
        checkpoints=("tests/exporters/families/minigpt4/test_checkpoints.py",
                     "tests/exporters/families/minigpt4/test_export_checkpoint.py"),
        prompt="tests/exporters/families/minigpt4/test_prompt_literal.py",
        tiny={"layers_per_group": 1}),  # two stitched decoder files from the tiny preset's two layers
    "llava15": FamilyCoverage(
        bundle_fixture="llava_bundle", modules_fixture="llava_modules",
        oracle=("tests/graphs/test_clip_vit.py", "tests/graphs/test_projector.py",
                "tests/exporters/families/llava15/test_oracle.py"),
        checkpoints=("tests/exporters/families/llava15/test_checkpoints.py",),
        prompt="tests/exporters/families/llava15/test_prompt_literal.py"),
    "visualglm": FamilyCoverage(
        bundle_fixture="visualglm_bundle", modules_fixture="visualglm_modules",
        oracle=("tests/graphs/test_chatglm.py", "tests/graphs/test_visualglm_vision.py",
                "tests/runtime/test_glm_positions.py", "tests/exporters/families/visualglm/test_end_to_end.py"),
        checkpoints=("tests/exporters/families/visualglm/test_checkpoints.py",),
        prompt="tests/exporters/families/visualglm/test_prompt_literal.py"),
    **{name: FamilyCoverage(
        bundle_fixture=f"{fixture}_bundle", modules_fixture=f"{fixture}_modules",
        oracle=("tests/graphs/test_internlm2.py", "tests/graphs/test_ixc2_vision.py", "tests/runtime/test_hd_grid.py",
                "tests/exporters/families/ixc2/test_end_to_end.py"),
        checkpoints=("tests/exporters/families/ixc2/test_checkpoints.py",),
        prompt="tests/exporters/families/ixc2/test_prompt_literal.py")
       for name, fixture in (("ixc2-vl", "ixc2_vl"), ("ixc2-4khd", "ixc2_4khd"))},
}


def tiny_options(name: str):
    """The ExportOptions of the family's session bundle."""
    from vlm2om.exporters.families import get_family

    return get_family(name).ExportOptions(preset="tiny", **COVERAGE[name].tiny)
