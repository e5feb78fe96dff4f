import pytest
import torch

from edgeq.errors import ConfigError
from edgeq.models import ModelConfig, build_model, count_macs, count_params, default_config


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_models_map_digits_to_logits(arch):
    model = build_model(default_config(arch)).eval()
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_config_round_trip(arch):
    cfg = default_config(arch)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_mlp_is_the_classic_784_256_10():
    params, _ = count_params(build_model(default_config("mlp")))
    assert params == 784 * 256 + 256 + 256 * 10 + 10
    assert count_macs(default_config("mlp")) == 784 * 256 + 256 * 10


def test_cnn_macs_counted_per_layer():
    cfg = ModelConfig("cnn", hidden=128, channels=(16, 32))
    expected = 16 * 1 * 9 * 28 * 28 + 32 * 16 * 9 * 14 * 14 + 32 * 7 * 7 * 128 + 128 * 10
    assert count_macs(cfg) == expected


@pytest.mark.parametrize("bad", [{"arch": "vit"}, {"arch": "cnn"}, {"arch": "mlp", "hidden": 0},
                                 {"arch": "mlp", "channels": (4,)}])
def test_bad_configs_are_rejected(bad):
    with pytest.raises(ConfigError):
        ModelConfig(**bad)
