"""Add golden outputs to an export made without them: run every ONNX (and, with torch, TorchScript)
artifact on the first inputs of eval.npz, write golden/ with edgeq.golden.write, and store its entry
as manifest.json's "golden" key. For exports made before the exporter wrote golden outputs, and for
tests and measurements; it changes manifest.json, so a signed export must be re-signed.

    python tools/add_golden.py DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def outputs_of(directory: Path, manifest: dict, inputs: np.ndarray) -> dict[str, np.ndarray]:
    from edgeq.runtime import load_onnx

    out = {}
    for a in manifest["artifacts"]:
        if a["format"] == "onnx":
            runner = load_onnx(directory / a["file"], 1, (a.get("runtime") or {}).get("session_options"))
            out[a["name"]] = runner.run(inputs)
        elif a["format"] == "torchscript":
            try:
                import torch
            except ImportError:
                continue
            module = torch.jit.load(str(directory / a["file"]), map_location="cpu").eval()
            with torch.inference_mode():
                out[a["name"]] = module(torch.from_numpy(inputs)).float().numpy()
    return out


def add_golden(directory: str | Path) -> dict:
    from edgeq import golden

    directory = Path(directory)
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    with np.load(directory / manifest["dataset"]["eval"]["file"], allow_pickle=False) as data:
        inputs = golden.select(data["inputs"])
    entry = golden.write(directory, inputs, outputs_of(directory, manifest, inputs),
                         input_name=manifest["input"]["name"], output_name=manifest["output"]["name"])
    manifest["golden"] = entry
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return entry


if __name__ == "__main__":
    for d in sys.argv[1:]:
        e = add_golden(d)
        print(f"{d}: golden outputs of {', '.join(e['outputs'])}")
