"""The one rule book: what ships, what is within a bar, what is slower, what is recommended.

Pure functions over numbers, called by the exporter when it decides and by `edgeq verify` when it
checks, so that both enforce the same contract. Every rule's constant is named once, here.

The contract of a shipped file, recorded in its manifest entry (`contract`) and re-measured by
`edgeq verify` on the validation split shipped beside it (`val.npz`):
- an int8 file loses at most `max_accuracy_drop` points against its fp32 parent;
- a pruned file loses at most `max_pruning_drop` points against the family's fp32 model, and its
  int8 children at most the sum of both bars;
- a post-training int8 file (static or dynamic: it keeps its parent's weights) picks the same class
  as its parent on at least MIN_AGREEMENT of the samples. A file trained again (QAT, a pruned
  model's fine-tune) is judged by accuracy only: it is meant to differ from the model it improves on.
The test split is never read by a decision: its accuracy is only reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# paired-ratio differences within this margin are timer noise, not a reason to act: the ship rule
# (an int8 file slower than its parent by more), the mixed-precision search's least gain, verify's
# "slower" flag and the recommendation's ties
NOISE_MARGIN = 0.05
# top-1 agreement a post-training int8 file keeps with its fp32 parent (fidelity rule)
MIN_AGREEMENT = 0.98
# an fp32 file computes what its model computes: its logits within this SQNR of the model's own (float
# sums in another order reach 100+ dB; a graph traced on one branch of data-dependent control flow, or
# NaN weights, come nowhere near)
FP32_MIN_SQNR_DB = 60.0
# On another machine or runtime than the export's, float sums run in another order: a verifier then lets
# a file's count of correct answers differ from the manifest's by this share of the samples (at least one)
CLAIM_SLACK = 0.002
EPS = 1e-9  # float slack on a comparison of points computed from integer counts
# Golden outputs (edgeq.golden, docs/device.md): a file's outputs on the golden inputs against the ones it
# gave at export, as max |output - golden| / max |golden| per precision, and the top-1 agreement on the
# samples the logit error cannot swap. fp32: at most 1.8e-7 measured (threads, optimization levels, four
# ARM CPUs), 1e-5 leaves room for longer sums in another order. int8: 0 to 3.7e-7 measured; 1e-2 is about
# one quantization step of an 8-bit range (1/127), while a changed weight moves the logits by 1 or more.
GOLDEN_MAX_LOGIT_ERROR = {"fp32": 1e-5, "int8": 1e-2}
GOLDEN_MIN_TOP1_AGREEMENT = 1.0


def drop_points(ref_correct: int, correct: int, n: int) -> float:
    """Accuracy lost against a reference on the same n samples, in points (negative: a gain)."""
    return round(100.0 * (ref_correct - correct) / n, 4)


def within_bar(drop: float, bar_points: float) -> bool:
    return drop <= bar_points + EPS


def keeps_parent_weights(method: str | None) -> bool:
    """Post-training quantization keeps the parent's weights: the fidelity (agreement) rule applies."""
    return method in ("static", "dynamic")


def within_agreement(value: float, minimum: float = MIN_AGREEMENT) -> bool:
    return value >= minimum - EPS


def slower(ratio_low: float, margin: float | None = None) -> bool:
    """A candidate is slower than its reference when even the low end of its paired ratio's interval
    is past 1 + margin (NOISE_MARGIN, read when called)."""
    margin = NOISE_MARGIN if margin is None else margin
    return ratio_low > 1.0 + margin


def not_slower(ratio_high: float, margin: float | None = None) -> bool:
    margin = NOISE_MARGIN if margin is None else margin
    return ratio_high <= 1.0 + margin


def faithful(sqnr_db: float) -> bool:
    """An fp32 file's logits against its model's own: the same computation."""
    return sqnr_db >= FP32_MIN_SQNR_DB


def same_machine(built: dict, here: dict) -> bool:
    """Whether a verifier runs where the files were built: the same CPU (model, ISA flags) and runtimes.
    There, a file's answers are bit for bit the export's; elsewhere they may move within CLAIM_SLACK."""
    keys = ("torch", "onnxruntime")
    def cpu(env: dict) -> tuple:
        c = env.get("cpu") if isinstance(env.get("cpu"), dict) else {}  # a manifest is input: any value may be there
        return c.get("model"), c.get("arch"), c.get("isa")

    return cpu(built) == cpu(here) and all(built.get(k) == here.get(k) for k in keys)


def claim_slack(n: int, same: bool) -> int:
    """How many correct answers a file may differ by from its manifest's claim on n samples."""
    return 0 if same else max(1, math.ceil(CLAIM_SLACK * n))


def claim_ok(correct: int, claimed: int, n: int, same: bool) -> bool:
    """A file's count of correct answers on n samples against its manifest's claim: equal on the export's
    machine and runtimes, within claim_slack elsewhere (another CPU, a device). verify and the device
    checker both ask this."""
    return abs(correct - claimed) <= claim_slack(n, same)


def within_size(ratio: float, limit: float) -> bool:
    return ratio <= limit


def bars(kind: str, pruned: bool, max_accuracy_drop: float, max_pruning_drop: float) -> list[tuple[str, float]]:
    """The bars a file is held to, as (reference, points): reference "parent" or "fp32" (the family's
    fp32 model in the same format). kind: "fp32" (a float file) or "int8"."""
    if kind == "fp32":
        return [("fp32", max_pruning_drop)] if pruned else []
    out = [("parent", max_accuracy_drop)]
    if pruned:
        out.append(("fp32", max_accuracy_drop + max_pruning_drop))
    return out


@dataclass(frozen=True)
class Contract:
    """What a file is held to on the validation split: at most `points` below each reference of `bars`
    ("parent": its fp32 parent; "fp32": the family's fp32 file of its format), and for post-training int8
    a top-1 agreement with its parent of at least `min_agreement` (None: no agreement rule)."""

    bars: tuple[tuple[str, float], ...]
    min_agreement: float | None

    def met(self, drops: dict[str, float], agreement: float | None = None) -> bool:
        """Whether measured drops (reference -> points; a reference not measured is not held against) and
        agreement meet it."""
        ok = all(within_bar(drops[ref], points) for ref, points in self.bars if ref in drops)
        return ok and (self.min_agreement is None or (agreement is not None
                                                      and within_agreement(agreement, self.min_agreement)))


def contract(precision: str, pruned: bool, method: str | None, max_accuracy_drop: float,
             max_pruning_drop: float) -> Contract:
    """The one contract a file of this kind is shipped within (the exporter decides by it, verify and the
    device checker check it): its bars, and the agreement rule when it keeps its parent's weights."""
    agree = MIN_AGREEMENT if precision == "int8" and keeps_parent_weights(method) else None
    return Contract(tuple(bars(precision, pruned, max_accuracy_drop, max_pruning_drop)), agree)


def coarse_split(n: int, bar_points: float) -> str | None:
    """A warning when one sample of an n-sample split moves accuracy by more than the bar: then the bar
    can only mean 'not one sample lost'."""
    step = 100.0 / n
    if step > bar_points + EPS:
        return (f"{n} samples: one sample is {step:.2g} points, coarser than the bar of {bar_points:g} points; "
                "pass more data for the bar to mean anything")
    return None


def recommend(candidates: list[dict], margin: float | None = None) -> str:
    """The fastest candidate: {name, median, high (the ratio interval's upper end), accuracy, bytes,
    reference (bool)}; ratios are against the reference. A candidate counts as faster only with
    confidence (high < 1) and by more than the margin; candidates within the margin of the fastest are
    a tie, broken by accuracy, then size."""
    margin = NOISE_MARGIN if margin is None else margin
    faster = [c for c in candidates if c["reference"] or (c["high"] < 1.0 and c["median"] < 1 - margin)]
    best = min(c["median"] for c in faster)
    tied = [c for c in faster if c["median"] <= best + margin]
    return max(tied, key=lambda c: (c["accuracy"], -c["bytes"]))["name"]


def in_contention(candidates: list[dict], margin: float | None = None) -> list[str]:
    """The candidates (as for `recommend`, with `low`: the interval's lower end) that more rounds could still
    make the pick, the reference aside (it is what the others are timed against). Out is one whose interval
    rules it out with confidence: its low end is not below 1 - margin (it cannot be faster by more than the
    margin), or lies more than the margin above the high end of a candidate that is faster with confidence
    (it cannot tie with the fastest)."""
    margin = NOISE_MARGIN if margin is None else margin
    sure = [c["high"] for c in candidates if not c["reference"] and c["high"] < 1 - margin]
    tie_bound = min(sure, default=math.inf) + margin
    return [c["name"] for c in candidates if not c["reference"] and c["low"] < 1 - margin and c["low"] <= tie_bound]


def recommend_settled(candidates: list[dict], margin: float | None = None) -> bool:
    """True when more rounds cannot change `recommend`'s pick (with confidence): no candidate is in
    contention (the reference is the pick), or one is and it is faster than the reference with confidence
    and by more than the margin (the pick: nothing ties with it)."""
    margin = NOISE_MARGIN if margin is None else margin
    left = in_contention(candidates, margin)
    return not left or (len(left) == 1 and next(c for c in candidates if c["name"] == left[0])["high"] < 1 - margin)


def geometric_mean(ratios: list[float]) -> float:
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))
