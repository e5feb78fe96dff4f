"""What edgeq's fork server (edgeq.forkserver) imports once, for every pool worker it forks: numpy, onnx,
torch and, where ExecuTorch is installed, what lowering a program imports (edgeq.pte.import_lowering).

The thread variables are set first (one thread each: edgeq.trials.THREADS_PER_WORKER), before numpy's and
torch's thread pools read them; each worker sets its counts again as it starts (edgeq.trials._worker_start).
Nothing imported here starts a thread, so the server forks from a process with one: onnxruntime starts one
as it loads, so each worker imports it itself. tests/test_trials.py checks both."""

from __future__ import annotations

import os

from edgeq.trials import THREAD_VARIABLES, THREADS_PER_WORKER

for _name in THREAD_VARIABLES:
    os.environ[_name] = str(THREADS_PER_WORKER)

import numpy  # noqa: E402,F401
import onnx  # noqa: E402,F401
import torch  # noqa: E402,F401

from edgeq import pte  # noqa: E402

try:
    pte.import_lowering()
except Exception:  # noqa: BLE001 - no ExecuTorch, or one that does not load: the job that needs it says so
    pass
