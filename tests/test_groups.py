"""Quantizer groups: what the accuracy bar moves to fp32 is a group of nodes, found by graph structure,
in every op type onnxruntime quantizes, not only the Conv/Gemm layers.

The hard case is real: a squeeze-excitation gate whose pre-sigmoid tensor holds one channel far
larger than the rest (its gate saturates at 1 in fp32 and changes nothing) stretches that tensor's
int8 range, so every other channel's gate is quantized to nonsense. Keeping every convolution in fp32
leaves the Sigmoid and the Mul int8 and cannot mend it; moving the gate group does.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgeq
from edgeq import groups, policy
from edgeq.data import Arrays, holdout
from edgeq.export import export_onnx
from edgeq.metrics import agreement
from edgeq.onnx_quant import QDQConfig, quantize_onnx
from edgeq.plan import BuildPlan
from edgeq.recipe import Finetune, Recipe
from edgeq.runtime import load_onnx
from edgeq.train import fit

from conftest import PINNED


class Gate(nn.Module):
    """Squeeze-excitation: x * sigmoid(fc2(silu(fc1(mean(x)))))."""

    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.pool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(self.pool(x)))))


class SENet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.se = Gate(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.silu(self.stem(x))
        x = self.se(nn.functional.silu(self.mid(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def digits() -> tuple[Arrays, Arrays]:
    from sklearn.datasets import load_digits

    d = load_digits()
    data = Arrays((d.images[:, None] / 16.0).astype(np.float32), d.target.astype(np.int64))
    return holdout(data, 0.25, 0)


@pytest.fixture(scope="module")
def outlier_gate(digits) -> nn.Module:
    """A trained SENet whose gate's pre-sigmoid tensor gets an outlier channel: its bias is raised so far
    that its gate is 1.0 in fp32 for every input (the model's answers barely move), while the tensor's
    range grows a thousandfold."""
    torch.manual_seed(0)
    model = fit(SENet(), digits[0], Finetune(epochs=30, lr=1e-2), progress=False)
    with torch.no_grad():
        model.se.fc2.bias[0] += 5000.0
    return model.eval()


def test_groups_are_found_by_structure(tmp_path: Path, outlier_gate) -> None:
    path = export_onnx(outlier_gate, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8))
    found = groups.find(path)
    kinds = [g.kind for g in found]
    assert kinds.count("gate") == 1 and kinds.count("silu") == 2 and kinds.count("compute") == 3  # stem, mid, head
    gate = next(g for g in found if g.kind == "gate")
    import onnx

    ops = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
    # the whole squeeze path: pooling, both 1x1 convs, the SiLU between them, the Sigmoid and the Mul
    assert sorted(ops[n] for n in gate.nodes) == sorted(["GlobalAveragePool", "Conv", "Conv", "Sigmoid", "Mul",
                                                          "Sigmoid", "Mul"])
    assert len({n for g in found for n in g.nodes}) == sum(len(g.nodes) for g in found)  # each node in one group
    assert groups.nodes_of(found, [gate.name]) == gate.nodes


def test_keeping_every_convolution_fp32_cannot_mend_an_int8_gate(tmp_path: Path, outlier_gate, digits) -> None:
    """The premise, measured: with all Conv/Gemm layers fp32 the file still disagrees with fp32; with the
    gate group fp32 (convs int8) it agrees."""
    path = export_onnx(outlier_gate, tmp_path / "m.onnx", torch.zeros(1, 1, 8, 8))
    x = np.ascontiguousarray(digits[1].x)
    calib = [np.ascontiguousarray(digits[0].x[:256])]
    ref = load_onnx(path).predict(x)
    found = groups.find(path)
    compute = groups.nodes_of(found, [g.name for g in found if g.kind == "compute"])
    gate = groups.nodes_of(found, [g.name for g in found if g.kind == "gate"])
    convs_fp32 = load_onnx(quantize_onnx(path, tmp_path / "a.onnx", calib, QDQConfig(exclude_nodes=compute))).predict(x)
    gate_fp32 = load_onnx(quantize_onnx(path, tmp_path / "b.onnx", calib, QDQConfig(exclude_nodes=gate))).predict(x)
    assert agreement(ref, convs_fp32) < policy.MIN_AGREEMENT
    assert agreement(ref, gate_fp32) >= policy.MIN_AGREEMENT


def test_the_bar_moves_the_gate_group_to_fp32_and_the_file_ships(tmp_path: Path, outlier_gate, digits) -> None:
    train, test = digits
    recipe = Recipe(**{**PINNED, "variants": ("static",), "calibration_sizes": (256,)})
    manifest = edgeq.compress({"se": outlier_gate}, train=(train.x, train.y), test=(test.x, test.y),
                              out=tmp_path / "art", recipe=recipe, progress=False, log=lambda s: None)
    art = manifest.artifact("se-static-onnx")  # shipped: the bar found a plan within the contract
    bar = art.quantization["accuracy_bar"]
    assert any(g.startswith("gate:") for g in bar["fp32_groups_for_accuracy"]), bar
    assert art.contract["agreement"]["value"] >= policy.MIN_AGREEMENT and art.contract["met"]
    assert not any(g.startswith("compute:") for g in bar["fp32_groups_for_accuracy"])  # convs stay int8
    gate_nodes = {n for n in bar["fp32_nodes_for_accuracy"]}
    assert gate_nodes == set(art.quantization["fp32_nodes"]) - {d["node"] for d in art.decisions
                                                                 if d.get("group") is None and d["precision"] == "fp32"}
    plan = BuildPlan.read(tmp_path / "art" / "plan.json").models["se"].accuracy["se-static-onnx"]
    assert plan["steps"][0]["met"] is False and plan["steps"][-1]["met"] is True  # all-int8 failed, then mended
    assert plan["ranking"]["kinds"] and "gate" in plan["ranking"]["kinds"]
    assert edgeq.verify(tmp_path / "art", rounds=1, window_s=0.002, batch=8, progress=False).passed


def test_ranking_trials_the_budget_left_out_are_recorded_once_each_way() -> None:
    """A group is ranked both ways (alone in fp32, alone in int8): a budget that leaves both out records two
    entries that say which, not the same line twice."""
    from edgeq.groups import Group
    from edgeq.sensitivity import meet_bar_groups

    rng = np.random.default_rng(0)
    ref, labels = rng.normal(size=(40, 3)), rng.integers(0, 3, 40)
    logits = ref + rng.normal(scale=2.0, size=ref.shape)  # int8 far from fp32: the bar is missed
    found = [Group("compute:a", "compute", ("a",)), Group("compute:b", "compute", ("b",))]

    def run(nodes, rows):
        from edgeq.metrics import score

        out = logits if rows is None else logits[rows]
        return score(out, labels if rows is None else labels[rows], ref if rows is None else ref[rows]), out

    bar = meet_bar_groups(run, (), found, lambda s: (False, 5.0), 0.5, ref, labels, 1e9, 20,
                          run_many=lambda requests, left: [None] * len(requests))
    assert sorted(bar["not_tried"]) == ["ranking alone in int8 compute:a", "ranking alone in int8 compute:b",
                                        "ranking in fp32 compute:a", "ranking in fp32 compute:b"]
