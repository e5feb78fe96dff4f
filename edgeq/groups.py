"""Quantizer groups of an ONNX graph: the units the accuracy bar and the speed search move to fp32.

onnxruntime's `quantize_static` puts a QuantizeLinear/DequantizeLinear pair on every tensor that a
node of a quantizable op type reads or writes (Conv, Gemm, MatMul, but also Add, Mul, Sigmoid,
GlobalAveragePool, Concat, ...). Keeping a Conv in fp32 (`nodes_to_exclude`) leaves every other op
in int8: a squeeze-excitation block's gate, a SiLU's Sigmoid * Mul, a residual Add. A group is the
set of nodes that must change together for a tensor to leave int8:

- `silu`: Mul(x, Sigmoid(x)), and `hardswish`: Mul(x, HardSigmoid(x)) (what exporters write for them);
- `gate`: a squeeze-excitation gate, Mul(x, Sigmoid|HardSigmoid(f(GlobalAveragePool|ReduceMean(x))))
  with everything on the squeeze path (its convolutions and activations);
- `compute`: each Conv, ConvTranspose, Gemm or MatMul;
- one group per other node of a type whose int8 form changes values (Add, Mul, Sigmoid, pooling by
  averaging, Concat, Softmax, Resize, normalizations).

Nodes that only move or select quantized values (Reshape, Flatten, Transpose, Squeeze, Unsqueeze,
Gather, Slice, Split, Pad, MaxPool, Relu, Clip) follow their neighbours and are no group. Groups are
found by the graph's structure alone, never by names; a group's name is its kind and the name of the
node that ends it, so a plan can record it and a replay find it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# quantizable op types whose int8 form only moves, selects or clips values: no group of their own
FOLLOW_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Gather", "GatherElements", "Slice",
              "Split", "Pad", "MaxPool", "Relu", "Clip", "ArgMax", "TopK", "Where", "CumSum")
GATES = ("Sigmoid", "HardSigmoid")
SQUEEZE = ("GlobalAveragePool", "ReduceMean")
# what may lie on a squeeze path between the pooling and the gate
SQUEEZE_PATH = ("Conv", "Gemm", "MatMul", "Relu", "Clip", "Sigmoid", "HardSigmoid", "Mul", "HardSwish", "Add",
                "Flatten", "Reshape", "Squeeze", "Unsqueeze", "LeakyRelu")


@dataclass(frozen=True)
class Group:
    """Nodes that leave int8 together. `kind`: compute | silu | hardswish | gate | the op type of a
    lone node (Add, Mul, Concat, ...), also the key of op-type fallback."""

    name: str
    kind: str
    nodes: tuple[str, ...]

    def describe(self) -> dict:
        return {"group": self.name, "kind": self.kind, "nodes": list(self.nodes)}


def quantizable_types() -> set[str]:
    """The op types onnxruntime's QDQ quantizer has a rule for (its registries)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)


def find(model_or_path) -> list[Group]:
    """The quantizer groups of an fp32 ONNX model (a path or a ModelProto), in graph order."""
    import onnx

    model = onnx.load(str(model_or_path), load_external_data=False) if isinstance(model_or_path, (str, Path)) \
        else model_or_path
    graph = model.graph
    nodes = [n for n in graph.node if n.op_type != "Identity"]
    producer = {o: n for n in nodes for o in n.output}
    quantizable = quantizable_types()
    taken: dict[str, str] = {}  # node name -> the group that holds it
    found: list[tuple[int, Group]] = []
    order = {n.name: i for i, n in enumerate(nodes)}

    def add(kind: str, members: list, anchor) -> None:
        names = tuple(sorted((m.name for m in members), key=order.__getitem__))
        group = Group(f"{kind}:{anchor.name}", kind, names)
        for name in names:
            taken[name] = group.name
        found.append((order[anchor.name], group))

    for node in nodes:  # gates first: they hold SiLUs and convolutions of their squeeze path
        if node.op_type == "Mul" and node.name not in taken:
            path = _gate(node, producer)
            if path is not None:
                add("gate", path, node)
    for node in nodes:
        if node.op_type == "Mul" and node.name not in taken:
            act = _self_gated(node, producer)
            if act is not None and act.name not in taken:
                add("silu" if act.op_type == "Sigmoid" else "hardswish", [act, node], node)
    for node in nodes:
        if node.name in taken or node.op_type not in quantizable or node.op_type in FOLLOW_OPS:
            continue
        add("compute" if node.op_type in COMPUTE_OPS else node.op_type, [node], node)
    return [g for _, g in sorted(found, key=lambda item: item[0])]


def _inputs(node, producer: dict) -> list:
    return [producer[i] for i in node.input if i in producer]


def _self_gated(mul, producer: dict):
    """The Sigmoid/HardSigmoid of Mul(x, act(x)), or None."""
    if len(mul.input) != 2:
        return None
    for i, j in ((0, 1), (1, 0)):
        act = producer.get(mul.input[j])
        if act is not None and act.op_type in GATES and act.input[0] == mul.input[i]:
            return act
    return None


def _gate(mul, producer: dict, limit: int = 32) -> list | None:
    """The squeeze path of Mul(x, gate(...GlobalAveragePool(x)...)) from the pooling to the Mul, or None."""
    if len(mul.input) != 2:
        return None
    for i, j in ((0, 1), (1, 0)):
        gate = producer.get(mul.input[j])
        if gate is None or gate.op_type not in GATES or gate.input[0] == mul.input[i]:
            continue
        path, stack, seen = [], [gate], set()
        pooled = False
        while stack and len(path) <= limit:
            node = stack.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            path.append(node)
            if node.op_type in SQUEEZE:
                if node.input[0] != mul.input[i]:
                    break  # pools something else: not this tensor's gate
                pooled = True
                continue
            if node.op_type not in SQUEEZE_PATH:
                break
            stack.extend(_inputs(node, producer))
        else:
            if pooled:
                return path + [mul]
    return None


def nodes_of(groups: list[Group], names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The node names of the named groups, in the order given (a plan's fp32 groups -> nodes_to_exclude)."""
    by = {g.name: g for g in groups}
    return tuple(n for name in names for n in by[name].nodes)


def kinds(groups: list[Group]) -> list[str]:
    """The kinds present, in graph order of their first group: the candidates of op-type fallback."""
    return list(dict.fromkeys(g.kind for g in groups))
