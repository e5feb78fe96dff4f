"""What `verify` works on and produces: its config, one Row per artifact and runtime, the result.

Plain data, shared by the measuring modules (core, latency) and the renderers (report, plot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.errors import ConfigError
from edgeq.manifest import Artifact
from edgeq import evidence, policy
from edgeq.timing import WINDOW_S
from edgeq.signing import UNSIGNED

CPU_RUNTIME = {"onnx": "onnxruntime-cpu", "torchscript": "torch-cpu", "checkpoint": "torch-cpu", "pte": "executorch-cpu"}
CUDA_RUNTIME = "torch-cuda"
NO_CUDA = "skipped: no CUDA device"
UNLISTED = "in the artifacts directory but not in manifest.json, so not verified"
# reference kinds every artifact is timed against (paired), in the order they are reported
REFERENCES = ("parent", "torch_fp32", "ort_fp32")
# Seconds each step that runs an artifact's code may take: its load and accuracy pass, its warm-up, its
# windows in each paired timing. On a shared 2-core VM the slowest step of the 36 real MLP/CNN artifacts
# takes 0.27 s (load and accuracy on 1,000 samples), 2.8 s on full MNIST's 10,000; 120 s is 40x that,
# room for slower machines, and still turns a hang into a FAIL within two minutes.
DEFAULT_TIME_LIMIT_S = 120.0
# An fp32 artifact more than this many times slower than its family's fp32 checkpoint run eagerly on
# CPU (paired ratio, batch 1 or the large batch) does work its weights do not need. On the real export
# the legitimate ratios are at most 1.03x (TorchScript <= 1.00x, ONNX <= 0.84x, pruned checkpoints
# <= 1.03x) and paired noise is about 5%: 2x is far outside both. Torch vs onnxruntime is no such
# rule: the eager and TorchScript CNNs are legitimately up to 5.2x slower than onnxruntime's fp32.
FP32_SLOWDOWN_LIMIT = 2.0


@dataclass(frozen=True)
class VerifyConfig:
    """Gates, measurement settings and the data location for one `verify` run."""

    threads: int = 1
    batch: int = 256  # the large batch for throughput
    # Without these, verify checks exactly what the export promised: each file's contract (manifest
    # `contract`, edgeq.policy) re-measured on the validation split it was decided on. Given, they add
    # the caller's own rules on the evaluation data: points below, and top-1 agreement with, the fp32 baseline.
    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    data: str | None = None  # an .npz (inputs, labels) to measure on instead of the export's eval.npz
    fail_on_slower: bool = False  # the slower flags (int8 vs fp32 parent, fp32 vs baseline) fail instead of warn
    strict: bool = False  # a file in the directory that the manifest does not list fails the run
    public_key: str | None = None  # check the directory's signature with this EC public key, first
    # paired ratios up to 1 + margin are within timer noise, not "slower" (edgeq.policy's, when made)
    slower_margin: float = field(default_factory=lambda: policy.NOISE_MARGIN)
    rounds: int = 8  # alternating timing rounds per batch size: 8 give the median's 99% interval (edgeq.evidence)
    window_s: float = WINDOW_S  # seconds per timing window (at least one call)
    time_limit_s: float = DEFAULT_TIME_LIMIT_S  # per step that runs an artifact (load + accuracy, warm-up, timing)
    memory_limit_gb: float | None = None  # GiB the worker may add for all artifacts; None: half the machine's memory
    # set by verify: True where it runs on the export's machine and runtimes (claims exact), False elsewhere
    same_machine: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.threads >= 1, f"threads must be >= 1, got {self.threads}"),
            (self.batch >= 1, f"batch must be >= 1, got {self.batch}"),
            (self.min_agreement is None or 0.0 <= self.min_agreement <= 1.0,
             f"min_agreement must be in [0, 1], got {self.min_agreement}"),
            (self.max_accuracy_drop is None or self.max_accuracy_drop >= 0.0,
             f"max_accuracy_drop must be >= 0 points, got {self.max_accuracy_drop}"),
            (self.slower_margin >= 0.0, f"slower_margin must be >= 0, got {self.slower_margin}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (not self.fail_on_slower or self.rounds >= evidence.fewest_rounds(),
             f"--fail-on-slower needs --rounds {evidence.fewest_rounds()} or more: the slower rule reads the "
             f"{evidence.RULE.confidence:.0%} "
             f"interval of the paired ratios' median, which {self.rounds} rounds cannot bound"),
            (self.window_s > 0.0, f"window_s must be > 0, got {self.window_s}"),
            (math.isfinite(self.time_limit_s) and self.time_limit_s > 0,
             f"time limit must be a number of seconds > 0 (--time-limit), got {self.time_limit_s:g}"),
            (self.memory_limit_gb is None or (math.isfinite(self.memory_limit_gb) and self.memory_limit_gb > 0),
             f"memory limit must be a number of GiB > 0 (--memory-limit), got {self.memory_limit_gb}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class Row:
    """One artifact (or baseline) in one runtime: what was measured and why it failed, if it did."""

    name: str
    model: str
    format: str
    precision: str
    runtime: str  # onnxruntime-cpu | torch-cpu | torch-cuda
    role: str  # baseline | artifact
    stage: str  # original | pruned | quantized | pruned + quantized
    parent: str | None = None
    file: str | None = None
    recommended: bool = False
    status: str = "ok"  # ok | FAIL | skipped
    reasons: list[str] = field(default_factory=list)  # why it failed, or why it was skipped
    warnings: list[str] = field(default_factory=list)
    n: int | None = None
    correct: int | None = None
    accuracy: float | None = None
    manifest_accuracy: float | None = None
    delta_pts: float | None = None
    val_accuracy: float | None = None  # on the validation split (val.npz), where the export decided
    bar_pts: float | None = None  # the bar the file was built to against its parent (points, validation split)
    drop_vs_parent_pts: float | None = None  # measured here on the validation split: points below its parent
    contract: list[dict] = field(default_factory=list)  # each bar and the agreement rule, re-measured here
    agreement: float | None = None
    sqnr_db: float | None = None
    bytes: int | None = None
    gzip_bytes: int | None = None
    size_vs_fp32: float | None = None
    size_vs_parent: float | None = None
    params: int | None = None
    nonzero_params: int | None = None
    threads: int | None = None
    batch: int | None = None
    p50_ms_b1: float | None = None
    p90_ms_b1: float | None = None
    p50_ms_batch: float | None = None
    samples_per_s: float | None = None
    paired: dict[str, dict] = field(default_factory=dict)  # reference kind -> paired ratios
    speedup_vs_torch_fp32_b1: float | None = None
    speedup_vs_torch_fp32_batch: float | None = None
    speedup_vs_ort_fp32_b1: float | None = None
    speedup_vs_ort_fp32_batch: float | None = None
    slower_than_parent: bool | None = None  # None: not an int8 artifact, or no parent to time against
    # None: not an fp32 CPU artifact (the baseline itself, int8, CUDA), or the baseline could not be timed
    slower_than_fp32_baseline: bool | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.runtime

    @property
    def label(self) -> str:
        """The row's name, with the runtime when it is not the artifact's own (a CUDA run)."""
        return self.name if self.runtime == CPU_RUNTIME.get(self.format) else f"{self.name} ({self.runtime})"

    def fail(self, reason: str) -> None:
        self.status = "FAIL"
        self.reasons.append(reason)


@dataclass
class VerifyResult:
    """Every row (baselines and artifacts, in report order) and where they were measured."""

    directory: str
    config: VerifyConfig
    rows: list[Row]
    environment: dict
    dataset: dict
    not_built: list[dict]  # what the exporter skipped, with its reasons (manifest "skipped")
    wall_s: float
    # seconds per phase: integrity, test_split, start_worker, load_and_accuracy, latency
    phases: dict = field(default_factory=dict)
    memory_cap_gb: float | None = None  # GiB of memory the worker could add; None: not capped (CUDA)
    unlisted: list[str] = field(default_factory=list)  # names in the directory the manifest does not list
    directory_problems: list[str] = field(default_factory=list)  # symlinks, special files: each fails the run
    signature: dict = field(default_factory=lambda: {"status": UNSIGNED, "file": None, "public_key": None})
    # per model family, from the manifest: the accuracy bar, the recommended files, the calibration
    # chosen and the per-layer sensitivity (as the export measured them)
    families: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when no row failed (skipped rows, such as CUDA without a device, do not fail) and the
        directory holds nothing it must not: no symlink or special file, no unlisted file under --strict."""
        return all(r.status != "FAIL" for r in self.rows) and not self.directory_failures

    @property
    def directory_failures(self) -> list[str]:
        """One line per problem with the directory itself; unlisted names count under --strict only."""
        strict = [f"{name}: {UNLISTED} (--strict); remove it, or re-run `edgeq export`" for name in self.unlisted]
        return self.directory_problems + (strict if self.config.strict else [])

    @property
    def directory_warnings(self) -> list[str]:
        """One line per unlisted name, when --strict does not make it a failure."""
        if self.config.strict:
            return []
        return [f"{name}: {UNLISTED}; remove it, or pass --strict to fail on it" for name in self.unlisted]

    @property
    def failures(self) -> list[str]:
        """The directory's failures, then one line per failing row: `<label>: <reasons>`."""
        rows = [f"{r.label}: {'; '.join(r.reasons)}" for r in self.rows if r.status == "FAIL"]
        return self.directory_failures + rows


@dataclass
class Subject:
    """A row together with what measuring it needs and produces (internal to core and latency)."""

    row: Row
    art: Artifact
    device: str
    path: Path | None = None  # set once integrity passed
    runner: int | None = None  # the worker's handle, threads=1: the accuracy pass
    timers: dict[str, int] = field(default_factory=dict)  # batch name -> the worker's handle, cfg.threads
    logits: np.ndarray | None = None  # set when the accuracy pass gave a well-shaped result
    # a step of it outlived its time limit, ran out of memory or crashed its runtime: its row has failed, and
    # nothing runs it again (each later step would spend another time limit and restart the worker)
    stopped: bool = False
    val_logits: np.ndarray | None = None  # the same on the validation split

    def stop(self, reason: str) -> None:
        """Fail the row with `reason` (a step the worker had to stop) and run the file no more."""
        self.row.fail(reason)
        self.stopped = True
