"""runtime/wordpiece.py (the ``tokenizers`` library) against transformers' own Python BertTokenizer
(``do_lower_case``) as VLMo calls it: padding to max_length, truncation, the attention mask."""
from __future__ import annotations

import numpy as np
import pytest
from transformers import BertTokenizer

from vlm2om.runtime.errors import BundleError
from vlm2om.runtime.wordpiece import WordPieceTokenizer

WORDS = ["what", "is", "the", "man", "holding", "?", "how", "many", "dogs", "are", "there", "color", "of",
         "##s", "##ing", "un", "##aff", "##able", "café", "a", "in", ",", "."]
TEXTS = ["What is the man holding?", "How many dogs are there", "", "  Unaffable café, colors!  ",
         "what " * 60, "Ünaffable DOGS.", "holding\tthe\ncolor"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return path


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_mask_equal_bert_tokenizer(vocab, text):
    ref = BertTokenizer(str(vocab), do_lower_case=True)(text, padding="max_length", truncation=True, max_length=12)
    ids, mask = WordPieceTokenizer(vocab, 12).encode(text)
    assert ids.tolist() == ref["input_ids"] and mask.tolist() == ref["attention_mask"]
    assert len(ids) == 12 and ids[0] == 2 and 3 in ids.tolist()  # [CLS] first, [SEP] kept when truncated


def test_batch_and_refusals(vocab):
    ids, mask = WordPieceTokenizer(vocab, 8).encode_batch(TEXTS[:3])
    assert ids.shape == mask.shape == (3, 8) and ids.dtype == np.int64
    with pytest.raises(BundleError, match="holds no"):
        WordPieceTokenizer(vocab, 1)
    with pytest.raises(BundleError, match="cannot load WordPiece vocabulary"):
        WordPieceTokenizer(vocab.parent / "missing.txt", 8)
