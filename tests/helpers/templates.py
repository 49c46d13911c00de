"""LLaVA-1.5's prompt templates written out literally (FastChat's ``conv_vicuna_v1`` and LLaVA's
``conv_llava_v1``, SEP_STYLE.TWO), as the manifest's prompt entry must carry them: the recipe's
own constants are checked against these, never the other way round."""
from __future__ import annotations

VICUNA_V1 = {
    "template": "vicuna_v1", "kind": "fastchat_two",
    "system": "A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "roles": ["USER", "ASSISTANT"], "sep": " ", "sep2": "</s>",
    "image_message": "<image>", "image_message_end": "<image>", "image_join": "\n",
    "image_placeholder": "<image>", "bos": "first", "specials": {"</s>": 2}, "legacy": False,
    "stop_strings": ["</s>"],
}
LLAVA_V1 = {**VICUNA_V1, "template": "llava_v1",
            "system": "A chat between a curious human and an artificial intelligence assistant. "
                      "The assistant gives helpful, detailed, and polite answers to the human's questions."}


def two_turns(spec: dict):
    """A conversation about one image with one answered and one open question, rendered by the
    runtime from ``spec``: (conversation, first turn's text, both turns' text)."""
    from vlm2om.runtime.prompts import Conversation

    conv = Conversation(spec)
    conv.add_image()
    conv.ask("What is this?")
    first = conv.render()
    conv.answer("A cat.")
    conv.ask("Its colour?")
    return conv, first, conv.render()
