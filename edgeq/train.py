"""edgeq's own fine-tuning loop, and evaluation.

AdamW with a one-cycle schedule: it reaches a good optimum in a handful of epochs without a
hand-tuned decay schedule, which is what a short recovery fine-tune after pruning needs. Image
inputs [N, C, H, W] can be shifted at random by a few pixels (`Finetune.shift`). A user who
trains their own way passes a `finetune(model, train, epochs)` callable to `edgeq.compress`
instead; this loop is then never used.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeq.progress import progress_bar
from edgeq.recipe import Finetune
from edgeq.data import Arrays
from edgeq.errors import ExportError


class NothingToTrain(ExportError):
    """A fine-tune (pruning recovery, QAT) of a model without trainable parameters: that variant is skipped."""


def fit(
    model: nn.Module,
    data: Arrays,
    spec: Finetune,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
    on_epoch: Callable[[nn.Module, int], None] | None = None,
    copy_model: bool = True,
) -> nn.Module:
    """Train a copy of `model` (or the model itself with copy_model=False) and return it in eval mode."""
    model = copy.deepcopy(model) if copy_model else model
    if spec.epochs == 0:
        return model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NothingToTrain(f"{desc}: the model has no trainable parameters, so there is nothing to train; "
                             "skipped (the other variants are built)")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x_all = torch.from_numpy(np.array(data.x))  # a writable copy: the checked arrays are read-only
    y_all = torch.from_numpy(np.array(data.y))
    n = len(data)
    steps_per_epoch = (n + spec.batch_size - 1) // spec.batch_size
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    shift = spec.shift if x_all.dim() == 4 else 0
    bar = progress_bar(spec.epochs * steps_per_epoch, desc, progress)
    for epoch in range(spec.epochs):
        model.train()
        if on_epoch is not None:
            on_epoch(model, epoch)
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, spec.batch_size):
            idx = perm[i : i + spec.batch_size]
            xb = x_all[idx]
            if shift:
                dy, dx = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
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


def predict_logits(model: nn.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """Logits of an in-memory model on preprocessed input, in inference mode."""
    model.eval()
    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(np.array(x[i : i + batch]))).float().numpy()
                               for i in range(0, len(x), batch)])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())
