"""Pruning on small models trained on the embedded digits, and int8 after pruning (FX quantization itself:
test_quantize.py)."""

import copy

import numpy as np
import pytest
import torch

from edgeq.data import Preprocessing, load_data
from edgeq.models import build_model, count_macs, count_params, default_config
from edgeq.prune import PruneConfig, prune_model, remove_channels, weight_sparsity
from edgeq.quantize import QuantConfig, quantize
from edgeq.train import TrainConfig, accuracy, predict_logits, train

PRE = Preprocessing()


@pytest.fixture(scope="module")
def ds():
    return load_data()


@pytest.fixture(scope="module")
def test_x(ds):
    return PRE.apply(ds.test.images)


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def trained(request, ds):
    torch.manual_seed(0)
    cfg = default_config(request.param)
    epochs = 3 if request.param == "mlp" else 2
    model = train(build_model(cfg), ds.train, PRE, TrainConfig(epochs=epochs, lr=3e-3), progress=False)
    return cfg, model


def acc(model, x, ds):
    return accuracy(predict_logits(model, x), ds.test.labels)


def test_training_learns(trained, test_x, ds):
    cfg, model = trained
    assert acc(model, test_x, ds) > (0.90 if cfg.arch == "mlp" else 0.93)


@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured"])
def test_unstructured_pruning_is_permanent_and_sparse(trained, method):
    cfg, model = trained
    before = copy.deepcopy(model.state_dict())
    r = prune_model(model, cfg, PruneConfig(method, 0.8))
    assert r.sparsity == pytest.approx(0.8, abs=0.01)
    assert weight_sparsity(r.model) == r.sparsity
    for m in r.model.modules():  # no re-parametrisation left behind
        assert not hasattr(m, "weight_mask") and not hasattr(m, "weight_orig")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model was mutated"


def test_pruned_then_quantized_regression(trained, test_x, ds):
    """The seed notebook crashed here: 'Linear' object has no attribute 'weight_mask'."""
    cfg, model = trained
    pruned = prune_model(model, cfg, PruneConfig("l1_unstructured", 0.5)).model
    q = quantize(pruned, QuantConfig("dynamic"), torch.from_numpy(test_x[:8]))
    assert abs(acc(q, test_x, ds) - acc(pruned, test_x, ds)) <= 0.01


def test_l1_pruning_keeps_accuracy_better_than_random(trained, test_x, ds):
    cfg, model = trained
    l1 = prune_model(model, cfg, PruneConfig("l1_unstructured", 0.8)).model
    rnd = prune_model(model, cfg, PruneConfig("random_unstructured", 0.8)).model
    assert acc(l1, test_x, ds) > acc(rnd, test_x, ds)


def test_structured_pruning_removes_channels_and_macs(trained, test_x):
    cfg, model = trained
    r = prune_model(model, cfg, PruneConfig("l2_structured", 0.5))
    assert r.config.hidden == cfg.hidden // 2
    assert r.config.channels == tuple(c // 2 for c in cfg.channels)
    assert count_params(r.model)[0] < 0.6 * count_params(model)[0]
    assert count_macs(r.config) < 0.6 * count_macs(cfg)
    assert r.model(torch.from_numpy(test_x[:4])).shape == (4, 10)
    rebuilt = build_model(r.config)
    rebuilt.load_state_dict(r.model.state_dict())  # the narrower config describes the pruned model exactly


def test_removing_zero_channels_keeps_outputs_identical(trained, test_x):
    """Channels whose output is exactly zero can be removed without changing a single logit."""
    cfg, model = trained
    model = copy.deepcopy(model)
    plan = {}
    with torch.no_grad():
        rows = [0, 3, 5]
        model.fc1.weight[rows] = 0
        model.fc1.bias[rows] = 0
        plan["fc1"] = rows
        if cfg.arch == "cnn":
            block = model.features[1]
            block.conv.weight[rows] = 0
            block.bn.weight[rows] = 0  # gamma = beta = 0: the channel is exactly 0 after bn and relu
            block.bn.bias[rows] = 0
            plan["features.1.conv"] = rows
    x = torch.from_numpy(test_x[:64])
    pruned = remove_channels(model, plan)
    with torch.no_grad():
        np.testing.assert_allclose(pruned(x).numpy(), model(x).numpy(), rtol=0, atol=1e-5)
    assert pruned.fc1.out_features == cfg.hidden - 3


def test_bad_configs():
    with pytest.raises(ValueError):
        PruneConfig("l1_unstructured", 1.5)
    with pytest.raises(ValueError):
        QuantConfig("int4")
