"""Full-size MiniGPT-4, VisualGLM-6B or InternLM-XComposer2 export: wall time and peak resident memory of ``vlm2om export``.

What it does (``make bench-7b [BENCH_MODEL=visualglm]``; it prints figures against the targets and
never fails on them), for MiniGPT-4 (for VisualGLM-6B see ``fullsize_visualglm.py``, for
InternLM-XComposer2 ``fullsize_ixc2.py``):

1. Writes, once, a checkpoint folder with MiniGPT-4's real file formats and key names and
   full-size random weights (about 16 GB; the real weights cannot be downloaded here):
   ``eva_vit_g.pth`` (EVA-ViT-g, 39 blocks, fp16), ``blip2_pretrained_flant5xxl.pth``
   (``['model']``: ln_vision, query tokens, the Q-Former, a FlanT5 projection to ignore),
   ``pretrained_minigpt4_7b.pth`` (``['model']``: llama_proj) and ``vicuna/`` (LLaMA-7B's
   config.json, fp16 safetensors shards with their index, a tokenizer.model). The tokenizer
   is the tiny test tokenizer: Vicuna's own is not on this machine; its ids fit the vocabulary.
2. Runs ``vlm2om export minigpt4 --checkpoint ...`` (fp16, the default) in a child process and
   reports its wall time and peak RSS (the child's ``ru_maxrss``). Targets: <= 3 GiB, < 20 min.
3. Runs ``vlm2om run BUNDLE --max-new-tokens 1 --low-memory`` in another child: the exported
   full-size bundle on onnxruntime producing one token, one graph in memory at a time
   (onnxruntime's CPU kernels keep fp16 weights as fp32 copies: the whole bundle would need
   about 31 GB); reports wall time and peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch
from safetensors.torch import save_file

from vlm2om.exporters.core.tiny_tokenizer import build_tiny_tokenizer
from vlm2om.graphs.eva_vit import EvaVisionEncoder, EvaVitConfig
from vlm2om.graphs.qformer import QFormer, QFormerConfig

LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
            "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "intermediate_size": 11008, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"}
LAYERS_PER_SHARD = 4


def _random(shape, gen, name: str, dtype=torch.float16) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name.lower() or "ln_" in name or "LayerNorm" in name:
        return (torch.ones if leaf == "weight" else torch.zeros)(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def _meta_shapes(build) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in build().state_dict().items()}


def write_checkpoint(root: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    eva = {k: _random(s, gen, k) for k, s in _meta_shapes(lambda: EvaVisionEncoder(EvaVitConfig())).items()
           if not k.startswith("ln_vision.")}
    torch.save(eva, root / "eva_vit_g.pth")
    del eva
    model = {"ln_vision.weight": torch.ones(1408), "ln_vision.bias": torch.zeros(1408),
             "t5_proj.weight": torch.randn(4096, 768, generator=gen), "t5_proj.bias": torch.zeros(4096)}
    for k, s in _meta_shapes(lambda: QFormer(QFormerConfig())).items():
        v = _random(s, gen, k, torch.float32)
        if k == "query_tokens":
            model[k] = v
        elif k.startswith("embeddings_LayerNorm."):
            model["Qformer.bert.embeddings.LayerNorm." + k.split(".")[-1]] = v
        else:
            model["Qformer.bert.encoder." + k] = v
    torch.save({"model": model}, root / "blip2_pretrained_flant5xxl.pth")
    torch.save({"model": {"llama_proj.weight": torch.randn(4096, 768, generator=gen) * 0.02,
                          "llama_proj.bias": torch.zeros(4096)}}, root / "pretrained_minigpt4_7b.pth")
    llm = root / "vicuna"
    llm.mkdir(exist_ok=True)
    (llm / "config.json").write_text(json.dumps(LLAMA_7B, indent=1))
    (llm / "tokenizer.model").write_bytes(build_tiny_tokenizer())
    h, f, n = LLAMA_7B["hidden_size"], LLAMA_7B["intermediate_size"], LLAMA_7B["num_hidden_layers"]
    layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
             **{f"self_attn.{p}_proj.weight": (h, h) for p in "qkvo"},
             "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}
    shards = [[f"model.layers.{i}." for i in range(a, a + LAYERS_PER_SHARD)] for a in range(0, n, LAYERS_PER_SHARD)]
    total = len(shards) + 1
    weight_map = {}
    for s, prefixes in enumerate(shards, 1):
        name = f"model-{s:05d}-of-{total:05d}.safetensors"
        tensors = {p + k: _random(shape, gen, p + k) for p in prefixes for k, shape in layer.items()}
        save_file(tensors, str(llm / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        print(f"  wrote {name}", flush=True)
    name = f"model-{total:05d}-of-{total:05d}.safetensors"
    rest = {"model.embed_tokens.weight": _random((32000, h), gen, "embed"),
            "model.norm.weight": torch.ones(h, dtype=torch.float16),
            "lm_head.weight": _random((32000, h), gen, "lm_head")}
    save_file(rest, str(llm / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, name))
    (llm / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / ".complete").write_text("ok")


def measured(cmd: list[str]) -> tuple[int, float, float]:
    """Run ``cmd`` in a fresh child; (exit code, wall seconds, peak RSS in GiB) of that child."""
    t0 = time.perf_counter()
    pid = subprocess.Popen(cmd, cwd=ROOT).pid
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - t0, usage.ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("minigpt4", "visualglm", "ixc2-vl", "ixc2-4khd"), default="minigpt4",
                    help="the family whose full-size checkpoint is written and exported")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the checkpoint (kept between runs) and the bundle go (~32 GB; default "
                         "build/bench-7b, else build/bench-MODEL)")
    ap.add_argument("--skip-run", action="store_true", help="export only; do not load the bundle")
    ap.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=True,
                    help="run the token with `vlm2om run --low-memory` (default: on; onnxruntime's CPU "
                         "kernels hold fp16 weights as fp32, so the whole 7B bundle needs ~31 GB)")
    args = ap.parse_args()
    workdir = args.workdir or ROOT / "build" / ("bench-7b" if args.model == "minigpt4" else f"bench-{args.model}")
    ckpt, out = workdir / "checkpoint", workdir / "bundle"
    if args.write_only:  # the child that writes the checkpoint
        if args.model == "minigpt4":
            write_checkpoint(ckpt)
        elif args.model == "visualglm":
            from fullsize_visualglm import write_checkpoint as write_visualglm

            write_visualglm(ckpt)
        else:
            from fullsize_ixc2 import write_checkpoint as write_ixc2

            write_ixc2(ckpt, args.model.split("-")[1])
        return
    if not (ckpt / ".complete").is_file():
        # In a child: a process's peak RSS survives fork and exec on Linux, so writing the ~16 GB
        # here would be counted in the export's figure below.
        print(f"writing a full-size random {args.model} checkpoint to {ckpt} ...", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write-only", "--model", args.model, "--workdir", str(workdir)],
                       check=True)
        print(f"  done in {time.perf_counter() - t0:.0f}s", flush=True)
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) / 1e9
    vlm2om = [sys.executable, "-m", "vlm2om"]
    rc, wall, rss = measured([*vlm2om, "export", args.model, "--checkpoint", str(ckpt), "--out", str(out)])
    bundle = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e9 if rc == 0 else 0.0
    print(f"\nexport: checkpoint {size:.1f} GB -> bundle {bundle:.1f} GB, exit {rc}, "
          f"wall {wall / 60:.1f} min (target < 20), peak RSS {rss:.2f} GiB (target <= 3)")
    if rc or args.skip_run:
        sys.exit(rc)
    rc, wall, rss = measured([*vlm2om, "run", str(out), "--image", str(ROOT / "examples" / "sample.png"),
                              "--prompt", "Describe this image.", "--max-new-tokens", "1", "--greedy",
                              "--stats", *(["--low-memory"] if args.low_memory else [])])
    print(f"one token from the full-size bundle on onnxruntime: exit {rc}, wall {wall:.0f}s, "
          f"peak RSS {rss:.2f} GiB")
    sys.exit(rc)


if __name__ == "__main__":
    main()
