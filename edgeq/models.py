"""Model families and the config that rebuilds them from a checkpoint.

Every model takes normalized digits as [N, 1, 28, 28] float32 and returns [N, classes] logits.
QuantStub/DeQuantStub are part of the model (identities in fp32) so eager-mode int8 needs no
wrapper, and `fuse_groups` names the module runs that int8 fuses.

The CNN block is conv -> bn -> maxpool -> relu. relu(maxpool(y)) == maxpool(relu(y)) exactly, so
int8 fusion of (conv, bn, relu) is still the same function, while onnxruntime sees the pooling
before the activation, where a QuantizeLinear placed after it keeps the pooling in fp32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from edgeq.errors import ConfigError

ARCHS = ("mlp", "cnn")
IMAGE = (1, 28, 28)


@dataclass(frozen=True)
class ModelConfig:
    """Enough to rebuild the architecture: a checkpoint stores this next to its state dict."""

    arch: str
    hidden: int = 256
    channels: tuple[int, ...] = ()
    batchnorm: bool = True
    num_classes: int = 10

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown model {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.hidden < 1 or any(c < 1 for c in self.channels):
            raise ConfigError(f"model {self.arch}: layer widths must be positive, got {self}")
        if self.arch == "cnn" and not self.channels:
            raise ConfigError("model cnn needs at least one conv block (channels)")
        if self.arch == "mlp" and self.channels:
            raise ConfigError("model mlp has no conv channels")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{**d, "channels": tuple(d.get("channels", ()))})

    def with_widths(self, hidden: int, channels: tuple[int, ...]) -> "ModelConfig":
        return replace(self, hidden=hidden, channels=tuple(channels))


def default_config(arch: str) -> ModelConfig:
    match arch:
        case "mlp":
            return ModelConfig("mlp", hidden=256)
        case "cnn":
            return ModelConfig("cnn", hidden=128, channels=(16, 32))
        case _:
            raise ConfigError(f"unknown model {arch!r}: choose one of {', '.join(ARCHS)}")


class MLP(nn.Module):
    """784 -> hidden -> classes, ReLU: the classic MNIST MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(IMAGE[1] * IMAGE[2], cfg.hidden)
        self.fc_act = nn.ReLU()
        self.fc2 = nn.Linear(cfg.hidden, cfg.num_classes)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.quant(x))
        return self.dequant(self.fc2(self.fc_act(self.fc1(x))))

    def fuse_groups(self) -> list[list[str]]:
        return [["fc1", "fc_act"]]


class ConvBlock(nn.Module):
    """conv3x3 -> bn -> maxpool2 -> relu."""

    def __init__(self, cin: int, cout: int, batchnorm: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm)
        self.bn = nn.BatchNorm2d(cout) if batchnorm else nn.Identity()
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pool(self.bn(self.conv(x))))


class CNN(nn.Module):
    """One ConvBlock per entry of channels, then flatten -> hidden -> classes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        cin, side, blocks = IMAGE[0], IMAGE[1], []
        for cout in cfg.channels:
            blocks.append(ConvBlock(cin, cout, cfg.batchnorm))
            cin, side = cout, side // 2
        self.features = nn.Sequential(*blocks)
        self.batchnorm = cfg.batchnorm
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(cin * side * side, cfg.hidden)
        self.fc_act = nn.ReLU()
        self.fc2 = nn.Linear(cfg.hidden, cfg.num_classes)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.quant(x))
        x = self.fc_act(self.fc1(self.flatten(x)))
        return self.dequant(self.fc2(x))

    def fuse_groups(self) -> list[list[str]]:
        parts = ("conv", "bn", "act") if self.batchnorm else ("conv", "act")
        convs = [[f"features.{i}.{p}" for p in parts] for i in range(len(self.features))]
        return convs + [["fc1", "fc_act"]]


def build_model(cfg: ModelConfig) -> nn.Module:
    match cfg.arch:
        case "mlp":
            return MLP(cfg)
        case "cnn":
            return CNN(cfg)
    raise ConfigError(f"unknown model {cfg.arch!r}")  # unreachable: validated in ModelConfig


def widths(model: nn.Module) -> tuple[int, tuple[int, ...]]:
    """(hidden, channels) read off a float model, e.g. after physical pruning."""
    channels = tuple(block.conv.out_channels for block in getattr(model, "features", ()))
    return model.fc1.out_features, channels


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a float model's weights and biases."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return total, nonzero


def count_macs(cfg: ModelConfig) -> int:
    """Multiply-accumulates for one image, from the architecture alone."""
    macs, cin, side = 0, IMAGE[0], IMAGE[1]
    for cout in cfg.channels:
        macs += cout * cin * 9 * side * side
        cin, side = cout, side // 2
    features = cin * side * side if cfg.channels else IMAGE[1] * IMAGE[2]
    return macs + features * cfg.hidden + cfg.hidden * cfg.num_classes
