r"""FastChat's conversation templates as MiniGPT-4 and LLaVA-1.5 use them.

``fastchat_single`` is SEP_STYLE.SINGLE as MiniGPT-4 uses it (Vicuna v0); roles carry their
own punctuation (``"Human: "``)::

    {system}{sep}{role0}{msg}{sep}{role1}{msg}{sep}...{role1}

``fastchat_two`` is SEP_STYLE.TWO as LLaVA-1.5 uses it (``vicuna_v1`` / ``llava_v1``: roles
``USER``/``ASSISTANT``, sep ``" "``, sep2 ``"</s>"``); message i ends with seps[i % 2]::

    {system}{sep}{role0}: {msg}{sep}{role1}: {msg}{sep2}...{role1}:

The image message is joined to the next question with ``image_join`` (" " for MiniGPT-4, "\n"
for LLaVA's ``"<image>\n" + question``). Rendered text is split on the image placeholder and each
segment tokenized on its own, with BOS per the ``bos`` rule ("first": only the first segment,
which is also LLaVA's ``tokenizer_image_token``: every chunk is tokenized with BOS and the BOS of
later chunks dropped). ``specials`` maps special-token text inside a segment (LLaVA's sep2
``"</s>"`` in multi-turn prompts) to its id, as a Hugging Face tokenizer does; ``legacy`` is that
tokenizer's flag: False (Vicuna v1.5) encodes the text right after a special token without
SentencePiece's dummy-prefix space.
"""
from __future__ import annotations

import re
import weakref

from ..errors import BundleError, InputError

BOS_RULES = ("first", "every", "none")


class PromptKind:
    """FastChat semantics shared by both separator styles; a subclass renders one style."""

    def __init__(self, spec: dict):
        self.spec = spec
        if spec.get("bos", "first") not in BOS_RULES:
            raise BundleError(f"unknown BOS rule '{spec['bos']}' in the manifest's prompt entry")

    def add_image(self, messages: list[list]) -> None:
        messages.append([0, self.spec["image_message"]])

    def ask(self, messages: list[list], text: str) -> None:
        s, last = self.spec, messages[-1] if messages else None
        if s["image_placeholder"] in text:  # it would split the prompt at one more image than given
            raise InputError(f"the question contains '{s['image_placeholder']}', which this bundle's prompt "
                             "format keeps for the image: leave it out")
        if last and last[0] == 0 and last[1].endswith(s["image_message_end"]):
            last[1] = last[1] + s.get("image_join", " ") + text  # the question joins its image
        else:
            messages.append([0, text])
        messages.append([1, None])

    def render(self, messages: list[list]) -> str:
        raise NotImplementedError

    def split(self, text: str) -> list[str]:
        return text.split(self.spec["image_placeholder"])

    def tokenize(self, tokenizer, segments: list[str]) -> list[list[int]]:
        """Each text segment on its own, as the reference implementations do."""
        rule, specials = self.spec.get("bos", "first"), self.spec.get("specials")
        out = []
        for i, seg in enumerate(segments):
            bos = rule == "every" or (rule == "first" and i == 0)
            if specials:
                ids = _encode_with_specials(tokenizer, seg, specials, self.spec.get("legacy", True))
                out.append([tokenizer.bos_id] * bos + ids)
            else:
                out.append(tokenizer.encode(seg, bos=bos))
        return out

    def clean(self, text: str) -> str:
        """Cut at the first stop string, keep what follows the last ``answer_split`` tag
        (MiniGPT-4), strip. LLaVA has no tag: the answer is the text before ``"</s>"``, stripped
        (EOS itself ends generation and never reaches the text)."""
        for stop in self.spec.get("stop_strings", []):
            text = text.split(stop)[0]
        tag = self.spec.get("answer_split")
        if tag:
            text = text.split(tag)[-1]
        return text.strip()


class FastChatSingle(PromptKind):
    def render(self, messages: list[list]) -> str:
        s = self.spec
        out = s["system"] + s["sep"]
        for role, msg in messages:
            out += s["roles"][role] + msg + s["sep"] if msg else s["roles"][role]
        return out


class FastChatTwo(PromptKind):
    def render(self, messages: list[list]) -> str:
        s = self.spec
        out, seps = s["system"] + s["sep"], (s["sep"], s["sep2"])
        for i, (role, msg) in enumerate(messages):
            out += s["roles"][role] + ": " + msg + seps[i % 2] if msg else s["roles"][role] + ":"
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
