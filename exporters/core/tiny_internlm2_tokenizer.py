"""Build the tiny InternLM-XComposer2 presets' tokenizer: the toy presets' SentencePiece model
(core/tiny_tokenizer.py) with InternLM2's chat pieces appended as its last two ids, as in the real
``tokenizer.model`` (92544 pieces: ``[UNUSED_TOKEN_145]`` 92542 ends a message, ``[UNUSED_TOKEN_146]``
92543 begins one). They are USER_DEFINED pieces: text holding them encodes to their ids in one piece
(the prompt kind also splits them out itself, as the original's Hugging Face tokenizer does).
"""
from __future__ import annotations

from vlm2om.exporters.core.tiny_tokenizer import VOCAB_SIZE as TEXT_PIECES
from vlm2om.exporters.core.tiny_tokenizer import build_tiny_tokenizer

CHAT_PIECES = ("[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]")
VOCAB_SIZE = TEXT_PIECES + len(CHAT_PIECES)
USER_DEFINED = 4  # sentencepiece ModelProto.SentencePiece.Type


def chat_ids() -> dict[str, int]:
    """Ids of the chat pieces in the tiny model."""
    return {p: TEXT_PIECES + i for i, p in enumerate(CHAT_PIECES)}


def build_tiny_internlm2_tokenizer() -> bytes:
    """The serialized model; the same bytes on every call."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(build_tiny_tokenizer())
    for piece in CHAT_PIECES:
        proto.pieces.append(pb.ModelProto.SentencePiece(piece=piece, score=0.0, type=USER_DEFINED))
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString(deterministic=True)
