r"""``glm_qa``: the question/answer prompt of ChatGLM-6B as VisualGLM-6B uses it.

With an image (VisualGLM's ``chat``: SAT's ``model/chat.py``, the HF ``build_inputs_with_image``)::

    <img></img>问：{q0}\n答：{r0}\n问：{q}\n答：

roles ``["问：", "答："]`` (the English form: ``["Q:", "A:"]``), ``sep`` ``"\n"``. The image's
embeddings go at ``rfind("<img>") + 5``: the text before and after are tokenized on their own
(no special tokens) and the ids end with the ``suffix`` pieces, ``[gMASK] <sop>``
(``build_inputs_with_special_tokens``). Without an image the prompt is the turns alone, one
segment, as the HF code builds it. Only one image: the format has one slot, first in the prompt.

The answer is cleaned as ChatGLM's ``process_response`` does (strip; ``[[训练时间]]`` becomes
``2023年``; ``, ! : ; ?`` next to a CJK ideograph become full-width), then, with ``answer_split``,
only what follows the last tag is kept (SAT splits the decoded sequence on ``"答："``/``"A:"``).
``hf_cleanup`` first applies the Hugging Face tokenizer's ``clean_up_tokenization`` (its
``decode`` default then: ``" ."`` becomes ``"."`` and so on), for parity with the HF ``chat``.
"""
from __future__ import annotations

import re

from ..errors import BundleError, InputError

IMAGE = 2  # role index of the image message
CJK = "\u4e00-\u9fff"
PUNCT = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))  # process_response's order
HF_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
              (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def process_response(text: str) -> str:
    """ChatGLM-6B's answer clean-up, rule by rule in its order."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    for ascii_, full in PUNCT:
        a = re.escape(ascii_)
        text = re.sub(f"([{CJK}]){a}", lambda m: m.group(1) + full, text)
        text = re.sub(f"{a}([{CJK}])", lambda m: full + m.group(1), text)
    return text


def hf_cleanup(text: str) -> str:
    for a, b in HF_CLEANUP:
        text = text.replace(a, b)
    return text


class GLMQA:
    def __init__(self, spec: dict):
        self.spec = spec
        missing = [k for k in ("roles", "sep", "image_open", "image_close", "suffix") if k not in spec]
        if missing:
            raise BundleError(f"the manifest's prompt entry (kind glm_qa) lacks {', '.join(missing)}")

    def add_image(self, messages: list[list]) -> None:
        if any(role == IMAGE for role, _ in messages):
            raise InputError("this bundle's prompt format holds one image; start a new chat for another")
        messages.insert(0, [IMAGE, None])

    def ask(self, messages: list[list], text: str) -> None:
        if self.spec["image_open"] in text:  # it would move the image slot (the slot is the last tag)
            raise InputError(f"the question contains '{self.spec['image_open']}', which this bundle's prompt "
                             "format keeps for the image: leave it out")
        messages.extend([[0, text], [1, None]])

    def render(self, messages: list[list]) -> str:
        s = self.spec
        out = s["image_open"] + s["image_close"] if any(r == IMAGE for r, _ in messages) else ""
        for role, msg in messages:
            if role == 0:
                out += s["roles"][0] + msg + s["sep"] + s["roles"][1]
            elif role == 1 and msg is not None:
                out += msg + s["sep"]
        return out

    def split(self, text: str) -> list[str]:
        """At the last image tag, when the prompt starts with one (questions never hold it)."""
        tag = self.spec["image_open"]
        if not text.startswith(tag):
            return [text]
        at = text.rfind(tag) + len(tag)
        return [text[:at], text[at:]]

    def tokenize(self, tokenizer, segments: list[str]) -> list[list[int]]:
        if not hasattr(tokenizer, "piece_id"):
            raise BundleError("prompt kind glm_qa needs a tokenizer of kind chatglm_sentencepiece")
        out = [tokenizer.encode(seg, bos=False) for seg in segments]
        out[-1] = out[-1] + [tokenizer.piece_id(p) for p in self.spec["suffix"]]
        return out

    def clean(self, text: str) -> str:
        s = self.spec
        for stop in s.get("stop_strings", []):
            text = text.split(stop)[0]
        if s.get("hf_cleanup"):
            text = hf_cleanup(text)
        text = process_response(text)
        if s.get("answer_split"):
            text = text.split(s["answer_split"])[-1].strip()
        return text
