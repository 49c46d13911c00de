"""runtime/chatglm_tokenizer.py against SentencePiece itself with ChatGLM's text rules applied by
hand in the test (``<n>``, ``<|tab|>``, ``<|blank_k|>`` for runs of 2..80 spaces, longest first),
on the tiny ChatGLM tokenizer whose piece layout is checked here too."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import sentencepiece as spm

from vlm2om.exporters.core import tiny_chatglm_tokenizer as tiny
from vlm2om.runtime.chatglm_tokenizer import ChatGLMTokenizer
from vlm2om.runtime.errors import BundleError
from vlm2om.runtime.tokenizer import SentencePieceTokenizer

OFFSETS = (0, 20000)  # ChatGLM-6B's final layout, and its first release's num_image_tokens
TEXTS = ["描述这张图片。", "The circle is blue.", "第一行\n第二行\n\n", "\tdef f():\n\t\treturn 1", "a  b   c",
         " 前导空格", "尾随空格 ", "中文, English! 混合?", "齉😀é", "[gMASK] <sop> [MASK] 不是特殊符号"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("chatglm_tok") / "ice_text.model"
    path.write_bytes(tiny.build_tiny_chatglm_tokenizer())
    return path


@pytest.fixture(scope="module")
def sp(model):
    return spm.SentencePieceProcessor(model_file=str(model))


def tok_for(model, offset):
    ids = tiny.special_ids(offset)
    return ChatGLMTokenizer(model, ids["<sop>"], ids["<eop>"], offset)


def by_hand(sp, text: str, offset: int) -> list[int]:
    """The rules written out again: a run of n spaces is 80-blocks, then what is left."""
    out, i = "", 0
    while i < len(text):
        if text[i] == " ":
            j = i
            while j < len(text) and text[j] == " ":
                j += 1
            n = j - i
            while n >= 80:
                out, n = out + "<|blank_80|>", n - 80
            out += {0: "", 1: " "}.get(n, f"<|blank_{n}|>")
            i = j
        else:
            out += {"\n": "<n>", "\t": "<|tab|>"}.get(text[i], text[i])
            i += 1
    return [x + offset for x in sp.EncodeAsIds(out)]


def test_tiny_layout_is_chatglm_in_small(model, sp):
    assert tiny.build_tiny_chatglm_tokenizer() == model.read_bytes()  # deterministic
    assert sp.GetPieceSize() == tiny.SP_SIZE == 728
    assert [sp.IdToPiece(i) for i in range(6)] == ["<unk>", "<s>", "</s>", "<pad>", "<n>", "\u2581"]
    real = {"[MASK]": 130000, "[gMASK]": 130001, "[sMASK]": 130002, "<unused_0>": 130003, "<sop>": 130004,
            "<eop>": 130005, "<ENC>": 130006, "<dBLOCK>": 130007, "<|tab|>": 130008, "<|blank_2|>": 130009,
            "<|blank_80|>": 130087, "<0x00>": 130088, "<0xFF>": 130343}
    for piece, r in real.items():  # the documented mapping: real id - 130000 + TEXT_PIECES
        assert sp.PieceToId(piece) == r - 130000 + tiny.TEXT_PIECES, piece
    assert all(sp.IsControl(sp.PieceToId(p)) for p in tiny.SPECIALS)
    assert all(sp.IsByte(i) for i in range(472, 728)) and not sp.IsControl(sp.PieceToId("<|blank_7|>"))
    assert tiny.special_ids(20000)["[gMASK]"] == 20385 and tiny.special_ids(0)["<pad>"] == 3


@pytest.mark.parametrize("offset", OFFSETS)
def test_space_runs_2_to_100(model, sp, offset):
    tok = tok_for(model, offset)
    for n in range(1, 171):
        text = f"x{' ' * n}中"
        ids = tok.encode(text)
        assert ids == by_hand(sp, text, offset), n
        assert tok.decode(ids) == text, n
    assert sp.IdToPiece(tok.encode("a" + " " * 100 + "b")[1] - offset) == "<|blank_80|>"
    assert [sp.IdToPiece(i - offset) for i in tok.encode("a" + " " * 100 + "b")][1:3] == ["<|blank_80|>",
                                                                                         "<|blank_20|>"]


@pytest.mark.parametrize("offset", OFFSETS)
def test_texts_round_trip_and_match_rules(model, sp, offset):
    tok = tok_for(model, offset)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == by_hand(sp, text, offset), text
        assert all(i >= offset for i in ids)
        assert tok.decode(ids) == text, text
        assert tok.encode(text, bos=True) == [tok.bos_id, *ids]
    pieces = [sp.IdToPiece(i - offset) for i in tok.encode("行\n行\t行")]
    assert "<n>" in pieces and "<|tab|>" in pieces


@pytest.mark.parametrize("offset", OFFSETS)
def test_special_tokens(model, offset):
    tok = tok_for(model, offset)
    ids = tiny.special_ids(offset)
    assert tok.piece_id("[gMASK]") == ids["[gMASK]"] and tok.piece_id("<sop>") == tok.bos_id
    assert not set(tok.encode("[gMASK]<sop><eop>[MASK]")) & set(ids.values())  # text stays text
    assert tok.decode([ids["[gMASK]"], ids["<sop>"]] + tok.encode("答案") + [ids["<eop>"]]) == "答案"
    # ids below the offset (ChatGLM's image tokens) and past the pieces decode to nothing
    assert tok.decode([offset - 1, *tok.encode("好"), tok.vocab_size + 5]) == "好"
    with pytest.raises(BundleError, match="no piece"):
        tok.piece_id("<nope>")


def stream_text(tok, ids):
    st = tok.stream()
    return "".join(st.push(i) for i in ids)


@pytest.mark.parametrize("offset", OFFSETS)
def test_stream_equals_decode(model, sp, offset):
    tok = tok_for(model, offset)
    for text in TEXTS + ["  两个前导空格", "\n开头换行", "\t开头制表"]:
        ids = tok.encode(text)
        assert stream_text(tok, ids) == tok.decode(ids) == text, text
    pid = lambda p: sp.PieceToId(p) + offset  # noqa: E731
    cases = [["\u2581", "\u2581a"], ["[gMASK]", "\u2581a"], ["<pad>", "\u2581", "\u2581a"],  # first-piece rule
             ["<0xE4>", "<0xB8>", "<0xAD>", "\u2581a"], ["<0xE4>", "\u2581a"], ["<0xE4>", "[sMASK]", "<0xB8>"],
             ["<0xCE>", "<0xEE>", "<0x90>", "\u2581a"], ["<unk>", "\u2581a"], ["<|blank_3|>", "<n>", "<|tab|>"]]
    for pieces in cases:
        ids = [pid(p) for p in pieces]
        assert stream_text(tok, ids) == sp.DecodeIds([i - offset for i in ids]).replace("<|blank_3|>", "   ").replace(
            "<n>", "\n").replace("<|tab|>", "\t"), pieces


def test_manifest_dispatch(model, tmp_path):
    (tmp_path / "ice_text.model").write_bytes(model.read_bytes())
    entry = {"kind": "chatglm_sentencepiece", "file": "ice_text.model", "bos_id": 20388, "eos_id": 20389,
             "eos_ids": [20389], "id_offset": 20000, "max_blank": 80}
    bundle = SimpleNamespace(manifest={"tokenizer": entry}, path=lambda rel: tmp_path / rel)
    tok = SentencePieceTokenizer.from_manifest(bundle)
    assert isinstance(tok, ChatGLMTokenizer) and tok.offset == 20000 and tok.vocab_size == 20728
    json.dumps(entry)  # the entry is plain JSON
    with pytest.raises(BundleError, match="id_offset"):
        SentencePieceTokenizer.from_manifest(SimpleNamespace(manifest={"tokenizer": {
            k: v for k, v in entry.items() if k != "id_offset"}}, path=bundle.path))


def test_refuses_a_model_without_chatglm_pieces(tmp_path):
    from vlm2om.exporters.core.tiny_tokenizer import build_tiny_tokenizer

    (tmp_path / "tokenizer.model").write_bytes(build_tiny_tokenizer())
    with pytest.raises(BundleError, match="not a ChatGLM tokenizer"):
        ChatGLMTokenizer(tmp_path / "tokenizer.model", 1, 2)
