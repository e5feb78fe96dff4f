"""A model int8 breaks: an MLP on the 1,797 embedded 8x8 digits (scikit-learn) with an injected hard layer.

One hidden unit of fc1 is scaled by `scale` and fc2 divides its input from that unit by the same
factor: the fp32 function is unchanged, but the outlier unit sets fc1's output range, which int8
activations must cover. It stands for the layers users meet in real models (an outlier channel, a
squeeze-excite gate, a first or last layer) and shows what `max_accuracy_drop` does about them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SCALE = 30_000.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(self.flat(x))))))


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
    with torch.no_grad():
        model.fc1.weight[0] *= scale
        model.fc1.bias[0] *= scale
        model.fc2.weight[:, 0] /= scale
    return model.eval()
