"""Pruning of models edgeq has never seen: edgeq's MLP/CNN and torchvision ResNet-18, MobileNetV2/V3.

The models are untrained (structure, not accuracy, is under test here) and see real digits,
[N, 1, 28, 28]. Accuracy after pruning a trained model is covered in test_prune_quantize.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
import torchvision.models as tvm
from torch import nn

from edgeq.examples.mnist import Preprocessing, build_model, load_data
from edgeq.errors import ConfigError, PruneError
from edgeq.prune import PruneConfig, output_layer, prune_model, weight_layers, weight_sparsity

CLASSES = 10


def _one_channel_stem(model: nn.Module, features: nn.Sequential) -> nn.Module:
    """torchvision MobileNets take RGB: swap the first conv for a 1-channel one of the same shape otherwise."""
    c = features[0][0]
    features[0][0] = nn.Conv2d(1, c.out_channels, c.kernel_size, c.stride, c.padding, bias=False)
    return model


def resnet18() -> nn.Module:
    m = tvm.resnet18(num_classes=CLASSES)
    m.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    return m


def mobilenet_v2() -> nn.Module:
    m = tvm.mobilenet_v2(num_classes=CLASSES)
    return _one_channel_stem(m, m.features)


def mobilenet_v3_small() -> nn.Module:
    m = tvm.mobilenet_v3_small(num_classes=CLASSES)
    return _one_channel_stem(m, m.features)


MODELS = {
    "mlp": lambda: build_model("mlp"),
    "cnn": lambda: build_model("cnn"),
    "resnet18": resnet18,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
}


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return torch.from_numpy(Preprocessing().apply(load_data().test.images[:8]))


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.from_numpy(Preprocessing().apply(load_data().train.images[:64]))


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Batch-norm statistics of these images, in place: an untrained torchvision MobileNet otherwise
    returns the same logits for every digit (the signal decays to ~1e-8), which would hide errors."""
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None  # a plain average over the batches seen: one batch here
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, calibration) -> nn.Module:
    torch.manual_seed(0)
    return calibrate_batchnorm(MODELS[request.param](), calibration)


def heads_by_width(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in weight_layers(model) if m.weight.shape[0] == CLASSES]


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


# ---------------------------------------------------------------- output_layer


def test_output_layer_is_the_head(model, digits):
    model.train()
    try:
        name, head = output_layer(model, digits)
        assert not any(m.training is False for m in model.modules()), "output_layer changed the input model's mode"
    finally:
        model.eval()
    assert heads_by_width(model) == [head]
    assert model.get_submodule(name) is head


class HeadFirst(nn.Module):
    """The head is declared first, an auxiliary Linear after it, and an unused 10-way classifier last."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, CLASSES)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Linear(8 * 14 * 14, 32)
        self.aux = nn.Linear(32, 32)
        self.spare_classifier = nn.Linear(32, CLASSES)  # never called

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)
        x = F.relu(self.body(x))
        x = x + torch.sigmoid(self.aux(x))
        return F.log_softmax(F.dropout(self.head(x), 0.1, self.training), dim=1)


class ConvHead(nn.Module):
    """Fully convolutional: a 1x1 conv gives the classes, global pooling and flatten follow it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        self.classifier = nn.Conv2d(16, CLASSES, 1)
        self.tail = nn.Linear(CLASSES, 4)  # declared last, never called

    def forward(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.classifier(self.features(x))), 1).flatten(1)


@pytest.mark.parametrize("cls, expected", [(HeadFirst, "head"), (ConvHead, "classifier")])
def test_output_layer_follows_the_graph_not_declaration_order(cls, expected, digits):
    m = cls().eval()
    assert output_layer(m, digits)[0] == expected
    r = prune_model(m, digits, PruneConfig("l2_structured", 0.5))
    assert r.model.get_submodule(expected).weight.shape[0] == CLASSES
    assert r.model(digits).shape == m(digits).shape


class BatchNormOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, CLASSES)
        self.bn = nn.BatchNorm1d(CLASSES)

    def forward(self, x):
        return self.bn(self.fc(x.flatten(1)))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(784, CLASSES)
        self.b = nn.Linear(784, CLASSES)

    def forward(self, x):
        return self.a(x.flatten(1)) + self.b(x.flatten(1))


@pytest.mark.parametrize("cls, words", [(BatchNormOut, ["bn", "BatchNorm1d"]), (TwoHeads, ["a, b"])])
def test_output_layer_one_line_error_when_there_is_no_single_head(cls, words, digits):
    with pytest.raises(PruneError) as exc:
        output_layer(cls().eval(), digits)
    assert all(w in one_line(exc) for w in words)


class Untraceable(nn.Module):
    """The conv's output leaves autograd through numpy: torch-pruning cannot see its consumers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3)
        self.fc = nn.Linear(16 * 26 * 26, CLASSES)

    def forward(self, x):
        x = torch.from_numpy(F.relu(self.conv(x)).detach().numpy())
        return self.fc(x.flatten(1))


def test_untraceable_model_is_one_line_error_naming_the_layer(digits):
    for call in (lambda m: output_layer(m, digits), lambda m: prune_model(m, digits, PruneConfig("l2_structured"))):
        with pytest.raises(PruneError) as exc:
            call(Untraceable().eval())
        assert "conv (Conv2d)" in one_line(exc)


def test_op_torch_pruning_cannot_map_is_one_line_error_naming_it(digits):
    """ShuffleNetV2's channel shuffle (view -> transpose -> view) defeats Torch-Pruning 1.6.1's index mapping."""
    m = tvm.shufflenet_v2_x0_5(num_classes=CLASSES).eval()
    with pytest.raises(PruneError) as exc:
        prune_model(m, digits.repeat(1, 3, 1, 1), PruneConfig("l2_structured"))
    assert "ViewBackward0 after stage" in one_line(exc)


@pytest.mark.parametrize("example", [None, torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(0, 1, 28, 28)])
def test_example_must_be_a_float_batch(example):
    m = build_model("mlp")
    for call in (lambda: output_layer(m, example), lambda: prune_model(m, example, PruneConfig())):
        with pytest.raises(PruneError) as exc:
            call()
        assert "float batch" in one_line(exc)


# ---------------------------------------------------------------- structured


def _depthwise(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels]


def test_structured_removes_channels_keeps_head_and_rounding(model, digits):
    before_state = copy.deepcopy(model.state_dict())
    head_name, _ = output_layer(model, digits)
    cfg = PruneConfig("l2_structured", 0.5, round_to=8)
    r = prune_model(model, digits, cfg)

    assert r.model(digits).shape == (len(digits), CLASSES)
    assert r.model.get_submodule(head_name).weight.shape[0] == CLASSES and head_name not in r.removed
    assert output_layer(r.model, digits)[0] == head_name
    widths = {n: m.weight.shape[0] for n, m in weight_layers(model)}
    after = {n: m.weight.shape[0] for n, m in weight_layers(r.model)}
    assert r.removed and r.removed == {n: widths[n] - after[n] for n in widths if after[n] < widths[n]}
    assert all(after[n] % cfg.round_to == 0 for n in r.removed)
    assert not r.model.training

    params0, params1 = r.params
    assert params0 == sum(p.numel() for p in model.parameters())
    assert params1 == sum(p.numel() for p in r.model.parameters())
    # a layer loses half its outputs and half its inputs: ~(1 - amount)^2 of the parameters stay,
    # up to (1 - amount) where a layer's input is the image
    assert (1 - cfg.amount) ** 2 * 0.8 < params1 / params0 < (1 - cfg.amount) * 1.1
    assert r.macs[1] < 0.6 * r.macs[0]

    dw = _depthwise(model)  # depthwise convs stay depthwise: groups follow the channels
    assert _depthwise(r.model) == dw
    assert all(r.model.get_submodule(n).out_channels < model.get_submodule(n).out_channels for n in dw)

    after_state = model.state_dict()
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state), "input model was mutated"


def _kill_channels(model: nn.Module, example: torch.Tensor, fraction: float) -> None:
    """Make `fraction` of the channels of every prunable group exactly zero, in every layer they touch.

    Torch-Pruning's group gives each coupled layer its slice: producer weights and bias, batch-norm
    scale and shift (so the channel is 0 after the norm whatever its statistics), consumer inputs.
    """
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=(example,))
    head = model.get_submodule(output_layer(model, example)[0])
    with torch.no_grad():
        for full in graph.get_all_groups(ignored_layers=[head]):
            root = full[0].dep
            channels = graph.get_out_channels(root.target.module)
            k = int(channels * fraction + 0.999)
            for dep, idxs in graph.get_pruning_group(root.target.module, root.handler, list(range(k))):
                layer = dep.target.module
                if not isinstance(layer, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                    continue
                if graph.is_out_channel_pruning_fn(dep.handler):
                    layer.weight[idxs] = 0
                    if layer.bias is not None:
                        layer.bias[idxs] = 0
                else:
                    layer.weight[:, idxs] = 0


def test_removing_dead_channels_leaves_outputs_unchanged(model, digits, calibration):
    """Pruning channels that are exactly zero must not change one logit: removal follows every coupling."""
    dead = copy.deepcopy(model)
    _kill_channels(dead, digits, 0.75)  # more than amount 0.5 removes, even after rounding up to 8
    calibrate_batchnorm(dead, calibration)  # dead channels stay 0 (scale and shift are 0); the others carry signal
    with torch.no_grad():
        expected = dead(digits)
    scale = float(expected.abs().max())
    assert float(expected.std(0).max()) > 0.1 * scale > 0, "logits that ignore the input prove nothing"
    r = prune_model(dead, digits, PruneConfig("l2_structured", 0.5))
    assert r.removed
    with torch.no_grad():
        torch.testing.assert_close(r.model(digits), expected, rtol=1e-4, atol=1e-5 * scale)


class Narrow(nn.Module):
    def __init__(self):
        super().__init__()
        self.c4 = nn.Conv2d(1, 4, 3, padding=1)
        self.c12 = nn.Conv2d(4, 12, 3, padding=1)
        self.c64 = nn.Conv2d(12, 64, 3, padding=1)
        self.fc = nn.Linear(64, CLASSES)

    def forward(self, x):
        x = F.relu(self.c64(F.relu(self.c12(F.relu(self.c4(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("round_to, expected", [(8, {"c4": 4, "c12": 8, "c64": 8}),
                                                (1, {"c4": 1, "c12": 2, "c64": 12})])
def test_round_to_never_empties_or_grows_a_layer(round_to, expected, digits):
    """A layer no wider than round_to stays; one that would round to 0 keeps round_to channels."""
    r = prune_model(Narrow().eval(), digits, PruneConfig("l2_structured", 0.8, round_to=round_to))
    assert {n: r.model.get_submodule(n).out_channels for n in expected} == expected
    assert r.model(digits).shape == (len(digits), CLASSES)


def test_high_amount_still_prunes_small_layers(digits):
    """At 0.8 Torch-Pruning alone leaves every layer under 40 channels untouched; edgeq keeps 8."""
    r = prune_model(build_model("cnn").eval(), digits, PruneConfig("l2_structured", 0.8))
    assert r.removed == {"features.0.conv": 8, "features.1.conv": 24, "fc1": 104}


def test_structured_finetune_gets_the_pruned_model(digits):
    seen = []

    def finetune(m: nn.Module) -> nn.Module:
        seen.append(m(digits).shape)
        return m

    r = prune_model(build_model("cnn").eval(), digits, PruneConfig("l2_structured", 0.5), finetune)
    assert seen == [(len(digits), CLASSES)] and r.model.fc1.out_features == 64


def test_structured_keeps_frozen_parameters_frozen(digits):
    m = build_model("cnn").eval()
    m.features.requires_grad_(False)
    r = prune_model(m, digits, PruneConfig("l2_structured", 0.5))
    assert {n for n, p in r.model.named_parameters() if not p.requires_grad} == {
        n for n, p in m.named_parameters() if not p.requires_grad}
    assert all(not p.requires_grad for p in m.features.parameters())


# ---------------------------------------------------------------- unstructured


@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured"])
def test_unstructured_is_permanent_and_global(model, method, digits, tmp_path):
    before = copy.deepcopy(model.state_dict())
    head_name, head = output_layer(model, digits)
    r = prune_model(model, digits, PruneConfig(method, 0.8))
    # recounted from the weights as saved and loaded back, outside the pruner: 80 % of every weight but the head's
    torch.save(r.model.state_dict(), tmp_path / "pruned.pt")
    saved = torch.load(tmp_path / "pruned.pt", weights_only=True)
    weights = [v for k, v in saved.items() if k.endswith("weight") and v.dim() > 1 and not k.startswith(head_name + ".")]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / sum(w.numel() for w in weights) == pytest.approx(0.8, abs=1e-3)
    assert torch.equal(r.model.get_submodule(head_name).weight, head.weight), "the output layer is not pruned"
    assert r.removed == {} and r.params is None
    for m in r.model.modules():  # no re-parametrisation left behind
        assert not hasattr(m, "weight_mask") and not hasattr(m, "weight_orig") and not m._forward_pre_hooks
    assert r.model(digits).shape == (len(digits), CLASSES)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model was mutated"


def test_unstructured_finetune_keeps_zeros_and_random_is_seeded(digits):
    ds = load_data()
    x, y = digits, torch.tensor(ds.test.labels[: len(digits)])
    m = build_model("cnn").eval()

    def finetune(model: nn.Module) -> nn.Module:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return model

    r = prune_model(m, digits, PruneConfig("random_unstructured", 0.6, seed=3), finetune)
    again = prune_model(m, digits, PruneConfig("random_unstructured", 0.6, seed=3))
    assert r.sparsity >= again.sparsity > 0.59
    zeros = {n: l.weight == 0 for n, l in weight_layers(again.model)}
    for n, layer in weight_layers(r.model):  # fine-tuned through the masks: the same weights are still 0
        assert torch.all(layer.weight[zeros[n]] == 0)


def test_unstructured_leaves_the_global_random_state_alone(digits):
    m = build_model("mlp")
    state = torch.random.get_rng_state()
    prune_model(m, digits, PruneConfig("random_unstructured", 0.5, seed=1))
    assert torch.equal(torch.random.get_rng_state(), state)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("kwargs", [
    {"amount": 1.5}, {"amount": 0.0}, {"amount": -0.2}, {"amount": "0.5"}, {"amount": True},
    {"method": "l2"}, {"round_to": 0}, {"round_to": 8.0}, {"seed": 1.5},
])
def test_bad_config_is_one_line_config_error(kwargs):
    with pytest.raises(ConfigError) as exc:
        PruneConfig(**kwargs)
    one_line(exc)


def test_allocation_takes_channels_from_the_least_costly_groups_first() -> None:
    from edgeq.prune import allocate

    groups = [{"group": "narrow", "channels": 16, "drop_points": 40.0},
              {"group": "wide", "channels": 64, "drop_points": 0.2},
              {"group": "mid", "channels": 32, "drop_points": 3.0}]
    ratios = allocate(groups, amount=0.5, cap=0.75)  # 56 of 112 channels: wide gives 48, mid the other 8
    assert ratios == {"wide": 0.75, "mid": 0.25, "narrow": 0.0}
    assert sum(ratios[g["group"]] * g["channels"] for g in groups) == 0.5 * 112
    assert allocate(groups, amount=0.5, cap=0.5) == {"wide": 0.5, "mid": 0.5, "narrow": 0.5}  # cap = amount: uniform


def test_sensitivity_allocation_prunes_by_the_ratios_it_is_given() -> None:
    model, example = build_model("cnn").eval(), torch.zeros(1, 1, 28, 28)
    ratios = (("features.0.conv", 0.0), ("features.1.conv", 0.5), ("fc1", 0.5))
    r = prune_model(model, example, PruneConfig("l2_structured", 0.5, ratios=ratios))
    assert "features.0.conv" not in r.removed and {"features.1.conv", "fc1"} <= set(r.removed), r.removed
    uniform = prune_model(model, example, PruneConfig("l2_structured", 0.5))
    assert "features.0.conv" in uniform.removed


def test_amounts_that_remove_the_same_channels_share_one_fine_tune(tmp_path):
    """Kept widths round down to multiples of 8, so on 16 and 32 channels the amounts 0.25, 0.125 and 0.062
    remove the same channels: the amount search fine-tunes that model once and records the others as the
    same channels, with the same drop. (A fine-tune that changes nothing and a bar of 0 points make every
    pruning that removes a channel miss the bar, so the search visits them all.)"""
    import json

    import numpy as np
    from sklearn.datasets import load_digits

    import edgeq
    from edgeq.data import Arrays, holdout
    from edgeq.recipe import Finetune, Recipe, Structured
    from edgeq.train import fit

    d = load_digits()
    data = Arrays((d.images[:, None] / 16.0).astype(np.float32), d.target.astype(np.int64))
    train, test = holdout(data, 0.2, 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    model = fit(model, train, Finetune(epochs=6, lr=1e-2), progress=False)
    tuned = []

    def finetune(m, data, epochs):
        tuned.append({n: p.shape[0] for n, p in m.named_parameters() if n.endswith("weight")})
        return m

    recipe = Recipe(variants=("structured",), structured=Structured(amount=0.25), pruning_steps=4,
                    max_pruning_drop=0.0, sensitivity=False, executorch=False, ship_rule="always", batches=(1, 8),
                    jobs=1)
    edgeq.compress({"m": model}, train=(train.x, train.y), test=(test.x, test.y), out=tmp_path / "art",
                   recipe=recipe, finetune=finetune, progress=False, log=lambda s: None)
    steps = json.loads((tmp_path / "art" / "plan.json").read_text())["models"]["m"]["pruning"]["structured"]["steps"]
    assert [s["amount"] for s in steps][:3] == [0.25, 0.125, 0.062]
    assert [s.get("same_channels_as") for s in steps[1:3]] == [0.25, 0.25]
    assert steps[1]["drop_points"] == steps[2]["drop_points"] == steps[0]["drop_points"] > 0
    assert len(tuned) == len([s for s in steps if "same_channels_as" not in s])  # one fine-tune per distinct model
    assert tuned[0]["0.weight"] == 8 and tuned[0]["2.weight"] == 24
