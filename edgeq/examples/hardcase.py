"""A model int8 breaks: an MLP (64-512-512-512-10) on the 1,797 embedded 8x8 digits (scikit-learn)
with an injected hard layer.

One hidden unit of fc1 is scaled by `scale` and fc2 divides its input from that unit by the same
factor: the fp32 function is unchanged, but the outlier unit sets fc1's output range, which int8
activations must cover (`inject` does the same to any layer pair). It stands for the layers users meet in real models (an outlier channel, a
squeeze-excite gate, a first or last layer) and shows what `max_accuracy_drop` does about them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SCALE = 30_000.0


WIDTH = 512


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.fc1, self.fc2 = nn.Linear(64, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.fc3, self.fc4 = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc2(torch.relu(self.fc1(self.flat(x)))))
        return self.fc4(torch.relu(self.fc3(x)))


def load() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, test): 1,300 / 497 digits, inputs [N, 1, 8, 8] in [0, 1], a fixed permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.images.astype(np.float32)[:, None] / 16.0, d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    return (x[idx[:1300]], y[idx[:1300]]), (x[idx[1300:]], y[idx[1300:]])


def build(scale: float = SCALE) -> nn.Module:
    """The trained MLP (20 epochs, seed 0), with the hard layer injected."""
    from edgeq.data import Arrays
    from edgeq.recipe import Finetune
    from edgeq.train import fit

    (x, y), _ = load()
    torch.manual_seed(0)
    model = fit(Net(), Arrays(x, y), Finetune(epochs=20, lr=3e-3), seed=0, progress=False)
    inject(model.fc1, model.fc2, scale)
    return model.eval()


def inject(layer: nn.Linear, consumer: nn.Linear, scale: float = SCALE, unit: int = 0) -> None:
    """Scale `unit` of `layer` by `scale` and undo it in `consumer` (the ReLU between commutes with it).
    The unit must be live (not always zero after the ReLU) for the injection to matter."""
    with torch.no_grad():
        layer.weight[unit] *= scale
        layer.bias[unit] *= scale
        consumer.weight[:, unit] /= scale
