"""The InternLM2 kind's bundle graphs (exporters/llm/internlm2.py) on the runtime's Decoder: a
prompt whose image positions carry ``im_mask`` 1 is prefilled (in chunks, with the cache), then
decoded with ``im_mask`` 0, and every step's logits equal the torch groups' whole-sequence
recompute with the original's rule (PLoRA on the prompt's image positions only). The graph itself
is checked against transformers and a PLoRA reference in tests/graphs/test_internlm2.py."""
from __future__ import annotations

import numpy as np
import torch

from tests.helpers.chatglm_bundle import open_decoder, write_llm_bundle
from vlm2om.exporters.core.options import Gears
from vlm2om.exporters.llm.internlm2 import InternLM2Spec, random_llm
from vlm2om.graphs.internlm2 import InternLM2Config, lora_table

CFG = InternLM2Config(vocab_size=96, hidden=32, layers=3, heads=4, kv_heads=2, ffn=48, max_positions=256,
                      lora=lora_table(default=(4, 8), wqkv=(2, 4)))
SEQ, CACHE = [1, 8, 32], [16, 64]


def test_prefill_with_image_positions_then_decode_equals_recompute(tmp_path):
    parts = random_llm(CFG, Gears(seq=tuple(SEQ), cache=tuple(CACHE), layers_per_group=2), 3, "float32")
    embed, groups = parts.build_embed(), [parts.build_group(i) for i in range(len(parts.bounds))]
    assert isinstance(parts.spec, InternLM2Spec) and parts.bounds == [(0, 2), (2, 3)]
    bundle, manifest = write_llm_bundle(tmp_path / "b", parts.spec, embed, groups, parts.bounds, SEQ, CACHE)
    roles = {s["role"] for s in manifest["graphs"]["decoder_0"]["inputs"]}
    assert "image_mask" in roles and manifest["pipeline"]["attention"] == "causal"
    dec = open_decoder(bundle)

    gen = torch.Generator().manual_seed(5)
    prompt = torch.randn(13, CFG.hidden, generator=gen)  # 13 positions: chunks 8 + 5
    image = np.zeros(13, np.float32)
    image[2:9] = 1  # the image rows, across the chunk boundary
    cache = dec.new_cache(1)
    got = [dec.prefill([prompt.numpy()], cache, [image])[0]]
    tokens = [int(np.argmax(got[0]))]
    for _ in range(4):
        got.append(dec.step(cache, [tokens[-1]], [cache.length])[0])
        tokens.append(int(np.argmax(got[-1])))

    seq = torch.cat([prompt, embed(torch.tensor([tokens[:-1]]))[0]])
    flags = torch.zeros(1, len(seq))
    flags[0, 2:9] = 1
    x = seq[None]
    for g in groups:
        x = InternLM2Spec.reference_forward(g, x, image_mask=flags)
    want = x[0, 12:].numpy()
    np.testing.assert_allclose(np.stack(got), want, rtol=1e-4, atol=1e-4)
    # the mask matters: without it the prompt's logits differ
    x = seq[None]
    for g in groups:
        x = InternLM2Spec.reference_forward(g, x)
    assert np.abs(x[0, 12].numpy() - got[0]).max() > 1e-3
