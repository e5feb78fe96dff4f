"""Training and evaluation.

AdamW with a one-cycle schedule: on a few thousand digits it reaches a good optimum in a handful
of epochs without tuning a decay schedule by hand; light weight decay and random shifts of up to
two pixels keep the small models from memorising the 4,000 training digits.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeq.data import Preprocessing, Split
from edgeq.errors import ConfigError
from edgeq.progress import progress_bar


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15
    lr: float = 2e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    max_shift: int = 2  # random translation (pixels) as augmentation; 0 turns it off
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.max_shift < 0:
            raise ConfigError(f"invalid training config {self}: epochs, batch size and lr must be positive")


def default_train_config(arch: str, seed: int = 0) -> TrainConfig:
    match arch:
        case "cnn":
            return TrainConfig(epochs=8, lr=3e-3, seed=seed)
        case _:
            return TrainConfig(epochs=15, lr=2e-3, seed=seed)


def finetune_config(base: TrainConfig, epochs: int, lr_scale: float) -> TrainConfig:
    return TrainConfig(epochs, base.lr * lr_scale, base.batch_size, base.weight_decay, base.max_shift, base.seed + 1)


def train(
    model: nn.Module,
    split: Split,
    pre: Preprocessing,
    cfg: TrainConfig,
    desc: str = "train",
    progress: bool = True,
    on_epoch: Callable[[nn.Module, int], None] | None = None,
    copy_model: bool = True,
) -> nn.Module:
    """Train a copy of `model` (or the model itself with copy_model=False) and return it in eval mode."""
    model = copy.deepcopy(model) if copy_model else model
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x_all = torch.from_numpy(pre.apply(split.images))
    y_all = torch.tensor(split.labels)  # a copy: the cached split is read-only
    steps_per_epoch = (len(split) + cfg.batch_size - 1) // cfg.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = progress_bar(cfg.epochs * steps_per_epoch, desc, progress)
    for epoch in range(cfg.epochs):
        model.train()
        if on_epoch is not None:
            on_epoch(model, epoch)
        perm = torch.randperm(len(split), generator=gen)
        for i in range(0, len(split), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb = x_all[idx]
            if cfg.max_shift:
                dy, dx = (int(v) for v in rng.integers(-cfg.max_shift, cfg.max_shift + 1, size=2))
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def predict_logits(model: nn.Module, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Logits of an in-memory model on preprocessed input, in inference mode."""
    model.eval()
    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(x[i : i + batch])).float().numpy() for i in range(0, len(x), batch)])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())
