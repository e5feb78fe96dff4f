"""Pruning on small models trained on the embedded digits, and int8 after pruning (FX quantization
itself: test_quantize.py; pruning of arbitrary architectures without training: test_prune.py)."""

import copy

import pytest
import torch

from edgeq.lineage import count_macs, count_params
from edgeq.data import Arrays
from edgeq.examples.mnist import CNN, MLP, Preprocessing, load_data
from edgeq.prune import PruneConfig, prune_model, weight_layers, weight_sparsity
from edgeq.quantize import QuantConfig, quantize
from edgeq.recipe import Finetune
from edgeq.train import accuracy, fit, predict_logits

PRE = Preprocessing()


@pytest.fixture(scope="module")
def ds():
    return load_data()


@pytest.fixture(scope="module")
def test_x(ds):
    return PRE.apply(ds.test.images)


def train_split(ds):
    return Arrays(PRE.apply(ds.train.images), ds.train.labels)


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def trained(request, ds):
    torch.manual_seed(0)
    model = MLP() if request.param == "mlp" else CNN()
    epochs = 3 if request.param == "mlp" else 2
    return request.param, fit(model, train_split(ds), Finetune(epochs=epochs, lr=3e-3, shift=2), progress=False)


@pytest.fixture(scope="module")
def example(test_x):
    return torch.from_numpy(test_x[:8])


def count_weights(model):
    return sum(m.weight.numel() for _, m in weight_layers(model))


def acc(model, x, ds):
    return accuracy(predict_logits(model, x), ds.test.labels)


def test_training_learns(trained, test_x, ds):
    cfg, model = trained
    assert acc(model, test_x, ds) > (0.90 if cfg == "mlp" else 0.93)


@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured"])
def test_unstructured_pruning_is_permanent_and_sparse(trained, method, example, tmp_path):
    cfg, model = trained
    before = copy.deepcopy(model.state_dict())
    r = prune_model(model, example, PruneConfig(method, 0.8))
    torch.save(r.model.state_dict(), tmp_path / "pruned.pt")  # recounted from the saved weights
    saved = torch.load(tmp_path / "pruned.pt", weights_only=True)
    weights = [v for k, v in saved.items() if k.endswith("weight") and v.dim() > 1 and not k.startswith("fc2.")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=1e-3)  # global: 80 % of every weight but the output layer's
    assert int((saved["fc2.weight"] == 0).sum()) == 0  # the output layer is never pruned
    for m in r.model.modules():  # no re-parametrisation left behind
        assert not hasattr(m, "weight_mask") and not hasattr(m, "weight_orig")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model was mutated"


def test_pruned_then_quantized_regression(trained, test_x, ds, example):
    """The seed notebook crashed here: 'Linear' object has no attribute 'weight_mask'."""
    cfg, model = trained
    pruned = prune_model(model, example, PruneConfig("l1_unstructured", 0.5)).model
    q = quantize(pruned, QuantConfig("dynamic"), example)
    assert abs(acc(q, test_x, ds) - acc(pruned, test_x, ds)) <= 0.01


def test_l1_pruning_keeps_accuracy_better_than_random(trained, test_x, ds, example):
    cfg, model = trained
    l1 = prune_model(model, example, PruneConfig("l1_unstructured", 0.8)).model
    rnd = prune_model(model, example, PruneConfig("random_unstructured", 0.8)).model
    assert acc(l1, test_x, ds) > acc(rnd, test_x, ds)


def test_structured_pruning_removes_channels_and_macs(trained, test_x, example):
    cfg, model = trained
    r = prune_model(model, example, PruneConfig("l2_structured", 0.5))
    narrower = MLP(hidden=128) if cfg == "mlp" else CNN(channels=(8, 16), hidden=64)
    halves = {"fc1": 128} if cfg == "mlp" else {"features.0.conv": 8, "features.1.conv": 16, "fc1": 64}
    assert r.removed == halves
    assert count_params(r.model)[0] == r.params[1] < 0.6 * count_params(model)[0]
    assert r.macs[1] < 0.6 * r.macs[0] and r.macs[1] == pytest.approx(count_macs(narrower, example[:1]), rel=0.01)
    assert r.model(torch.from_numpy(test_x[:4])).shape == (4, 10)
    narrower.load_state_dict(r.model.state_dict())  # the same layers, only narrower


def test_structured_pruning_with_finetune_keeps_accuracy(trained, test_x, ds, example):
    """A short fine-tune brings channel pruning back near the dense model (the dependency handling is right)."""
    cfg, model = trained

    def finetune(m):
        return fit(m, train_split(ds), Finetune(epochs=1, lr=1e-3, shift=2), progress=False, copy_model=False)

    r = prune_model(model, example, PruneConfig("l2_structured", 0.5), finetune)
    assert acc(r.model, test_x, ds) >= acc(model, test_x, ds) - 0.03


def test_bad_configs():
    with pytest.raises(ValueError):
        PruneConfig("l1_unstructured", 1.5)
    with pytest.raises(ValueError):
        QuantConfig("int4")
