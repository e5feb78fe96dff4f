"""int8 quantization in PyTorch: one verb, `quantize`, with the mode in its config.

This module is the only place that touches `torch.ao.quantization` (eager mode, x86 engine), so a
later move to torchao touches nothing else. Its deprecation warnings are silenced here: users
cannot act on them.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgeq.errors import ConfigError
from edgeq.models import ModelConfig, build_model

MODES = ("dynamic", "static", "qat")
ENGINES = ("x86", "fbgemm", "qnnpack")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao / TorchScript deprecation chatter for the duration of a call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass(frozen=True)
class QuantConfig:
    mode: str
    engine: str = "x86"
    calibration_samples: int = 512  # static: training digits run through the observers

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown quantization mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown quantized engine {self.engine!r}: choose one of {', '.join(ENGINES)}")

    def describe(self) -> dict:
        """The manifest's `quantization` entry for a torch int8 artifact."""
        match self.mode:
            case "dynamic":
                return {
                    "method": "dynamic", "runtime": "torch", "engine": self.engine, "weights": "qint8",
                    "activations": "fp32, quantized per batch at run time", "calibration": None,
                    "per_channel": False, "reduce_range": True, "layers": "Linear",
                }
            case "static" | "qat":
                return {
                    "method": self.mode, "runtime": "torch", "engine": self.engine, "weights": "qint8",
                    "activations": "quint8",
                    "calibration": (
                        f"HistogramObserver on {self.calibration_samples} training digits"
                        if self.mode == "static" else "learned during quantization-aware fine-tuning"
                    ),
                    "per_channel": True, "reduce_range": True, "layers": "all (conv-bn-relu and linear-relu fused)",
                }
        raise AssertionError(self.mode)


def quantize(
    model: nn.Module,
    cfg: QuantConfig,
    calibration: list[np.ndarray] | None = None,
    finetune: Callable[..., nn.Module] | None = None,
) -> nn.Module:
    """Return an int8 copy of a float model; the input model is not changed.

    static needs `calibration` (preprocessed batches); qat needs `finetune(model, on_epoch=...)`,
    which trains the prepared model with fake quantization and returns it.
    """
    torch.backends.quantized.engine = "x86" if cfg.engine == "x86" else cfg.engine
    tq = torch.ao.quantization
    with quiet():
        match cfg.mode:
            case "dynamic":
                return tq.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)
            case "static":
                if not calibration:
                    raise ConfigError("static quantization needs calibration data")
                m = tq.fuse_modules(copy.deepcopy(model).eval(), model.fuse_groups())
                m.qconfig = tq.get_default_qconfig(cfg.engine)
                tq.prepare(m, inplace=True)
                with torch.inference_mode():
                    for batch in calibration:
                        m(torch.from_numpy(batch))
                return tq.convert(m)
            case "qat":
                if finetune is None:
                    raise ConfigError("quantization-aware training needs a fine-tuning function")
                m = tq.fuse_modules_qat(copy.deepcopy(model).train(), model.fuse_groups())
                m.qconfig = tq.get_default_qat_qconfig(cfg.engine)
                tq.prepare_qat(m, inplace=True)
                m = finetune(m, on_epoch=_qat_schedule)
                return tq.convert(m.eval())
    raise AssertionError(cfg.mode)


def _qat_schedule(model: nn.Module, epoch: int) -> None:
    """From the second epoch on, freeze batch-norm statistics; observers keep adapting."""
    if epoch >= 1:
        model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)


def dequantized_float(qmodel: nn.Module, cfg: ModelConfig) -> tuple[nn.Module, ModelConfig]:
    """A float model holding exactly the int8 weights of a converted static/QAT model.

    Batch norm is already folded into the int8 convolutions, so the float twin has none. Used to
    hand what QAT learned to the ONNX QDQ exporter.
    """
    fcfg = ModelConfig(cfg.arch, cfg.hidden, cfg.channels, batchnorm=False, num_classes=cfg.num_classes)
    fmodel = build_model(fcfg).eval()
    names = [f"features.{i}.conv" for i in range(len(cfg.channels))] + ["fc1", "fc2"]
    qmods, fmods = dict(qmodel.named_modules()), dict(fmodel.named_modules())
    with torch.no_grad(), quiet():
        for name in names:
            q, f = qmods[name], fmods[name]
            f.weight.copy_(q.weight().dequantize())
            if q.bias() is not None:
                f.bias.copy_(q.bias().detach())
    return fmodel, fcfg

