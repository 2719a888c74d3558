"""FP16 copies of an exported graph, for GPU providers and TensorRT.

Weights and activations become float16; the graph's inputs and outputs stay float32 (the model's
tensor interface is shared by all its engines), with casts at the edges. The coordinate embedding is
kept in float32: level-0 coordinates pass 65,504 (float16's largest value) on any real slide, and
float16 cannot resolve sin(x) for x in the hundreds, which is where patch-unit angles are. Every node
between the ``coords`` input and the Sin/Cos nodes is therefore left in float32.
"""

from __future__ import annotations

import onnx

__all__ = ["to_fp16", "coordinate_nodes"]


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


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    for i, node in enumerate(model.graph.node):
        if not node.name:  # the converter's block list works on node names
            node.name = f"{node.op_type}_{i}"
    blocked = sorted(coordinate_nodes(model.graph))
    converted = convert_float_to_float16(
        model, keep_io_types=True, node_block_list=blocked, op_block_list=list(DEFAULT_OP_BLOCK_LIST)
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
    onnx.shape_inference.infer_shapes(converted, check_type=True)  # raises if any annotation disagrees
    return converted


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
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    outputs = {o.name for o in graph.output}
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
