"""Build the tiny ChatGLM preset's tokenizer: a SentencePiece model with the layout of ChatGLM-6B's
``ice_text.model`` in small, so tiny bundles exercise the same wrapper rules as the real one.

The real model holds 130000 text pieces (ids 0-3 are <unk> <s> </s> <pad>), then the eight
special pieces at 130000-130007, ``<|tab|>`` at 130008, ``<|blank_2|>``..``<|blank_80|>`` at
130009-130087 and the 256 byte pieces at 130088-130343. The tiny model keeps that order with
``TEXT_PIECES`` text pieces: a real id ``r >= 130000`` is tiny id ``r - 130000 + TEXT_PIECES``
([MASK] 384, [gMASK] 385, <sop> 388, <eop> 389, <|tab|> 392, <|blank_k|> 391 + k, <0xXX>
472 + XX; 728 pieces in all), and ``<pad>`` is 3 in both. ``<n>`` is a user-defined piece
(id 4 here). Special pieces are CONTROL pieces (text never encodes to them, they decode to
nothing); tab and blank pieces are USER_DEFINED, as ChatGLM's first tokenizer configured them.
The model ids add the manifest's ``id_offset`` (ChatGLM's ``num_image_tokens``) to these.
"""
from __future__ import annotations

import io
from importlib import resources

TEXT_PIECES = 384
SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
MAX_BLANK = 80
SP_SIZE = TEXT_PIECES + len(SPECIALS) + 1 + (MAX_BLANK - 1) + 256  # 728
CONTROL, USER_DEFINED, BYTE = 3, 4, 6  # sentencepiece ModelProto.SentencePiece.Type


def special_ids(offset: int = 0) -> dict[str, int]:
    """Model ids of the special pieces, and pad, for a bundle whose ``id_offset`` is ``offset``."""
    ids = {p: offset + TEXT_PIECES + i for i, p in enumerate(SPECIALS)}
    return {**ids, "<pad>": offset + 3}


def build_tiny_chatglm_tokenizer() -> bytes:
    """The serialized model; the same bytes on every call (one training thread, fixed corpus)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    core = resources.files("vlm2om.exporters.core")
    lines = [ln for name in ("tiny_chatglm_corpus.txt", "tiny_corpus.txt")
             for ln in core.joinpath(name).read_text(encoding="utf-8").splitlines()]
    # Tabs and space runs become single spaces: ChatGLM encodes those runs as their own pieces.
    lines = [ln.replace("\t", " ").replace("  ", " ") for ln in lines]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(lines * 4), model_writer=buf, vocab_size=TEXT_PIECES, model_type="unigram",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=["<n>"], byte_fallback=False,
        num_threads=1, character_coverage=1.0, add_dummy_prefix=True, split_digits=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    proto = pb.ModelProto()
    proto.ParseFromString(buf.getvalue())
    if len(proto.pieces) != TEXT_PIECES:
        raise RuntimeError(f"the tiny ChatGLM tokenizer trained {len(proto.pieces)} pieces, not {TEXT_PIECES}")
    add = [(p, CONTROL) for p in SPECIALS] + [("<|tab|>", USER_DEFINED)]
    add += [(f"<|blank_{k}|>", USER_DEFINED) for k in range(2, MAX_BLANK + 1)]
    add += [(f"<0x{b:02X}>", BYTE) for b in range(256)]
    for piece, kind in add:
        proto.pieces.append(pb.ModelProto.SentencePiece(piece=piece, score=0.0, type=kind))
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString(deterministic=True)
