"""Build the toy presets' tokenizer: a LLaMA-style SentencePiece model trained on a small
corpus shipped with the project (BPE, byte fallback, unk=0, bos=1, eos=2), so the tiny
bundle carries a real ``tokenizer.model`` read by the same runtime code as Vicuna's.
"""
from __future__ import annotations

import io
from importlib import resources

VOCAB_SIZE = 512


def build_tiny_tokenizer(vocab_size: int = VOCAB_SIZE) -> bytes:
    import sentencepiece as spm

    text = resources.files("vlm2om.exporters.core").joinpath("tiny_corpus.txt").read_text()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(text.splitlines() * 4), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, character_coverage=1.0, add_dummy_prefix=True, split_digits=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2)
    return buf.getvalue()
