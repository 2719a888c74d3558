"""FP16 copies of an exported graph, for GPU providers and TensorRT.

Weights and activations become float16; the graph's inputs and outputs stay float32 (the model's
tensor interface is shared by all its engines), with casts at the edges. The coordinate embedding is
kept in float32: level-0 coordinates pass 65,504 (float16's largest value) on any real slide, and
float16 cannot resolve sin(x) for x in the hundreds, which is where patch-unit angles are. Every node
between the ``coords`` input and the Sin/Cos nodes is therefore left in float32.

Patch encoders keep two more float32 islands (:func:`encoder_fp32_nodes`):

* the preprocessing, from the uint8 ``patches`` to the normalised image (Cast, /255, the antialiased
  Resize, mean/std): pixel arithmetic is cheap, and the cast to float16 comes after the normalisation;
* every LayerNormalization and SkipLayerNormalization. ONNX Runtime's CUDA SkipLayerNormalization
  accumulates the mean and the mean of squares in the tensor's own type, float16
  (contrib_ops/cuda/bert/layer_norm.cuh: ``cub::KeyValuePair<half, half>`` summed with ``__hadd2``,
  ``hrsqrt``): a token whose values have an RMS above 256 makes E[x^2] overflow 65,504. Kept in float32,
  the residual stream (SkipLayerNormalization's sum output feeds the next one) stays float32 from
  block to block, and only the attention and MLP branches compute in float16, as mixed-precision
  training does. Large ViTs overflow float16 LayerNorms otherwise (TensorRT #2564, TRT-LLM #1544).
  (The ONNX LayerNormalization's CUDA kernel already accumulates in float32, U=float; it reads the
  residual stream, so it is kept with it at the cost of no cast.) The attention itself stays float16:
  ORT's CUDA MultiHeadAttention reduces its softmax in float32 (attention_softmax.h; the flash and
  memory-efficient kernels accumulate in float32 too).
"""

from __future__ import annotations

import onnx

__all__ = ["to_fp16", "coordinate_nodes", "preprocessing_nodes", "encoder_fp32_nodes", "NORMALIZATION_OPS"]

# kept float32 in an encoder's FP16 graph (see above)
NORMALIZATION_OPS = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                     "SkipSimplifiedLayerNormalization")


def coordinate_nodes(graph: onnx.GraphProto, source: str = "coords") -> set[str]:
    """Names of the nodes on a path from input ``source`` to a Sin or Cos node (inclusive)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    downstream, frontier = {}, [source]
    while frontier:  # every node fed, directly or not, by the coordinates
        for node in consumers.get(frontier.pop(), []):
            if node.name not in downstream:
                downstream[node.name] = node
                frontier.extend(node.output)
    producer = {out: node for node in downstream.values() for out in node.output}
    keep, frontier = set(), [n for n in downstream.values() if n.op_type in ("Sin", "Cos")]
    while frontier:  # ... walked back from the sinusoids
        node = frontier.pop()
        if node.name in keep:
            continue
        keep.add(node.name)
        frontier.extend(producer[name] for name in node.input if name in producer)
    return keep


def preprocessing_nodes(graph: onnx.GraphProto, source: str = "patches") -> set[str]:
    """Names of an encoder's preprocessing nodes: those on a path from input ``source`` to the data
    input of the first Conv it reaches (the patch embedding of a ViT, conv1 of a ResNet). Side
    branches (Shape of the input, for the batch size) are not on such a path and are left alone."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    downstream, frontier = {}, [source]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name not in downstream:
                downstream[node.name] = node
                frontier.extend(node.output)
    conv = next((n for n in graph.node if n.op_type == "Conv" and n.name in downstream), None)
    if conv is None:
        return set()
    producer = {out: node for node in downstream.values() for out in node.output}
    keep, frontier = set(), [producer[conv.input[0]]] if conv.input[0] in producer else []
    while frontier:
        node = frontier.pop()
        if node.name in keep:
            continue
        keep.add(node.name)
        frontier.extend(producer[name] for name in node.input if name in producer)
    return keep


def encoder_fp32_nodes(graph: onnx.GraphProto) -> set[str]:
    """The nodes an encoder's FP16 graph keeps in float32: its preprocessing, its normalisations, and
    what follows the last normalisation (taking the class token, Virchow2's mean of the patch tokens):
    the features are read from the float32 norm, not from a float16 copy of it."""
    _name_nodes(graph)
    norms = [n for n in graph.node if n.op_type in NORMALIZATION_OPS]
    head = _downstream(graph, [o for o in norms[-1].output if o]) if norms else set()
    return preprocessing_nodes(graph) | {n.name for n in norms} | head


def _downstream(graph: onnx.GraphProto, sources: list[str]) -> set[str]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen, frontier = set(), list(sources)
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.name not in seen:
                seen.add(node.name)
                frontier.extend(node.output)
    return seen


def _name_nodes(graph: onnx.GraphProto) -> None:
    for i, node in enumerate(graph.node):
        if not node.name:  # the converter's block list works on node names
            node.name = f"{node.op_type}_{i}"


def to_fp16(model: onnx.ModelProto, keep_fp32: set[str] | frozenset[str] = frozenset()) -> onnx.ModelProto:
    """``model`` with float16 weights and activations, inputs and outputs as they were; the coordinate
    embedding (if any) and the nodes named in ``keep_fp32`` compute in float32. Works on graphs over
    protobuf's 2 GB: shape inference runs on a copy without the weights' bytes."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    _name_nodes(model.graph)
    blocked = sorted(coordinate_nodes(model.graph) | set(keep_fp32))
    typed = _infer_without_weights(model)
    # no annotations of initializers: the converter would retype them float16 and put a Cast (float32 to
    # float32) before every blocked node that reads one
    weights = {t.name for t in model.graph.initializer}
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in typed.graph.value_info if v.name not in weights)
    converted = convert_float_to_float16(
        model, keep_io_types=True, node_block_list=blocked, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
        disable_shape_infer=True,
    )
    _drop_round_trips(converted.graph, set(blocked))
    _sort_topologically(converted.graph)
    # The converter typed the blocked nodes' outputs, and the float32 initializers only they read,
    # float16. Stale types would mislead every reader of the annotations (TensorRT's parser among them).
    stale = {o for n in converted.graph.node if n.name in set(blocked) for o in n.output}
    stale |= {t.name for t in converted.graph.initializer}
    kept = [v for v in converted.graph.value_info if v.name not in stale]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(kept)
    _infer_without_weights(converted, check_type=True)  # raises if any annotation disagrees
    return converted


def _infer_without_weights(model: onnx.ModelProto, check_type: bool = False) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` of ``model`` with the bytes of its large initializers set
    aside for the call (types and shapes are all it reads of them; a ViT-g's weights would pass the 2 GB
    that protobuf can serialise). Small ones, such as Reshape's shape constants, are read for their values."""
    large = [t for t in model.graph.initializer if len(t.raw_data) > 1024]
    kept = [t.raw_data for t in large]
    for t in large:
        t.ClearField("raw_data")
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=check_type)
    finally:
        for t, data in zip(large, kept):
            t.raw_data = data


def _drop_round_trips(graph: onnx.GraphProto, blocked: set[str]) -> None:
    """The converter types every intermediate tensor float16, so between two float32 nodes it inserts
    Cast(to float16) -> Cast(to float32), which rounds the value anyway. Consumers of such a pair
    read the float32 original instead; casts left without consumers are removed."""
    producer = {out: node for node in graph.node for out in node.output}
    to = {n.name: next((a.i for a in n.attribute if a.name == "to"), None) for n in graph.node if n.op_type == "Cast"}
    replace = {}
    for node in graph.node:
        if node.op_type != "Cast" or to[node.name] != onnx.TensorProto.FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is None or first.op_type != "Cast" or to[first.name] != onnx.TensorProto.FLOAT16:
            continue
        origin = producer.get(first.input[0])
        if origin is not None and origin.name in blocked:
            replace[node.output[0]] = first.input[0]
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "Cast" and node.output[0] in replace and node.output[0] in outputs:
            # a graph output read from a float32 node: the last Cast becomes an Identity of the original
            node.op_type, node.input[0] = "Identity", replace[node.output[0]]
            del node.attribute[:]
            continue
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    while True:  # remove casts whose outputs nobody reads any more
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """The converter appends its Cast nodes at the end; ONNX requires producers before consumers."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ValueError(f"graph has a cycle or a dangling input at {[n.name for n in pending[:5]]}")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)
