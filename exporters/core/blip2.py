"""What the two BLIP-2 families (MiniGPT-4, VisualGLM-6B) share on the image side: an EVA ViT-g split
into chained layer slices, then one ``bridge`` graph (Q-Former + the projection into the LLM), and
``Blip2ImageEvalProcessor``'s preprocessing. Their EVA and Q-Former modules differ (LAVIS's names
against SwissArmyTransformer's); the graph layout, the slicing and the preprocessing do not."""
from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from vlm2om.runtime.errors import InputError

from vlm2om.exporters.core.plan import CLIP_MEAN, CLIP_STD, image_graph
from vlm2om.exporters.core.subgraph import Subgraph, TensorDecl
from vlm2om.exporters.llm.common import group_bounds

# EVA in two graphs for a checkpoint: onnxruntime's CPU kernels verify fp16 weights through an fp32
# copy, so an export's peak memory is about twice its largest graph (~0.9 GB fp16 per EVA half).
REAL_VISION_GRAPHS = 2


def vision_bounds(graphs: int | None, from_checkpoint: bool, depth: int) -> list[tuple[int, int]]:
    """EVA layer slices [start, stop), one graph each (``--vision-graphs``; default 2 for a
    checkpoint, 1 for a preset)."""
    n = graphs or (REAL_VISION_GRAPHS if from_checkpoint else 1)
    if not 1 <= n <= depth:
        raise InputError(f"--vision-graphs {n}: the EVA ViT has {depth} layers")
    return group_bounds(depth, -(-depth // n))


def preprocess_steps(size: int) -> list[dict]:
    """Blip2ImageEvalProcessor: Resize((S, S), BICUBIC) -> ToTensor -> Normalize(CLIP)."""
    return [{"op": "rgb"}, {"op": "resize", "size": [size, size], "interpolation": "bicubic"},
            {"op": "to_float", "divisor": 255.0}, {"op": "normalize", "mean": CLIP_MEAN, "std": CLIP_STD}]


def slice_layers(whole: nn.Module, part: nn.Module, prefix: str, start: int) -> nn.Module:
    """``part`` (an encoder built for layers [start, stop)) holding ``whole``'s weights: its local
    layer ``{prefix}{j}`` is ``whole``'s ``{prefix}{start + j}``; other names are shared as they are."""
    full = whole.state_dict()

    def source(key: str) -> str:
        if not key.startswith(prefix):
            return key
        index, rest = key[len(prefix):].split(".", 1)
        return f"{prefix}{int(index) + start}.{rest}"

    part.load_state_dict({k: full[source(k)] for k in part.state_dict()})
    return part


def image_subgraphs(width: int, tokens: int, image_size: int, queries: int, hidden: int,
                    bounds: list[tuple[int, int]], build_vision: Callable[[int], nn.Module],
                    build_bridge: Callable[[], nn.Module], dtype: str) -> list[Subgraph]:
    """``vision`` (or ``vision_0``, ``vision_1``, ... chained by ``vision_tokens``): pixels ->
    [1, tokens, width] after ln_vision; ``bridge``: -> [1, queries, hidden] image tokens."""
    n = len(bounds)
    embeds = TensorDecl("image_embeds", dtype, (1, tokens, width))
    between = TensorDecl("vision_tokens", dtype, (1, tokens, width))
    chain = [TensorDecl("pixel_values", dtype, (1, 3, image_size, image_size)), *[between] * (n - 1), embeds]
    vision = [image_graph("vision" if n == 1 else f"vision_{i}", partial(build_vision, i), chain[i], chain[i + 1])
              for i in range(n)]
    return [*vision, image_graph("bridge", build_bridge, embeds, TensorDecl("image_tokens", dtype, (1, queries, hidden)))]
