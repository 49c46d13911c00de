"""Questions, decoding options and chat input a user types, end to end through `vlm2om run` and
`vlm2om chat`: each bad one is refused in one line naming the option or the prompt (its token
count and the cache gear), before the bundle's graphs load; a chat survives any bad turn. The
session bundles are byte-identical after every case."""
from __future__ import annotations

import os

import pytest

from tests.helpers import SAMPLE_IMAGE
from tests.helpers.bundles import copy_bundle
from tests.helpers.faults import expect_error, invoke, invoke_fresh, leftovers, snapshot

FAMILIES = {"tiny_bundle": ("<ImageHere>", 32), "llava_bundle": ("<image>", 16)}  # placeholder, image rows
SHORT = ("--greedy", "--max-new-tokens", "3")


@pytest.fixture(params=list(FAMILIES), ids=["minigpt4", "llava15"])
def family(request) -> str:
    return request.param


@pytest.fixture
def bundle(request, family):
    """A session bundle, checked unchanged (and nothing hidden left beside it) after the case."""
    path = request.getfixturevalue(family)
    before = snapshot(path)
    yield path
    assert snapshot(path) == before
    assert leftovers(path.parent) == []


@pytest.fixture
def no_graphs(monkeypatch):
    """Fails a case that hashes a graph file or loads a graph: input errors come first (the
    tokenizer, which counts the question, may be read and hashed)."""
    from vlm2om.runtime import bundle

    real = bundle.sha256_file

    def hash_no_graph(path, *args, **kw):
        assert not str(path).endswith(".onnx"), f"{path} was hashed before the input was checked"
        return real(path, *args, **kw)

    def refuse(*args, **kw):
        raise AssertionError("a graph was loaded before the input was checked")
    monkeypatch.setattr(bundle, "sha256_file", hash_no_graph)
    monkeypatch.setattr("vlm2om.runtime.pipeline.open_session", refuse)


def run(bundle, *args):
    return invoke("run", bundle, "--image", SAMPLE_IMAGE, *args)


def chat(bundle, stdin: bytes, *args):
    return invoke("chat", bundle, "--image", SAMPLE_IMAGE, *SHORT, *args, input=stdin)


def one_line(out: str) -> str:
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, out
    return errors[0]


# --- the question ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, message", [
    ("", "Error: Invalid value for '--prompt': the prompt is empty: give the question about the image"),
    (" \t ", "Error: Invalid value for '--prompt': the prompt is empty (only white space): give the question "
             "about the image"),
])
def test_an_empty_question_is_refused(bundle, no_graphs, prompt, message):
    assert one_line(expect_error(run(bundle, "--prompt", prompt), message, code=2)) == message


def test_a_question_too_long_for_the_largest_gear_names_its_size(family, bundle, no_graphs):
    _, rows = FAMILIES[family]
    out = expect_error(run(bundle, "--prompt", "the " * 400), code=1)
    line = one_line(out)
    assert line.startswith("Error: the prompt is ") and f" text + {rows} image) but the bundle's largest cache " \
        "gear holds 256; shorten the conversation or re-export with larger --cache-gears" in line, line
    total, text = (int(w.strip("(")) for w in line.split()[4:7:2])
    assert total == text + rows and total > 256


def test_an_altered_tokenizer_is_named_before_it_counts_a_question(tmp_path, tiny_bundle):
    copy = copy_bundle(tiny_bundle, tmp_path)
    data = bytearray((copy / "tokenizer.model").read_bytes())
    data[100] ^= 0xFF
    (copy / "tokenizer.model").write_bytes(bytes(data))
    out = expect_error(run(copy, "--prompt", "the " * 400), "altered: tokenizer.model", code=1)
    assert "cache gear" not in out


def test_the_same_question_fits_once_shorter(bundle):
    r = run(bundle, "--prompt", "the " * 100, *SHORT)
    assert r.code == 0 and r.exception is None, r.output


def test_the_image_placeholder_in_a_question_is_named(family, bundle, no_graphs):
    placeholder, _ = FAMILIES[family]
    expect_error(run(bundle, "--prompt", f"what is {placeholder} here?"),
                 f"Error: the question contains '{placeholder}', which this bundle's prompt format keeps for the "
                 "image: leave it out", code=1)


def test_a_question_that_is_not_utf8_is_read_with_a_warning(tiny_bundle):
    """The command line's bytes 0xff 0xfe reach Python as lone surrogates, which SentencePiece
    cannot take: they become U+FFFD, as on chat's stdin."""
    before = snapshot(tiny_bundle)
    r = invoke_fresh("run", tiny_bundle, "--image", SAMPLE_IMAGE, "--prompt", os.fsdecode(b"\xff\xfe what?"), *SHORT)
    expect_error(r, "warning: --prompt is not UTF-8 text; its undecodable bytes are read as U+FFFD", code=0)
    assert snapshot(tiny_bundle) == before


# --- decoding options -----------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, message", [
    ("--max-new-tokens", "0", "'--max-new-tokens': 0 is not in the range x>=1."),
    ("--max-new-tokens", "-5", "'--max-new-tokens': -5 is not in the range x>=1."),
    ("--temperature", "nan", "'--temperature': expected a finite number, got nan"),
    ("--temperature", "inf", "'--temperature': expected a finite number, got inf"),
    ("--temperature", "-1", "'--temperature': -1.0 is not in the range x>=0."),
    ("--temperature", "1e-310", "'--temperature': 1e-310 is too close to 0 to compute with (the smallest normal "
                                "number is 2.23e-308); 0 means greedy decoding"),
    ("--top-p", "0", "'--top-p': 0.0 is not in the range 0<x<=1."),
    ("--top-p", "1.5", "'--top-p': 1.5 is not in the range 0<x<=1."),
    ("--top-p", "nan", "'--top-p': expected a finite number, got nan"),
    ("--repetition-penalty", "0", "'--repetition-penalty': 0.0 is not in the range x>0."),
    ("--repetition-penalty", "inf", "'--repetition-penalty': expected a finite number, got inf"),
    ("--seed", "-1", "'--seed': -1 is not in the range x>=0."),
    ("--threads", "-1", "'--threads': -1 is not in the range x>=0."),
])
def test_a_bad_option_value_is_named(tmp_path, tiny_bundle, option, value, message):
    """Refused by click when the command line is read: even a bundle with a graph file gone, or no
    bundle at all, is never looked at."""
    broken = copy_bundle(tiny_bundle, tmp_path, "broken")
    (broken / "decoder_0.onnx").unlink()
    for where in (broken, tmp_path / "nowhere"):
        out = expect_error(run(where, "--prompt", "hi", "--sample", option, value), code=2)
        assert one_line(out) == f"Error: Invalid value for {message}", out


def test_an_option_the_decoding_never_reads_is_refused(bundle, no_graphs):
    expect_error(run(bundle, "--prompt", "hi", "--greedy", "--seed", "3"),
                 "Error: --seed applies only to sampling, and --greedy turns sampling off", code=2)


def test_threads_zero_means_all_cores_and_answers_alike(bundle):
    answers = {t: run(bundle, "--prompt", "What is it?", *SHORT, "--threads", t) for t in ("0", "1", "2")}
    for r in answers.values():
        assert r.code == 0 and r.exception is None and r.output == answers["0"].output, r.output


def test_a_bad_generation_entry_in_the_manifest_is_the_bundles_fault(tmp_path, tiny_bundle):
    import json

    copy = copy_bundle(tiny_bundle, tmp_path)
    m = json.loads((copy / "manifest.json").read_text())
    m["generation"]["top_p"] = 0
    (copy / "manifest.json").write_text(json.dumps(m))
    out = expect_error(run(copy, "--prompt", "hi"), "generation", "top_p", code=1)
    assert "--top-p" not in out  # not the user's option


# --- chat input -----------------------------------------------------------------------------------

def test_a_bad_turn_then_a_good_one(bundle):
    clean = chat(bundle, b"What is it?\n")
    r = chat(bundle, b"the " * 400 + b"\nWhat is it?\n")
    out = expect_error(r, "the conversation goes on; /reset starts over", code=0)
    assert "largest cache gear holds 256" in one_line(out) and out.count("assistant> ") == 1
    assert out.split("assistant> ")[-1] == clean.output.split("assistant> ")[-1]


def test_reset_starts_over_about_the_same_image(bundle):
    first = chat(bundle, b"What is it?\n").output
    r = chat(bundle, b"Tell me a story.\n/reset\nWhat is it?\n/RESET\n")
    assert r.code == 0 and r.exception is None and r.output.count("(conversation reset)") == 2, r.output
    assert r.output.split("assistant> ")[2].split("(conversation reset)")[0] == first.split("assistant> ")[1]


def test_bytes_that_are_not_utf8_are_replaced_with_a_warning(bundle):
    out = expect_error(chat(bundle, b"\xff\xfe what is it?\nWhat is it?\n"),
                       "warning: the line is not UTF-8 text; its undecodable bytes are read as U+FFFD", code=0)
    assert out.count("assistant> ") == 2 and "Error" not in out


@pytest.mark.parametrize("stdin, answers", [(b"", 0), (b"What is it?", 1), (b"\n\n   \n", 0), (b"/quit\nHi\n", 0)])
def test_end_of_input_ends_the_chat_quietly(bundle, stdin, answers):
    out = expect_error(chat(bundle, stdin), code=0)
    assert out.count("assistant> ") == answers and "Error" not in out and "Aborted" not in out


def test_an_unknown_command_is_named_and_the_chat_goes_on(bundle):
    out = expect_error(chat(bundle, b"/help\n//help me\n/usr/bin/env, what is it?\n"),
                       "Error: unknown command '/help' (the commands are /reset and /quit); to ask a question that "
                       "starts with '/', begin it with '//'", code=0)
    assert out.count("assistant> ") == 2 and out.count("Error") == 1


def test_a_placeholder_in_a_turn_is_named_and_the_chat_goes_on(family, bundle):
    placeholder, _ = FAMILIES[family]
    out = expect_error(chat(bundle, f"what {placeholder}?\nWhat is it?\n".encode()),
                       f"the question contains '{placeholder}'", code=0)
    assert out.count("assistant> ") == 1


def test_stdin_in_a_fresh_process(tiny_bundle):
    """The same through a real pipe: non-UTF-8 bytes, an overlong turn, an unknown command, EOF."""
    before = snapshot(tiny_bundle)
    r = invoke_fresh("chat", tiny_bundle, "--image", SAMPLE_IMAGE, *SHORT,
                     input=b"\xc3\x28 hi\n" + b"the " * 400 + b"\n/nope\nWhat is it?")
    out = expect_error(r, "not UTF-8", "largest cache gear holds 256", "unknown command '/nope'", code=0)
    assert out.count("assistant> ") == 2
    assert snapshot(tiny_bundle) == before
