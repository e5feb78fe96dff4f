"""The MNIST example's models, and how the core describes any model: by type, never by name."""

import pytest
import torch

from edgeq.lineage import count_macs, count_params, describe
from edgeq.errors import ConfigError
from edgeq.examples.mnist import CNN, MLP, build_model


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_models_map_digits_to_logits(arch):
    model = build_model(arch).eval()
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_unknown_example_model_is_one_line():
    with pytest.raises(ConfigError, match="unknown model 'vit'"):
        build_model("vit")


def test_mlp_is_the_classic_784_256_10():
    params, _ = count_params(MLP())
    assert params == 784 * 256 + 256 + 256 * 10 + 10
    macs = count_macs(MLP(), torch.zeros(1, 1, 28, 28))
    assert 784 * 256 + 256 * 10 <= macs <= 1.01 * (784 * 256 + 256 * 10)  # + biases and the ReLU


def test_cnn_macs_are_counted_from_the_graph():
    expected_convs = 16 * 1 * 9 * 28 * 28 + 32 * 16 * 9 * 14 * 14
    expected_fcs = 32 * 7 * 7 * 128 + 128 * 10
    macs = count_macs(CNN(), torch.zeros(1, 1, 28, 28))
    assert expected_convs + expected_fcs <= macs <= 1.1 * (expected_convs + expected_fcs)  # + BN, pools, biases


def test_describe_finds_layers_by_type():
    d = describe(CNN(channels=(12, 24), hidden=64))
    assert d["class"].endswith("mnist.CNN")
    assert d["layers"] == {"Conv2d": 2, "Linear": 2} and d["widths"] == [12, 24, 64, 10]
