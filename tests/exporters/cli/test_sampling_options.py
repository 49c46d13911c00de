"""The decoding options of `run`/`chat` work both ways for every family, and a family's own export
options come from its ExportOptions: the tiny MiniGPT-4 bundle samples by default, the tiny
LLaVA-1.5 bundle decodes greedily."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.helpers import run_cli
from tests.helpers.no_torch import no_torch_env
from vlm2om.exporters.cli.main import main
from vlm2om.exporters.cli.serve import generation_config
from vlm2om.exporters.core.options import Gears, RecipeOptions
from vlm2om.runtime.generation import GenerationConfig

SAMPLES = GenerationConfig(do_sample=True, temperature=1.0, top_p=0.9)  # MiniGPT-4's kind
GREEDY = GenerationConfig(do_sample=False)  # LLaVA-1.5's kind


def _run(bundle, image, *options):
    return CliRunner().invoke(main, ["run", str(bundle), "--image", str(image), "--prompt", "What is it?",
                                     "--max-new-tokens", "8", *options])


def _answer(bundle, image, *options) -> str:
    r = _run(bundle, image, *options)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("options, do_sample, temperature", [
    ({}, False, 1.0),
    ({"sample": True}, True, 1.0),
    ({"temperature": 0.7}, True, 0.7),  # a temperature turns sampling on, as LLaVA's scripts do
    ({"temperature": 0.0}, False, 1.0),  # LLaVA's way to say greedy
    ({"sample": True, "top_p": 0.5, "seed": 3}, True, 1.0),
])
def test_options_on_a_greedy_bundle(options, do_sample, temperature):
    cfg = generation_config(GREEDY, **options)
    assert (cfg.do_sample, cfg.temperature) == (do_sample, temperature)


@pytest.mark.parametrize("options, do_sample", [
    ({}, True), ({"greedy": True}, False), ({"temperature": 0.0}, False), ({"temperature": 1.5}, True),
    ({"greedy": True, "repetition_penalty": 1.2}, False),  # the penalty applies to greedy decoding too
])
def test_options_on_a_sampling_bundle(options, do_sample):
    assert generation_config(SAMPLES, **options).do_sample is do_sample


@pytest.mark.parametrize("defaults, options, message", [
    (SAMPLES, {"sample": True, "greedy": True}, "either --sample or --greedy"),
    (SAMPLES, {"greedy": True, "top_p": 0.9}, "--top-p applies only to sampling, and --greedy turns sampling off"),
    (SAMPLES, {"temperature": 0.0, "seed": 1}, "--seed applies only to sampling, and --temperature 0 means greedy"),
    (SAMPLES, {"temperature": 0.0, "sample": True}, "--temperature 0 means greedy decoding"),
    (SAMPLES, {"temperature": 1.2, "greedy": True}, "--temperature 1.2 applies only to sampling"),
    (GREEDY, {"top_p": 0.9}, "--top-p applies only to sampling; this bundle decodes greedily by default: add --sample"),
    (GREEDY, {"seed": 1}, "--seed applies only to sampling; this bundle decodes greedily by default: add --sample"),
])
def test_an_option_that_cannot_apply_is_refused(defaults, options, message):
    import click

    with pytest.raises(click.UsageError, match=message):
        generation_config(defaults, **options)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_bad_temperatures_are_refused(tiny_bundle, sample_image, value):
    r = _run(tiny_bundle, sample_image, "--temperature", value)
    assert r.exit_code == 2 and "--temperature" in r.output


def test_refusals_from_the_command_line(tiny_bundle, llava_batch_bundle, sample_image):
    r = _run(tiny_bundle, sample_image, "--top-p", "0.9", "--greedy")
    assert r.exit_code == 2 and "--top-p applies only to sampling" in r.output
    r = _run(llava_batch_bundle, sample_image, "--top-p", "0.9")
    assert r.exit_code == 2 and "add --sample" in r.output
    r = _run(llava_batch_bundle, sample_image, "--sample", "--greedy")
    assert r.exit_code == 2 and "not both" in r.output


def test_llava_samples_on_request(llava_batch_bundle, sample_image):
    greedy = _answer(llava_batch_bundle, sample_image)
    assert _answer(llava_batch_bundle, sample_image, "--temperature", "0") == greedy
    assert _answer(llava_batch_bundle, sample_image, "--greedy") == greedy
    sampled = _answer(llava_batch_bundle, sample_image, "--sample", "--seed", "1")
    assert sampled != greedy
    assert _answer(llava_batch_bundle, sample_image, "--sample", "--seed", "1") == sampled  # same seed, same text
    assert _answer(llava_batch_bundle, sample_image, "--sample", "--seed", "2") != sampled
    # A temperature alone turns sampling on: the same draw as --sample at that temperature.
    warm = _answer(llava_batch_bundle, sample_image, "--temperature", "1.5", "--seed", "1")
    assert warm == _answer(llava_batch_bundle, sample_image, "--sample", "--temperature", "1.5", "--seed", "1")
    assert warm != greedy


def test_minigpt4_decodes_greedily_on_request(tiny_bundle, sample_image):
    greedy = _answer(tiny_bundle, sample_image, "--greedy")
    assert _answer(tiny_bundle, sample_image, "--temperature", "0") == greedy
    sampled = _answer(tiny_bundle, sample_image, "--seed", "1")  # the bundle samples by default
    assert _answer(tiny_bundle, sample_image, "--seed", "1") == sampled
    assert sampled != greedy


def test_export_help_lists_the_families_without_torch(tmp_path):
    from vlm2om.exporters.families import FAMILIES

    env = no_torch_env(tmp_path)
    r = run_cli("export", "--help", env=env)
    assert r.returncode == 0, r.stderr
    for family in FAMILIES.values():
        assert family.name in r.stdout and family.title in r.stdout
    assert "vlm2om export MODEL --help" in r.stdout
    r = run_cli("export", "minigpt4", "--out", tmp_path / "b", env=env)
    assert r.returncode == 1 and "export needs torch" in r.stderr and "Traceback" not in r.stderr


def test_a_family_lists_its_own_options():
    r = CliRunner().invoke(main, ["export", "minigpt4", "--help"])
    assert r.exit_code == 0 and "minigpt4 options:" in r.output and "--vision-graphs" in r.output
    assert "--template" not in r.output and "presets: tiny, bench" in r.output
    r = CliRunner().invoke(main, ["export", "llava15", "--help"])
    assert "--template" in r.output and "--vision-graphs" not in r.output


@pytest.mark.parametrize("args, code, message", [
    (["minigpt4", "--opt", "nope=1"], 2, "minigpt4's own options are vision_graphs=INT"),
    (["llava15", "--opt", "vision_graphs=2"], 2, "llava15's own options are template=STR"),
    (["llava15", "--vision-graphs", "2"], 2, "No such option"),
    (["minigpt4", "--opt", "vision_graphs=two"], 2, "'two' is not a valid integer"),
    (["llava15", "--opt", "template"], 2, "expected NAME=VALUE"),
    (["llava15", "--template", "a", "--opt", "template=b"], 2, "template given twice"),
    (["llava15", "--opt", "template=bogus"], 1, "unknown LLaVA prompt template 'bogus'"),  # the family's own check
])
def test_family_options_are_checked(tmp_path, args, code, message):
    r = CliRunner().invoke(main, ["export", *args, "--out", str(tmp_path / "b")])
    assert r.exit_code == code and message in r.output, r.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args", [["--template", "llava_v1"], ["--opt", "template=llava_v1"]])
def test_a_family_option_reaches_the_bundle(tmp_path, args):
    r = CliRunner().invoke(main, ["export", *args, "llava15", "--out", str(tmp_path / "b"), "--no-simplify"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["prompt"]["template"] == "llava_v1"


def test_family_options_come_from_the_dataclass():
    """Any family's scalar fields become options, typed from their annotations; the shared
    RecipeOptions fields and nested configs do not."""
    from dataclasses import dataclass, field

    from vlm2om.exporters.cli.export import family_options, own_values

    @dataclass(frozen=True)
    class Options(RecipeOptions):
        fast: bool = field(default=False, metadata={"help": "go fast"})
        ratio: float | None = None
        gears: Gears | None = None

    found = family_options(Options)
    assert {n: (o.type, o.default) for n, o in found.items()} == {"fast": (bool, False), "ratio": (float, None)}
    assert own_values("toy", found, {"fast": None}, ("fast=yes", "ratio=0.5")) == {"fast": True, "ratio": 0.5}
    flag = found["fast"].click_option()
    assert (flag.opts, flag.secondary_opts) == (["--fast"], ["--no-fast"])
