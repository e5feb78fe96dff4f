"""Exporters: a model (or an ONNX file) in, a file out. Every ONNX file passes the full checker.

The TorchScript-based ONNX exporter (`dynamo=False`) is used on purpose: it exports the MLP in
~10 ms instead of ~4 s and gives the same graph (Flatten, Gemm, Relu). TorchScript and the
legacy exporter print deprecation warnings in torch 2.14; they are contained here.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import torch
from torch import nn

from edgeq.errors import ExportError, first_line
from edgeq.quantize import quiet
from edgeq.onnx_quant import check_onnx
from edgeq.runtime import INPUT_NAME, OUTPUT_NAME

OPSET = 17


def save_checkpoint(model: nn.Module, path: Path) -> Path:
    """The state dict alone (tensors only): loads with torch.load(weights_only=True) into the model's
    own class. It needs the model's code to run; verify proves it holds the same weights as the
    TorchScript file of the same variant."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"state_dict": state}, buffer)
    return write_file(path, buffer.getvalue())


def write_file(path: Path, data: bytes) -> Path:
    """Write serialized bytes with Python's file I/O: a full disk raises OSError(ENOSPC), which the
    caller turns into one line. torch's own C++ file writer aborts the process instead."""
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_torchscript(module: torch.jit.ScriptModule, path: Path) -> Path:
    """Save a TorchScript module through Python's file I/O (see write_file), reproducibly."""
    buffer = io.BytesIO()
    try:
        with quiet():
            torch.jit.save(module, buffer)
    except Exception as exc:  # e.g. a custom torch.autograd.Function: TorchScript cannot serialize Python code
        raise ExportError(f"{path.name}: TorchScript cannot save this model ({first_line(exc)}); the other formats "
                          "are built") from None
    return write_file(path, reproducible_archive(buffer.getvalue()))


DEBUG_SUFFIX = ".debug_pkl"
SERIALIZATION_ID = ".data/serialization_id"


def reproducible_archive(data: bytes) -> bytes:
    """A TorchScript archive whose bytes depend on the model only, not on where it was built.

    torch.jit.save writes, beside the code, `*.debug_pkl` records: source ranges with the absolute
    paths of the Python files the trace ran through (the virtual environment, the user's model
    file). They only enrich TorchScript's error messages; they are dropped. The archive's
    `serialization_id` is derived from its records, so it is re-derived from the records kept.
    Records are stored uncompressed with a fixed timestamp, in torch's order.
    """
    import hashlib
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(data))
    keep = [i for i in src.infolist() if not i.filename.endswith(DEBUG_SUFFIX)]
    digest = hashlib.sha256()
    for info in keep:
        if not info.filename.endswith(SERIALIZATION_ID):
            digest.update(info.filename.encode() + b"\0" + src.read(info))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in keep:
            body = src.read(info)
            if info.filename.endswith(SERIALIZATION_ID):
                body = str(int(digest.hexdigest(), 16))[:40].zfill(40).encode()
            z.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), body)
    return out.getvalue()


def export_onnx(model: nn.Module, path: Path, example: torch.Tensor) -> Path:
    """fp32 ONNX with a dynamic batch axis, one self-contained file; the sample shape is the example's."""
    try:
        with quiet():
            torch.onnx.export(
                copy.deepcopy(model).eval(), (example,), str(path), dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    except Exception as exc:  # the exporter's own errors name the unsupported operator
        raise ExportError(f"{path.name}: the ONNX exporter (opset {OPSET}) cannot export this model "
                          f"({first_line(exc, 240)})") from None
    check_onnx(path)
    return path
