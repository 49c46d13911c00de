"""runtime/prompts/glm.py: VisualGLM-6B's prompt as its ``model/chat.py`` writes it (the literal
strings here), the ids as that code builds them (each side of ``rfind("<img>") + 5`` encoded on
its own, then ``[gMASK] <sop>``), computed from SentencePiece with the rules applied by hand, and
``process_response`` on cases worked out by hand."""
from __future__ import annotations

import pytest
import sentencepiece as spm

from vlm2om.exporters.core import tiny_chatglm_tokenizer as tiny
from vlm2om.runtime.chatglm_tokenizer import ChatGLMTokenizer
from vlm2om.runtime.errors import BundleError, InputError
from vlm2om.runtime.prompts import KINDS, Conversation, clean_answer, tokenize_prompt
from vlm2om.runtime.prompts.glm import process_response

ZH = {"kind": "glm_qa", "roles": ["问：", "答："], "sep": "\n", "image_open": "<img>", "image_close": "</img>",
      "suffix": ["[gMASK]", "<sop>"], "answer_split": "答："}
EN = {**ZH, "roles": ["Q:", "A:"], "answer_split": "A:"}
OFFSET = 20000


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm_prompt") / "ice_text.model"
    path.write_bytes(tiny.build_tiny_chatglm_tokenizer())
    ids = tiny.special_ids(OFFSET)
    return ChatGLMTokenizer(path, ids["<sop>"], ids["<eop>"], OFFSET)


def sp_ids(tok, text_with_markers: str) -> list[int]:
    """SentencePiece on text whose newlines and spaces the test already wrote as markers."""
    sp = spm.SentencePieceProcessor(model_proto=tok.sp.serialized_model_proto())
    return [i + OFFSET for i in sp.EncodeAsIds(text_with_markers)]


def conversation(spec, turns, image=True):
    c = Conversation(spec)
    if image:
        c.add_image()
    for q, a in turns:
        c.ask(q)
        if a is not None:
            c.answer(a)
    return c


def test_registered():
    assert KINDS["glm_qa"].__name__ == "GLMQA"


def test_rendering_one_and_two_turns():
    assert conversation(ZH, [("描述这张图片。", None)]).render() == "<img></img>问：描述这张图片。\n答："
    two = conversation(ZH, [("描述这张图片。", "一只猫。"), ("它在哪里？", None)])
    assert two.render() == "<img></img>问：描述这张图片。\n答：一只猫。\n问：它在哪里？\n答："
    assert two.segments() == ["<img>", "</img>问：描述这张图片。\n答：一只猫。\n问：它在哪里？\n答："]
    en = conversation(EN, [("Describe it.", "A cat."), ("Where?", None)])
    assert en.render() == "<img></img>Q:Describe it.\nA:A cat.\nQ:Where?\nA:"
    text_only = conversation(ZH, [("你好", None)], image=False)
    assert text_only.render() == "问：你好\n答：" and text_only.segments() == ["问：你好\n答："]
    late = conversation(ZH, [("你好", "你好！")], image=False)
    late.add_image()  # the slot is first in the prompt whenever the image comes
    late.ask("图里有什么？")
    assert late.render() == "<img></img>问：你好\n答：你好！\n问：图里有什么？\n答："


def test_ids_one_turn(tok):
    gmask, sop = OFFSET + 385, OFFSET + 388
    segs = conversation(ZH, [("描述这张图片。", None)]).tokenize(tok)
    assert segs == [sp_ids(tok, "<img>"), sp_ids(tok, "</img>问：描述这张图片。<n>答：") + [gmask, sop]]


def test_ids_two_turns(tok):
    gmask, sop = OFFSET + 385, OFFSET + 388
    c = conversation(EN, [("What  is\tthis?", "A cat.\nIt sleeps."), ("Colour?", None)])
    want = sp_ids(tok, "</img>Q:What<|blank_2|>is<|tab|>this?<n>A:A cat.<n>It sleeps.<n>Q:Colour?<n>A:")
    assert c.tokenize(tok) == [sp_ids(tok, "<img>"), want + [gmask, sop]]
    assert tokenize_prompt(tok, c.segments(), EN) == c.tokenize(tok)
    # without an image: the whole prompt, then [gMASK] <sop>, as the HF code's tokenizer([prompt])
    assert conversation(ZH, [("你好", None)], image=False).tokenize(tok) == [
        sp_ids(tok, "问：你好<n>答：") + [gmask, sop]]


def test_refusals(tok):
    c = conversation(ZH, [])
    with pytest.raises(InputError, match="one image"):
        c.add_image()
    with pytest.raises(InputError, match="<img>"):
        c.ask("看<img>这里")
    llama_like = type("T", (), {"encode": lambda self, s, bos: [1]})()
    with pytest.raises(BundleError, match="chatglm_sentencepiece"):
        conversation(ZH, [("q", None)]).tokenize(llama_like)
    with pytest.raises(BundleError, match="suffix"):
        Conversation({k: v for k, v in ZH.items() if k != "suffix"})


@pytest.mark.parametrize("raw, want", [
    ("你好,世界!", "你好，世界！"),
    ("中,a", "中，a"), ("a,中", "a，中"), ("a,b", "a,b"),
    ("中,,文", "中，，文"),  # the CJK-before rule, then the CJK-after rule, per mark
    ("是?", "是？"), ("?是", "？是"), ("时间:12点;好", "时间：12点；好"),
    ("：,中", "：，中"),  # a full-width colon is no CJK ideograph: only the mark before 中 changes
    ("  中文。  ", "中文。"), ("[[训练时间]],好", "2023年，好"),
    ("Yes: it is, ok!", "Yes: it is, ok!"),
    ("\u4e00!\u9fff?", "\u4e00！\u9fff？"), ("\u3400,", "\u3400,"),  # the range ends are U+4E00..U+9FFF
])
def test_process_response(raw, want):
    assert process_response(raw) == want


def test_clean_answer_split_and_cleanup():
    assert clean_answer(" 图片中有一只猫,它在睡觉. ", ZH) == "图片中有一只猫，它在睡觉."
    assert clean_answer("前面答:后面", ZH) == "后面"  # SAT splits after process_response made "答："
    assert clean_answer("Answer A: yes", EN) == "yes"
    assert clean_answer("Hello , world .", {**EN, "hf_cleanup": True}) == "Hello, world."
    assert clean_answer("Hello , world .", EN) == "Hello , world ."
    assert clean_answer("好的STOP后面", {**ZH, "stop_strings": ["STOP"]}) == "好的"
