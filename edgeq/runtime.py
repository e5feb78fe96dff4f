"""Run an artifact from its file, in its own runtime. Shared by the exporter and the verifier.

Nothing here unpickles arbitrary objects: checkpoints load with `weights_only=True`, TorchScript
with `torch.jit.load`, ONNX with onnxruntime, ExecuTorch programs (`.pte`) with ExecuTorch's runtime
(its Python bindings, XNNPACK delegate linked in; edgeq.pte).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.errors import IntegrityError, first_line

FORMATS = ("checkpoint", "torchscript", "onnx", "pte")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# samples per call when a file runs a whole split (Runner.predict): the export measures every accuracy in
# calls of this size, and so must a verifier, since dynamic int8 quantizes each call's batch on its own
PREDICT_BATCH = 500


@dataclass
class Runner:
    """A loaded artifact: `run(x)` maps a preprocessed float32 batch to logits (numpy in, numpy out)."""

    name: str
    runtime: str  # "onnxruntime-cpu", "torch-cpu", "torch-cuda", "executorch-cpu"
    run: Callable[[np.ndarray], np.ndarray]
    info: dict = field(default_factory=dict)

    def predict(self, x: np.ndarray, batch: int = PREDICT_BATCH) -> np.ndarray:
        return np.concatenate([self.run(x[i : i + batch]) for i in range(0, len(x), batch)])


# The onnxruntime session settings a manifest may carry (an artifact's runtime.session_options), and the values
# each may take: what edgeq itself sets. A manifest is input: onnxruntime's other config entries include ones that
# write files where they name (session.collect_node_memory_stats_to_file), so no other entry reaches a session.
SESSION_CONFIG_ENTRIES = {"session.intra_op.allow_spinning": ("0", "1"), "session.inter_op.allow_spinning": ("0", "1"),
                          "session.x64quantprecision": ("0", "1")}
# An int8 ONNX file with signed int8 activations (S8S8, the arm64 format) runs on x86 through onnxruntime's U8S8
# kernels, whose 16-bit pair sums saturate on a CPU without VNNI (AVX2, AVX-512 without VNNI): there it gave
# other answers than ARM's kernels (0.13 of the logits' scale on the MNIST CNN). This setting makes onnxruntime
# use its exact U8U8 kernels on those CPUs only; elsewhere (VNNI, ARM) it changes nothing.
SIGNED_INT8_SESSION = {"config_entries": {"session.x64quantprecision": "1"}}
OPTIMIZATION_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
SESSION_OPTIONS = ("config_entries", "graph_optimization_level")


def int8_session(activations: str | None) -> dict:
    """The session options an int8 ONNX file of these activations is shipped and measured with."""
    return {k: dict(v) for k, v in SIGNED_INT8_SESSION.items()} if activations == "int8" else {}


def session_options_problem(options) -> str | None:
    """Why onnxruntime session settings (a manifest's runtime.session_options) are refused, or None: only the
    keys and values of SESSION_CONFIG_ENTRIES and OPTIMIZATION_LEVELS are taken."""
    if options is None:
        return None
    if not isinstance(options, dict):
        return "session_options is not an object"
    if unknown := sorted(set(options) - set(SESSION_OPTIONS), key=str):
        return f"session_options holds {unknown[0]!r}, which edgeq never sets"
    entries = options.get("config_entries") or {}
    if not isinstance(entries, dict):
        return "session_options.config_entries is not an object"
    for key, value in entries.items():
        if str(value) not in SESSION_CONFIG_ENTRIES.get(key, ()):
            return (f"session_options.config_entries sets {str(key)[:80]!r} to {str(value)[:80]!r}; only "
                    f"{', '.join(SESSION_CONFIG_ENTRIES)} ('0' or '1') are taken")
    level = options.get("graph_optimization_level")
    if level is not None and level not in OPTIMIZATION_LEVELS:
        return f"session_options.graph_optimization_level is {str(level)[:80]!r}, not one of {', '.join(OPTIMIZATION_LEVELS)}"
    return None


def ort_session_options(threads: int = 1, options: dict | None = None):
    """onnxruntime's SessionOptions at `threads`, with the settings of `options` (SESSION_OPTIONS; IntegrityError
    in one line for any setting `session_options_problem` refuses, before onnxruntime sees it)."""
    import onnxruntime as ort

    if why := session_options_problem(options):
        raise IntegrityError(f"{why}: the manifest's onnxruntime settings are refused")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    for key, value in (options or {}).get("config_entries", {}).items():
        so.add_session_config_entry(key, str(value))
    level = (options or {}).get("graph_optimization_level")
    if level:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return so


def ort_session(path: Path, threads: int = 1, options: dict | None = None):
    """An onnxruntime CPU session of an ONNX file with edgeq's settings (onnxruntime's own error if it
    cannot load it)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), ort_session_options(threads, options), providers=["CPUExecutionProvider"])


def load_onnx(path: Path, threads: int = 1, options: dict | None = None) -> Runner:
    if why := session_options_problem(options):
        raise IntegrityError(f"{path.name}: {why}: the manifest's onnxruntime settings are refused")
    try:
        sess = ort_session(path, threads, options)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise IntegrityError(f"{path.name}: not a loadable ONNX model ({first_line(exc)}); re-run `edgeq export`") from None
    input_name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {input_name: x})[0]

    return Runner(path.name, "onnxruntime-cpu", run, {"providers": sess.get_providers()})


def load_torchscript(path: Path, device: str = "cpu", threads: int = 1, options: dict | None = None) -> Runner:
    """A TorchScript file; an int8 one is loaded and run in the quantized engine it was built for
    (`options`: {"quantized_engine": "x86" | "qnnpack"}, from its manifest entry). The engine is
    process-wide in torch: it is selected for each load and call and restored after it, so no
    other model in the process runs in another engine than it was built in."""
    import torch

    from edgeq.quantize import engine

    torch.set_num_threads(threads)
    name = (options or {}).get("quantized_engine")
    if name is not None and name not in torch.backends.quantized.supported_engines:
        raise IntegrityError(f"{path.name}: built for the {name} quantized engine, which this torch does not "
                             f"have ({', '.join(torch.backends.quantized.supported_engines)})")
    with engine(name):
        module = jit_load(path, device, path.name)
    forward = _torch_run(module, device)
    if name is None:
        return Runner(path.name, f"torch-{device}", forward)

    def run(x: np.ndarray) -> np.ndarray:
        if torch.backends.quantized.engine == name:  # the usual case (a file of this machine's engine): no switch
            return forward(x)
        with engine(name):
            return forward(x)

    return Runner(path.name, f"torch-{device}", run)


def load_pte(path: Path, threads: int = 1) -> Runner:
    """An ExecuTorch program in ExecuTorch's runtime, XNNPACK's threadpool set to `threads`.

    A program has a fixed input shape (edgeq.pte says why): a batch of another size runs as calls of
    the program's batch, the last one padded with zeros and its padding rows dropped.
    """
    from edgeq import pte

    reason = pte.available(runtime_only=True)
    if reason is not None:
        raise IntegrityError(f"{path.name}: cannot run an ExecuTorch program here: {reason}")
    forward, shape, info = pte.open_program(path, threads)
    size = shape[0]

    def run(x: np.ndarray) -> np.ndarray:
        if tuple(x.shape[1:]) != shape[1:]:
            raise IntegrityError(f"{path.name}: input of shape {list(x.shape)}, the program takes "
                                 f"[N, {', '.join(map(str, shape[1:]))}]")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) == size:
            return forward(x)
        outs = []
        for i in range(0, len(x), size):
            chunk = x[i : i + size]
            n = len(chunk)
            if n < size:
                chunk = np.concatenate([chunk, np.zeros((size - n, *shape[1:]), np.float32)])
            outs.append(forward(chunk)[:n])
        return np.concatenate(outs)

    return Runner(path.name, "executorch-cpu", run, {**info, "program_batch": size})


def load_state_dict(path: Path) -> dict:
    """The tensors of an edgeq checkpoint ({'state_dict': {name: tensor}}), loaded weights-only.

    A checkpoint needs the model's own class to run; what can be proved from the file alone is that
    it holds exactly the weights of the TorchScript file of the same variant (verify does).
    """
    import torch

    try:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise IntegrityError(f"{path.name}: refused, it holds Python objects beyond tensors and plain data "
                             f"({_blocked(exc)}); loading it could run code, so it is never loaded; "
                             "re-run `edgeq export`") from None
    except Exception as exc:
        raise IntegrityError(f"{path.name}: not an edgeq checkpoint ({first_line(exc)}); re-run `edgeq export`") from None
    state = blob.get("state_dict") if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise IntegrityError(f"{path.name}: not an edgeq checkpoint (no state_dict of tensors); re-run `edgeq export`")
    return state


def jit_load(path: Path, device: str, label: str):
    """`torch.jit.load` of a TorchScript file held to what edgeq.scripted allows, checked before it loads and
    before anything calls it: IntegrityError in one line, naming `label`, otherwise."""
    import torch

    from edgeq import scripted
    from edgeq.quantize import quiet

    refused = "; refused: a TorchScript file is a program, and this one does more than a traced model does"
    if why := scripted.archive_problem(path):
        raise IntegrityError(f"{label}: {why}{refused}")
    try:
        with quiet():
            module = torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:  # torch raises RuntimeError/ValueError/zipfile errors for non-TorchScript files
        raise IntegrityError(f"{label}: not a TorchScript module ({first_line(exc)}); re-run `edgeq export`") from None
    if why := scripted.graph_problem(module):
        raise IntegrityError(f"{label}: {why}{refused}")
    return module


def load_checkpoint(path: Path, device: str = "cpu", threads: int = 1, options: dict | None = None) -> Runner:
    """Run a checkpoint from files alone: its tensors loaded (weights-only) into the TorchScript graph
    the manifest names (`options["graph"]`, a file beside it, traced from the same model unfrozen).

    The graph brings no weights of its own that survive: every parameter and buffer must be replaced
    by the checkpoint's, name for name and shape for shape, so the accuracy measured is the checkpoint's.
    """
    import torch

    graph = (options or {}).get("graph")
    if not isinstance(graph, str) or "/" in graph or graph.startswith("."):
        raise IntegrityError(f"{path.name}: the manifest names no TorchScript graph beside it to run the "
                             "checkpoint's weights in; re-run `edgeq export`")
    twin = path.parent / graph
    if twin.is_symlink() or not twin.is_file():
        raise IntegrityError(f"{path.name}: its graph {graph} is missing; re-run `edgeq export`")
    state = load_state_dict(path)
    torch.set_num_threads(threads)
    module = jit_load(twin, device, graph)
    want = module.state_dict()
    if set(want) != set(state) or any(want[k].shape != state[k].shape for k in want):
        raise IntegrityError(f"{path.name}: its tensors do not match the graph {graph} (names or shapes differ); "
                             "re-run `edgeq export`")
    module.load_state_dict(state, strict=True)
    return Runner(path.name, f"torch-{device}", _torch_run(module, device))


def load_options(fmt: str, runtime_info: dict) -> dict | None:
    """What `load` needs from an artifact's manifest `runtime` entry: ONNX session options, or the
    graph a checkpoint runs in."""
    match fmt:
        case "onnx":
            return runtime_info.get("session_options")
        case "checkpoint":
            return {"graph": runtime_info.get("graph")}
        case "torchscript" if runtime_info.get("quantized_engine"):
            return {"quantized_engine": runtime_info["quantized_engine"]}
    return None


def _torch_run(module, device: str) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(torch.from_numpy(x).to(device))
            return out.float().cpu().numpy()

    return run


def load(path: Path, fmt: str, device: str = "cpu", threads: int = 1, options: dict | None = None) -> Runner:
    match fmt:
        case "onnx":
            return load_onnx(path, threads, options)
        case "torchscript":
            return load_torchscript(path, device, threads, options)
        case "checkpoint":
            return load_checkpoint(path, device, threads, options)
        case "pte":  # XNNPACK is a CPU backend: the program runs on the CPU whatever `device` says
            return load_pte(path, threads)
    raise IntegrityError(f"{path.name}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _blocked(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused, without its advice to load the file unsafely."""
    for line in str(exc).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip().rstrip(".")[:160]
    return "not a weights-only file"

