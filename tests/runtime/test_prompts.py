"""runtime/prompts: FastChat's SEP_STYLE.TWO rendering as LLaVA-1.5 uses it, and tokenization as
LLaVA's ``tokenizer_image_token`` defines it, on a Hugging Face tokenizer; the literal templates
are in tests.helpers.templates."""
from __future__ import annotations

import pytest
import transformers as T

from tests.helpers.templates import LLAVA_V1, VICUNA_V1, two_turns
from vlm2om.runtime.prompts import Conversation, clean_answer, tokenize_prompt

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id between text chunks


@pytest.mark.parametrize("spec", [VICUNA_V1, LLAVA_V1], ids=["vicuna_v1", "llava_v1"])
def test_two_style_rendering(spec):
    _, first, second = two_turns(spec)
    system = spec["system"]
    assert first == f"{system} USER: <image>\nWhat is this? ASSISTANT:"
    assert second == f"{system} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: Its colour? ASSISTANT:"
    text_only = Conversation(spec)
    text_only.ask("Hi")
    assert text_only.render() == f"{system} USER: Hi ASSISTANT:"
    assert "curious user" in VICUNA_V1["system"] and "human's questions" in LLAVA_V1["system"]


@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory):
    """(our SentencePiece tokenizer, transformers' LlamaTokenizer per legacy flag) on one model."""
    from vlm2om.exporters.core.tiny_tokenizer import build_tiny_tokenizer
    from vlm2om.runtime.tokenizer import SentencePieceTokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "tokenizer.model").write_bytes(build_tiny_tokenizer())
    hf = {legacy: T.LlamaTokenizer.from_pretrained(str(d), legacy=legacy, add_bos_token=True)
          for legacy in (False, True)}
    return SentencePieceTokenizer(d / "tokenizer.model", 1, 2), hf


def llava_token_ids(prompt: str, hf_tok) -> list[int]:
    """tokenizer_image_token as LLaVA defines it: every chunk tokenized with BOS, the first chunk's
    BOS kept, later chunks' BOS dropped, IMAGE_TOKEN_INDEX between chunks."""
    chunks = [hf_tok(c).input_ids for c in prompt.split("<image>")]
    assert all(c[0] == hf_tok.bos_token_id for c in chunks)
    ids = list(chunks[0])
    for c in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX, *c[1:]]
    return ids


@pytest.mark.parametrize("legacy", [False, True], ids=["non-legacy", "legacy"])
def test_two_style_tokens_match_llava_tokenizer_image_token(tiny_tokenizers, legacy):
    ours, hf = tiny_tokenizers
    spec = {**VICUNA_V1, "legacy": legacy}
    for prompt in two_turns(spec)[1:]:
        conv_segments = prompt.split(spec["image_placeholder"])
        segs = tokenize_prompt(ours, conv_segments, spec)
        flat = list(segs[0])
        for s in segs[1:]:
            flat += [IMAGE_TOKEN_INDEX, *s]
        assert flat == llava_token_ids(prompt, hf[legacy]), prompt
    assert 2 in flat  # the multi-turn "</s>" became EOS, not the characters "</s>"


def test_two_style_clean_answer():
    assert clean_answer(" A cat sits on a mat. ", VICUNA_V1) == "A cat sits on a mat."
    assert clean_answer("A cat.</s>USER: more", VICUNA_V1) == "A cat."


@pytest.mark.parametrize("spec", [VICUNA_V1, LLAVA_V1], ids=["vicuna_v1", "llava_v1"])
def test_the_image_placeholder_in_a_question_is_refused(spec):
    """It would split the prompt at one more image than the chat holds; the turns stay as they were."""
    from vlm2om.runtime.errors import InputError

    conv = Conversation(spec)
    conv.add_image()
    before = [list(m) for m in conv.messages]
    with pytest.raises(InputError, match=f"the question contains '{spec['image_placeholder']}'"):
        conv.ask(f"is {spec['image_placeholder']} a cat?")
    assert conv.messages == before
