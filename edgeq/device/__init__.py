"""The device side of an export: check a copied bundle, and plan on the device, with numpy and
onnxruntime only (no torch, click, matplotlib or onnx).

    python -m edgeq.device check DIR [--public-key PEM] [--accuracy] [--threads N] [--json REPORT]
    python -m edgeq.device plan DIR --out plan.json

Install on a device: `pip install numpy onnxruntime` and copy the `edgeq` folder (or the wheel with
`--no-deps`); docs/device.md has the five commands. Nothing here is imported by `import edgeq`.
"""
