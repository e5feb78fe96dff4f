"""edgeq's own fine-tuning loop, and evaluation.

AdamW with a one-cycle schedule: it reaches a good optimum in a handful of epochs without a
hand-tuned decay schedule, which is what a short recovery fine-tune after pruning needs. Image
inputs [N, C, H, W] can be shifted at random by a few pixels (`Finetune.shift`). A user who
trains their own way passes a `finetune(model, train, epochs)` callable to `edgeq.compress`
instead; this loop is then never used.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

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
    with fast_layout(model, np.asarray(data.x[:2])):
        return _fit(model, data, spec, seed, desc, progress, on_epoch)


def _fit(model: nn.Module, data: Arrays, spec: Finetune, seed: int, desc: str, progress: bool,
         on_epoch: Callable[[nn.Module, int], None] | None) -> nn.Module:
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
    # a few samples (the per-sample check runs 32 of them one at a time) cost less than the layout's probe
    layout = fast_layout(model, x[:2]) if len(x) >= FAST_LAYOUT_FROM else contextlib.nullcontext()
    with layout, torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(np.array(x[i : i + batch]))).float().numpy()
                               for i in range(0, len(x), batch)])


FAST_LAYOUT_FROM = 64  # samples: predict_logits on fewer runs the model in the layout it has


def is_depthwise(m: nn.Module) -> bool:
    """A depthwise convolution: one filter per input channel (groups == in_channels > 1)."""
    return isinstance(m, (nn.Conv1d, nn.Conv2d)) and 1 < m.groups == m.in_channels


def has_depthwise(model: nn.Module) -> bool:
    """A 2-D depthwise convolution: what channels-last memory speeds up (`fast_layout`)."""
    return any(isinstance(m, nn.Conv2d) and is_depthwise(m) for m in model.modules())


@contextlib.contextmanager
def fast_layout(model: nn.Module, probe: np.ndarray) -> Iterator[None]:
    """A model with depthwise convolutions runs in channels-last memory within the block, and is put back in
    the usual layout after it (the same values: files and checkpoints are written from the usual layout).

    Eager PyTorch on CPU runs depthwise convolutions several times faster with channels-last weights (their
    activations follow): trained efficientnet_b0 at 3x32x32 on an Intel Xeon, 2 threads, 0.35 -> 0.15 s a
    training step of 64 and 1.3 -> 0.23 s for 800 validation samples (benchmarks/layout.py). The results are
    the same computation in another summation order (logits within 3e-4 of the usual layout's there). Models
    without one, dense convolutions or none (the MNIST examples, resnet18), are left as they are: resnet18
    measured no faster, and their results stay bit for bit what they were. So is a model whose forward cannot run in
    that layout (a `.view` of a feature map needs contiguous memory): it is tried on `probe` (a few inputs, in
    eval mode, without gradients) first, on copies of its parameters and buffers, so that nothing the model
    keeps (batch-norm statistics, a QAT observer's ranges) sees the try."""
    if not has_depthwise(model) or np.ndim(probe) != 4 or not _runs_channels_last(model, probe):
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def _runs_channels_last(model: nn.Module, probe: np.ndarray) -> bool:
    from torch.func import functional_call

    def copied(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone(memory_format=torch.channels_last if t.dim() == 4 else torch.preserve_format)

    tensors = {**{k: copied(v) for k, v in model.named_parameters()}, **{k: copied(v) for k, v in model.named_buffers()}}
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            functional_call(model.eval(), tensors, (torch.from_numpy(np.array(probe)),))
    except RuntimeError:
        return False
    finally:
        for m, training in modes.items():
            m.training = training
    return True


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())
