r"""Conversation templates, rendered from the manifest's ``prompt`` entry.

``single`` is FastChat's SEP_STYLE.SINGLE as MiniGPT-4 uses it (Vicuna v0); roles carry
their own punctuation (``"Human: "``)::

    {system}{sep}{role0}{msg}{sep}{role1}{msg}{sep}...{role1}

``two`` is SEP_STYLE.TWO as LLaVA-1.5 uses it (``vicuna_v1`` / ``llava_v1``: roles
``USER``/``ASSISTANT``, sep ``" "``, sep2 ``"</s>"``); message i ends with seps[i % 2]::

    {system}{sep}{role0}: {msg}{sep}{role1}: {msg}{sep2}...{role1}:

The image message is joined to the first question with ``image_join`` (" " for MiniGPT-4,
"\n" for LLaVA's ``"<image>\n" + question``). Rendered text is split on the image
placeholder and each segment tokenized on its own, with BOS per the ``bos`` rule ("first":
only the first segment, which is also LLaVA's ``tokenizer_image_token``: every chunk is
tokenized with BOS and the BOS of later chunks dropped). ``specials`` maps special-token text
inside a segment (LLaVA's sep2 ``"</s>"`` in multi-turn prompts) to its id, as a Hugging Face
tokenizer does; ``legacy`` is that tokenizer's flag: False (Vicuna v1.5) encodes the text right
after a special token without SentencePiece's dummy-prefix space.
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field

from .errors import BundleError

STYLES = ("single", "two")


@dataclass
class Conversation:
    spec: dict
    messages: list[list] = field(default_factory=list)  # [role_index, text or None]

    def add_image(self) -> None:
        self.messages.append([0, self.spec["image_message"]])

    def ask(self, text: str) -> None:
        last = self.messages[-1] if self.messages else None
        if last and last[0] == 0 and last[1].endswith(self.spec["image_message_end"]):
            last[1] = last[1] + self.spec.get("image_join", " ") + text  # MiniGPT-4: a space
        else:
            self.messages.append([0, text])
        self.messages.append([1, None])

    def answer(self, text: str) -> None:
        self.messages[-1][1] = text

    def render(self) -> str:
        s = self.spec
        if s["style"] not in STYLES:
            raise BundleError(f"prompt style '{s['style']}' is not known to this runtime")
        out = s["system"] + s["sep"]
        if s["style"] == "single":
            for role, msg in self.messages:
                out += s["roles"][role] + msg + s["sep"] if msg else s["roles"][role]
            return out
        seps = (s["sep"], s["sep2"])
        for i, (role, msg) in enumerate(self.messages):
            out += s["roles"][role] + ": " + msg + seps[i % 2] if msg else s["roles"][role] + ":"
        return out

    def segments(self) -> list[str]:
        return self.render().split(self.spec["image_placeholder"])


def tokenize_prompt(tokenizer, segments: list[str], spec: dict) -> list[list[int]]:
    """``tokenize_segments`` with the rules the manifest's prompt entry gives."""
    return tokenize_segments(tokenizer, segments, spec["bos"], spec.get("specials"),
                             spec.get("legacy", True))


def tokenize_segments(tokenizer, segments: list[str], bos_rule: str,
                      specials: dict[str, int] | None = None, legacy: bool = True) -> list[list[int]]:
    """Tokenize each text segment on its own, as the reference implementations do."""
    if bos_rule not in ("first", "every", "none"):
        raise BundleError(f"unknown BOS rule '{bos_rule}' in the manifest's prompt entry")
    out = []
    for i, seg in enumerate(segments):
        bos = bos_rule == "every" or (bos_rule == "first" and i == 0)
        if specials:
            out.append([tokenizer.bos_id] * bos + _encode_with_specials(tokenizer, seg, specials, legacy))
        else:
            out.append(tokenizer.encode(seg, bos=bos))
    return out


def _encode_with_specials(tokenizer, text: str, specials: dict[str, int], legacy: bool) -> list[int]:
    """Special-token text becomes its id; the text between is encoded piece by piece."""
    pattern = "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    after_special = False
    for j, part in enumerate(re.split(pattern, text)):
        if j % 2:
            ids.append(int(specials[part]))
            after_special = True
        elif part:
            if after_special and not legacy:
                ids.extend(_no_dummy_prefix(tokenizer).EncodeAsIds(part))
            else:
                ids.extend(tokenizer.encode(part, bos=False))
    return ids


_NO_PREFIX: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _no_dummy_prefix(tokenizer):
    """The tokenizer's SentencePiece model with ``add_dummy_prefix`` off (what a non-legacy Hugging
    Face Llama tokenizer applies after a special token). Needs protobuf; built once per tokenizer."""
    sp = _NO_PREFIX.get(tokenizer)
    if sp is None:
        import sentencepiece as spm
        try:
            from sentencepiece import sentencepiece_model_pb2 as pb
        except ImportError as e:
            raise BundleError("this bundle's prompt (legacy: false, with special tokens in the text) "
                              f"needs the protobuf package: {e}") from e
        proto = pb.ModelProto()
        proto.ParseFromString(tokenizer.sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        sp = _NO_PREFIX[tokenizer] = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return sp


def clean_answer(text: str, spec: dict) -> str:
    """Cut at the first stop string, keep what follows the last ``answer_split`` tag (MiniGPT-4),
    strip. LLaVA ("two") has no tag: the answer is the text before ``"</s>"``, stripped (EOS
    itself ends generation and never reaches the text)."""
    for stop in spec.get("stop_strings", []):
        text = text.split(stop)[0]
    tag = spec.get("answer_split")
    if tag:
        text = text.split(tag)[-1]
    return text.strip()
