"""The recipe: every decision a user may set about how a model is compressed, in one frozen,
validated dataclass, loadable from TOML (`Recipe.from_file`, `edgeq export --recipe FILE`) and
recorded in the manifest.

Example TOML (every key optional; unknown keys are refused):

    variants = ["structured", "static", "qat"]
    seed = 0
    [structured]
    amount = 0.5
    round_to = 8
    [finetune_structured]
    epochs = 3
    lr = 5e-4
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgeq.errors import ConfigError
from edgeq.target import TARGETS, Target

PRUNINGS = ("unstructured", "structured")
MODES = ("dynamic", "static", "qat")
VARIANTS = PRUNINGS + MODES
UNSTRUCTURED_METHODS = ("l1", "random")
ALLOCATIONS = ("uniform", "sensitivity")
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")  # onnxruntime.quantization.CalibrationMethod
PTE_OBSERVERS = ("histogram", "minmax")  # PT2E activation observers for static int8 .pte (XNNPACK's default first)
SHIP_RULES = ("timed", "always")
EXECUTION = ("jobs", "ray_address")  # where trials run: no decision or file depends on them
MAX_BATCH = 4096  # a timed batch larger than this is a typo, not a deployment: refused before any work
DEFAULT_EVAL_SAMPLES = 10_000  # the test split shipped in eval.npz: all of it up to this many samples


def build_machine_target() -> str:
    """The target this machine is (edgeq.target); x86 for a CPU edgeq knows no target of."""
    from edgeq.target import here

    return here().name


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class Finetune:
    """edgeq's own fine-tuning loop (AdamW, one-cycle schedule), used when no `finetune` callable is given."""

    epochs: int = 3
    lr: float = 5e-4
    weight_decay: float = 1e-4
    batch_size: int = 64
    shift: int = 0  # random translation of up to `shift` pixels, for image inputs [N, C, H, W]; 0: none

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, f"fine-tune epochs must be >= 0, got {self.epochs}")
        _check(self.lr > 0 and math.isfinite(self.lr), f"fine-tune lr must be a positive number, got {self.lr}")
        _check(self.weight_decay >= 0, f"fine-tune weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.batch_size >= 1, f"fine-tune batch_size must be >= 1, got {self.batch_size}")
        _check(self.shift >= 0, f"fine-tune shift must be >= 0 pixels, got {self.shift}")


@dataclass(frozen=True)
class Unstructured:
    amount: float = 0.8  # fraction of Conv/Linear weights zeroed, globally
    method: str = "l1"  # l1 (global magnitude) | random

    def __post_init__(self) -> None:
        _check(0.0 < self.amount < 1.0, f"unstructured amount {self.amount} is out of range: use a fraction in (0, 1)")
        _check(self.method in UNSTRUCTURED_METHODS,
               f"unknown unstructured method {self.method!r}: choose {', '.join(UNSTRUCTURED_METHODS)}")


@dataclass(frozen=True)
class Structured:
    amount: float = 0.5  # fraction of channels removed (Torch-Pruning's pruning_ratio)
    round_to: int = 8  # channel counts kept at multiples of this, for the int8 kernels
    # uniform: every group loses `amount` of its channels; sensitivity: as many channels in all, taken
    # from the groups that cost least accuracy pruned alone first, each up to `cap` (edgeq.prune.allocate)
    allocation: str = "uniform"
    cap: float = 0.6

    def __post_init__(self) -> None:
        _check(0.0 < self.amount < 1.0, f"structured amount {self.amount} is out of range: use a fraction in (0, 1)")
        _check(self.round_to >= 1, f"structured round_to must be >= 1, got {self.round_to}")
        _check(self.allocation in ALLOCATIONS, f"unknown structured allocation {self.allocation!r}: choose "
                                               f"{', '.join(ALLOCATIONS)}")
        _check(self.amount <= self.cap < 1.0, f"structured cap {self.cap} must be in [amount, 1): the most one "
                                              "group may lose")


@dataclass(frozen=True)
class Recipe:
    """How to compress: variants, pruning, fine-tunes, calibration, timing and the ship rule."""

    variants: tuple[str, ...] = VARIANTS
    unstructured: Unstructured = Unstructured()
    structured: Structured = Structured()
    finetune_unstructured: Finetune = Finetune(epochs=3, lr=5e-4)
    finetune_structured: Finetune = Finetune(epochs=3, lr=5e-4)
    qat: Finetune = Finetune(epochs=2, lr=2e-5, weight_decay=0.0)
    calibration_samples: int = 512  # training samples run through the observers (static int8)
    # onnxruntime calibration candidates, measured on the evaluation data; the most accurate is kept.
    # Entropy (KL divergence on a 2048-bin histogram, edgeq.onnx_quant.ENTROPY_OPTIONS) is offered, not a
    # default: it costs about half a second per tensor (docs/calibration.md)
    calibration_methods: tuple[str, ...] = ("MinMax", "Percentile")
    calibration_sizes: tuple[int, ...] = (128, 512)  # samples (at most calibration_samples are drawn)
    # each calibration candidate without and with bias correction of the int8 weights (edgeq.bias), measured
    bias_correction: tuple[bool, ...] = (False, True)
    max_accuracy_drop: float = 0.5  # points below its fp32 parent an int8 file may lose; more: layers go fp32
    # points below the family's fp32 model a pruned file may lose (on the validation split, after its
    # fine-tune): the pruning amount is searched down from the one asked until it holds, else not shipped
    max_pruning_drop: float = 0.5
    pruning_steps: int = 4  # pruning amounts tried at most per pruned variant (the asked one first)
    pruning_budget_s: float = 600.0  # wall time of the pruning search per pruned variant (fine-tunes included)
    # the validation split every accuracy decision is made on, when compress() is given no `val`: a
    # stratified, seeded fraction of `train` held out from calibration, fine-tunes and QAT
    val_fraction: float = 0.2
    target: str = ""  # x86 | arm64: the int8 formats the files are built for ("": the build machine's)
    executorch: bool = True  # also build ExecuTorch programs (.pte, XNNPACK): fp32 per float variant, int8 per mode
    # static int8 .pte calibration candidates (activation observer x calibration_sizes), measured on the
    # validation split; the most accurate is kept (as for the ONNX files' calibration_methods)
    pte_observers: tuple[str, ...] = PTE_OBSERVERS
    sensitivity: bool = True  # measure per-layer quantization and per-group pruning sensitivity
    # wall time of the per-layer quantization sensitivity per model, shared by its fp32 parents (about
    # two int8 builds per layer: resnet18 at 32x32 measures ~12 of its 21 layers per parent in 60 s)
    sensitivity_budget_s: float = 120.0
    # wall time of the accuracy stage's measuring per model: each fp32 parent's ONNX calibration candidates
    # (every one measured, their time taken off first), then the accuracy bars' search (quantizer groups ranked
    # and moved to fp32), shared by its int8 ONNX files; its static .pte programs' bars (calibration
    # candidates, then units left out of int8) share what those leave;
    # what a trial would end past it is not tried, and the plan says so
    accuracy_budget_s: float = 120.0
    threads: int = 1  # the deployment's thread count: int8 decisions are timed at it
    batches: tuple[int, ...] = (1, 256)  # batch sizes every int8 decision and the ship rule are timed at
    deployment_batch: int = 1  # the batch size the deployment runs (one of `batches`): `recommended` is fastest at it
    # timed: an int8 file shown slower than its fp32 parent (edgeq.policy's noise margin) is not shipped;
    # always: every int8 file within the bars ships untimed (a build whose files depend on no timing)
    ship_rule: str = "timed"
    search_budget_s: float = 120.0  # wall time of the mixed-precision search per model, shared by its fp32 parents
    # an int8 ONNX file keeps layers in fp32 for speed only while it stays within this fraction of its
    # fp32 parent's bytes; layers kept in fp32 for the accuracy bar come first and may exceed it
    max_int8_size_ratio: float = 0.30
    eval_samples: int = DEFAULT_EVAL_SAMPLES  # test samples shipped in eval.npz and measured
    seed: int = 0
    # where the untimed trials run (edgeq.trials): worker processes on this machine (0: every core; 1: in
    # this process), or a Ray cluster's address (`edgeq export --ray`). They change no decision and no
    # file, only the wall time: not recorded with the recipe, and a plan replays whatever they are.
    jobs: int = 0
    ray_address: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", self.target or build_machine_target())
        object.__setattr__(self, "variants", tuple(self.variants))
        object.__setattr__(self, "batches", tuple(int(b) for b in self.batches))
        object.__setattr__(self, "calibration_methods", tuple(self.calibration_methods))
        object.__setattr__(self, "calibration_sizes", tuple(int(n) for n in self.calibration_sizes))
        object.__setattr__(self, "pte_observers", tuple(self.pte_observers))
        object.__setattr__(self, "bias_correction", tuple(bool(b) for b in self.bias_correction))
        for v in self.variants:
            _check(v in VARIANTS, f"unknown variant {v!r}: choose from {', '.join(VARIANTS)}")
        _check(len(set(self.variants)) == len(self.variants), f"variants list one twice: {list(self.variants)}")
        _check(self.calibration_samples >= 1, f"calibration_samples must be >= 1, got {self.calibration_samples}")
        _check(self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        _check(bool(self.batches) and all(b >= 1 for b in self.batches),
               f"batches must be positive batch sizes, got {list(self.batches)}")
        _check(self.deployment_batch in self.batches,
               f"deployment_batch {self.deployment_batch} is not one of batches {list(self.batches)}: it must be timed")
        for m in self.calibration_methods:
            _check(m in CALIBRATION_METHODS, f"unknown calibration method {m!r}: choose from {', '.join(CALIBRATION_METHODS)}")
        for o in self.pte_observers:
            _check(o in PTE_OBSERVERS, f"unknown pte_observers entry {o!r}: choose from {', '.join(PTE_OBSERVERS)}")
        _check(bool(self.pte_observers) and len(set(self.pte_observers)) == len(self.pte_observers),
               f"pte_observers needs at least one entry, each once, got {list(self.pte_observers)}")
        _check(bool(self.bias_correction) and len(set(self.bias_correction)) == len(self.bias_correction),
               f"bias_correction lists the candidates (false, true) each once, got {list(self.bias_correction)}")
        _check(bool(self.calibration_methods) and bool(self.calibration_sizes) and min(self.calibration_sizes) >= 1,
               "calibration_methods and calibration_sizes need at least one entry each, sizes >= 1")
        _check(math.isfinite(self.max_accuracy_drop) and 0 <= self.max_accuracy_drop <= 100,
               f"max_accuracy_drop is in points (0-100), got {self.max_accuracy_drop}")
        _check(math.isfinite(self.max_pruning_drop) and 0 <= self.max_pruning_drop <= 100,
               f"max_pruning_drop is in points (0-100), got {self.max_pruning_drop}")
        _check(1 <= self.pruning_steps <= 20, f"pruning_steps must be in [1, 20], got {self.pruning_steps}")
        _check(math.isfinite(self.pruning_budget_s) and self.pruning_budget_s > 0,
               f"pruning_budget_s must be a number of seconds > 0, got {self.pruning_budget_s}")
        _check(0 < self.val_fraction < 1, f"val_fraction is a fraction of train in (0, 1), got {self.val_fraction}")
        _check(self.ship_rule in SHIP_RULES, f"unknown ship_rule {self.ship_rule!r}: choose {', '.join(SHIP_RULES)}")
        _check(self.target in TARGETS, f"unknown target {self.target!r}: choose {', '.join(TARGETS)}")
        _check(all(b <= MAX_BATCH for b in self.batches),
               f"batches {list(self.batches)}: at most {MAX_BATCH} samples per timed batch")
        _check(0 < self.max_int8_size_ratio <= 1 and math.isfinite(self.max_int8_size_ratio),
               f"max_int8_size_ratio is a fraction of the fp32 parent's size in (0, 1], got {self.max_int8_size_ratio}")
        _check(self.sensitivity_budget_s > 0, f"sensitivity_budget_s must be > 0, got {self.sensitivity_budget_s}")
        _check(self.search_budget_s > 0, f"search_budget_s must be > 0, got {self.search_budget_s}")
        _check(self.accuracy_budget_s > 0, f"accuracy_budget_s must be > 0, got {self.accuracy_budget_s}")
        _check(self.eval_samples >= 1, f"eval_samples must be >= 1, got {self.eval_samples}")
        _check(self.jobs >= 0, f"jobs must be >= 0 (0: every core), got {self.jobs}")

    @property
    def target_spec(self) -> Target:
        """What `target` means: formats, engines, timing policy (edgeq.target)."""
        return TARGETS[self.target]

    def to_dict(self) -> dict:
        """The recipe as recorded (manifest, plan): every field that can change a decision or a file."""
        d = dataclasses.asdict(self)
        for key in EXECUTION:
            del d[key]
        for key in ("variants", "batches", "calibration_methods", "calibration_sizes", "pte_observers", "bias_correction"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "recipe") -> "Recipe":
        """A recipe from plain data (TOML or the manifest); unknown keys are refused by name."""
        return _build(cls, d, where)

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        import tomllib

        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"--recipe {path}: no such file; pass a TOML recipe file") from None
        except OSError as exc:
            raise ConfigError(f"--recipe {path}: cannot read ({exc.strerror})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--recipe {path}: not valid TOML ({exc}); fix the file") from None
        return cls.from_dict(data, where=f"--recipe {path}")


@dataclass(frozen=True)
class FloatSettings:
    """What the float stage reads (edgeq.floats): the pruned variants and how they are searched."""

    variants: tuple[str, ...]
    unstructured: Unstructured
    structured: Structured
    finetune_unstructured: Finetune
    finetune_structured: Finetune
    max_pruning_drop: float
    pruning_steps: int
    pruning_budget_s: float
    sensitivity: bool
    deployment_batch: int
    seed: int


@dataclass(frozen=True)
class Int8Settings:
    """What the int8 stage reads (edgeq.int8): modes, the target's formats, calibration, the bar, budgets."""

    modes: tuple[str, ...]
    target: Target
    qat: Finetune
    calibration_samples: int
    calibration_methods: tuple[str, ...]
    calibration_sizes: tuple[int, ...]
    bias_correction: tuple[bool, ...]
    max_accuracy_drop: float
    sensitivity: bool
    max_int8_size_ratio: float
    seed: int


@dataclass(frozen=True)
class ProgramSettings:
    """What the ExecuTorch stage reads (edgeq.programs)."""

    enabled: bool
    modes: tuple[str, ...]
    qat: Finetune
    pte_observers: tuple[str, ...]
    calibration_sizes: tuple[int, ...]
    max_accuracy_drop: float
    max_pruning_drop: float
    deployment_batch: int
    seed: int


@dataclass(frozen=True)
class TimingSettings:
    """What the timed decisions read (edgeq.speed, edgeq.precision): where, at what, and the ship rule."""

    target: Target
    threads: int
    batches: tuple[int, ...]
    deployment_batch: int
    ship_rule: str
    search_budget_s: float
    max_int8_size_ratio: float


@dataclass(frozen=True)
class Settings:
    """A recipe narrowed once into what each stage reads: a stage sees its own settings, not the recipe."""

    floats: FloatSettings
    int8: Int8Settings
    programs: ProgramSettings
    timing: TimingSettings
    max_accuracy_drop: float  # the contract's bars (edgeq.policy)
    max_pruning_drop: float


def narrow(r: "Recipe") -> Settings:
    """The recipe's settings per stage."""
    modes = tuple(m for m in MODES if m in r.variants)
    return Settings(
        floats=FloatSettings(r.variants, r.unstructured, r.structured, r.finetune_unstructured, r.finetune_structured,
                             r.max_pruning_drop, r.pruning_steps, r.pruning_budget_s, r.sensitivity,
                             r.deployment_batch, r.seed),
        int8=Int8Settings(modes, r.target_spec, r.qat, r.calibration_samples, r.calibration_methods,
                          r.calibration_sizes, r.bias_correction, r.max_accuracy_drop, r.sensitivity,
                          r.max_int8_size_ratio, r.seed),
        programs=ProgramSettings(r.executorch, tuple(m for m in ("static", "qat") if m in r.variants), r.qat,
                                 r.pte_observers, r.calibration_sizes, r.max_accuracy_drop, r.max_pruning_drop,
                                 r.deployment_batch, r.seed),
        timing=TimingSettings(r.target_spec, r.threads, r.batches, r.deployment_batch, r.ship_rule, r.search_budget_s,
                              r.max_int8_size_ratio),
        max_accuracy_drop=r.max_accuracy_drop, max_pruning_drop=r.max_pruning_drop)


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in d.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where} [{name}]")
        elif isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: {name} must be a list, got {value!r}")
            kwargs[name] = tuple(value)
        else:
            if isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, (type(default), int)):
                raise ConfigError(f"{where}: {name} must be of type {type(default).__name__}, got {value!r}")
            kwargs[name] = type(default)(value)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None

