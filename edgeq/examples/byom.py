"""A user's own model and data, as `edgeq export --model FILE.py:build --data FILE.py:load` and the
README's Python example take them. Any trained `torch.nn.Module` classifier and `(train, test)` of
the forms `edgeq.compress` accepts would do; this one is small and trains in seconds on the embedded
digits, so the example runs offline on any machine.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeq.examples.mnist import Preprocessing, load_data


def load():
    """(train, test): each (inputs float32 [N, 1, 28, 28], labels int64 [N]), preprocessed."""
    ds, pre = load_data(), Preprocessing()
    return (pre.apply(ds.train.images), ds.train.labels.copy()), (pre.apply(ds.test.images), ds.test.labels.copy())


def build() -> nn.Module:
    """A small CNN with a residual block, trained for six epochs (stands for your trained model)."""
    from edgeq.data import Arrays
    from edgeq.recipe import Finetune
    from edgeq.train import fit

    torch.manual_seed(0)
    model = SmallNet()
    (x, y), _ = load()
    return fit(model, Arrays(x, y), Finetune(epochs=6, lr=3e-3, shift=2), progress=False)


class SmallNet(nn.Module):
    """conv-bn-relu-pool, a residual block, a strided conv, then a linear classifier."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32))
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(self.down(torch.relu(x + self.block(x))))
