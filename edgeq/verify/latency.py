"""The latency phase of `verify`: every row timed in alternating windows with its references.

A round runs the row's candidate and reference windows back to back (the order flipped every round), so
a ratio compares calls made within a few tens of milliseconds of each other; the medians (of times and
of per-round ratios) discard the rounds a burst of load split. One row is timed at a time, with only its
own runners loaded: the worker's memory stays one row's, whatever the size of the export.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeq import evidence, policy, runtime, timing
from edgeq.verify.rows import CUDA_RUNTIME, FP32_SLOWDOWN_LIMIT, Row, Subject, VerifyConfig
from edgeq.verify.worker import Budget, Failed, Worker

WARMUP_CALLS = 3  # per runner and batch size: TorchScript re-optimizes on the first calls of a shape
# Each batch size is timed on its own runner, loaded for it and warmed at it only, as a deployment at one
# batch size runs it: torch's x86 int8 kernels keep their plan for the first input shape they see, so
# one runner first called at batch 256 (or on the whole test split) ran batch 1 at 1.8x the time
# of one that only saw batch 1 (the MNIST CNN's channel-pruned int8 TorchScript file, measured here).


@dataclass
class _Session:
    """One row's latency measurement: the runners timed together and what each round measured."""

    subject: Subject
    slots: list[Subject]  # [candidate, *distinct references], the order of the timed functions
    kinds: dict[str, int]  # reference kind -> slot
    budgets: list[Budget]  # per slot: the time its windows in this session may take, warm-ups after a restart too
    rounds: dict[str, list[list[list[float]]]] = field(default_factory=dict)  # batch -> round -> slot -> s


def measure_latency(active: list[Subject], refs: dict[tuple[str, str], dict[str, Subject]], x: np.ndarray,
                    cfg: VerifyConfig, bar, worker: Worker) -> None:
    """Paired latency of every loaded row at batch 1 and at cfg.batch against its references, by kind
    (refs[row key]); fills the rows' latency fields. `bar` is the caller's tqdm progress bar.

    One row at a time: its runners and its references' are loaded and warmed, timed in cfg.rounds
    alternating rounds (the order flipped every round), then dropped unless the next row times them too,
    so that the worker's memory is one row's runners, never the whole export's. A runner that outlives
    its budget (cfg.time_limit_s for its warm-up, and per session for its windows) or crashes fails its
    row; the sessions that time it go on without it.
    """
    worker.configure(batches={"b1": np.ascontiguousarray(x[:1]), "batch": x[np.arange(cfg.batch) % len(x)]},
                     threads=cfg.threads)  # torch threads are process-wide in the worker; onnxruntime's per session
    ready = [s for s in active if s.logits is not None and not s.stopped]  # a file verify had to stop runs no more
    sessions = [_session(s, refs[s.row.key], ready, cfg) for s in ready]
    dead: set[int] = set()  # rows whose runner failed while loading or timing
    bar.set_description("verify: latency", refresh=False)
    bar.reset(total=cfg.rounds * len(sessions))
    for i, t in enumerate(sessions):
        bar.set_postfix_str(t.subject.row.label, refresh=False)
        for slot in t.slots:
            if id(slot) not in dead and not _warm(slot, cfg, worker):
                dead.add(id(slot))
        if id(t.subject) not in dead:
            for r in range(cfg.rounds):
                for b in ("b1", "batch"):
                    t.rounds.setdefault(b, []).append(_round(t, b, r % 2 == 1, cfg, worker, dead))
                bar.update()
            if id(t.subject) not in dead:
                _latency_figures(t, refs[t.subject.row.key], cfg, dead)
        following = {id(slot) for slot in sessions[i + 1].slots} if i + 1 < len(sessions) else set()
        for slot in t.slots:
            if id(slot) not in following:
                for handle in slot.timers.values():
                    worker.drop(handle)


def _warm(s: Subject, cfg: VerifyConfig, worker: Worker) -> bool:
    """Load the timing runners and warm them up at every batch size; False (row failed) if they cannot run."""
    if not s.timers:
        assert s.path is not None
        options = runtime.load_options(s.art.format, s.art.runtime)
        s.timers = {b: worker.define(s.path, s.art.format, s.device, cfg.threads, options) for b in ("b1", "batch")}
    try:
        for b, handle in s.timers.items():
            worker.warm(handle, WARMUP_CALLS, Budget(cfg.time_limit_s), b)
    except Failed as exc:
        s.row.fail(exc.reason(s.art.file, f"load and warm-up at batch 1 and {cfg.batch}"))
        return False
    return True


def _round(t: _Session, batch: str, reverse: bool, cfg: VerifyConfig, worker: Worker,
           dead: set[int]) -> list[list[float]]:
    """One round: a window per live slot, back to back (reversed on odd rounds) -> per-call seconds by slot."""
    samples: list[list[float]] = [[] for _ in t.slots]
    for i in reversed(range(len(t.slots))) if reverse else range(len(t.slots)):
        slot = t.slots[i]
        if id(slot) in dead:
            continue
        try:
            samples[i] = worker.window(slot.timers[batch], batch, cfg.window_s, WARMUP_CALLS, t.budgets[i])
        except Failed as exc:
            slot.row.fail(exc.reason(slot.art.file, f"timing at batch 1 and {cfg.batch}"))
            dead.add(id(slot))
    return samples


def _session(s: Subject, refs: dict[str, Subject], ready: list[Subject], cfg: VerifyConfig) -> _Session:
    """Slot the candidate and its distinct, runnable references (a reference can serve two kinds)."""
    slots, kinds = [s], {}
    for kind, ref in refs.items():
        if ref is s or not any(ref is r for r in ready):
            continue  # itself, or a reference that failed
        if not any(ref is slot for slot in slots):
            slots.append(ref)
        kinds[kind] = next(i for i, slot in enumerate(slots) if slot is ref)
    return _Session(s, slots, kinds, [Budget(cfg.time_limit_s) for _ in slots])


def _latency_figures(t: _Session, refs: dict[str, Subject], cfg: VerifyConfig, dead: set[int]) -> None:
    """p50/p90 from all candidate samples; speed-ups and the slower flags from per-round paired ratios.

    A reference that failed while timing is left out: its kinds get no ratio.
    """
    row = t.subject.row
    row.threads, row.batch = cfg.threads, cfg.batch
    samples = {b: timing.by_function(rounds) for b, rounds in t.rounds.items()}
    b1 = timing.flatten(samples["b1"][0])
    row.p50_ms_b1, row.p90_ms_b1 = (1e3 * float(np.percentile(b1, q)) for q in (50, 90))
    row.p50_ms_batch = 1e3 * float(np.median(timing.flatten(samples["batch"][0])))
    row.samples_per_s = cfg.batch / (row.p50_ms_batch / 1e3)
    for kind, slot in t.kinds.items():
        if id(t.slots[slot]) in dead:
            continue
        ratios = {b: timing.round_ratios(per_slot[0], per_slot[slot]) for b, per_slot in samples.items()}
        row.paired[kind] = {"reference": t.slots[slot].row.name, "runtime": t.slots[slot].row.runtime,
                            **{f"ratio_{b}": float(np.median(r)) for b, r in ratios.items()},
                            **{f"rounds_{b}": r for b, r in ratios.items()}}
    for kind in ("torch_fp32", "ort_fp32"):
        for b in samples:
            ratio = 1.0 if refs.get(kind) is t.subject else row.paired.get(kind, {}).get(f"ratio_{b}")
            setattr(row, f"speedup_vs_{kind}_{b}", None if ratio is None else 1.0 / ratio)
    speed_flags(row, cfg)


def speed_flags(row: Row, cfg: VerifyConfig) -> None:
    """The slower flags from the row's paired ratios, by edgeq.policy's rule: the low end of the 99% interval
    of the median ratio (edgeq.evidence) past the limit, at batch 1 or the large batch.

    int8: slower than its fp32 parent by more than cfg.slower_margin (policy.slower). fp32 on CPU: more than
    FP32_SLOWDOWN_LIMIT x slower than the family's fp32 checkpoint run eagerly on CPU. No rule compares
    torch with onnxruntime (legitimately up to 5.2x apart) or CUDA with the CPU baseline. Fewer rounds than
    the interval needs (8) flag nothing: no evidence.
    """
    def low(kind: str) -> float:
        keys = ("b1",) if row.format == "pte" else ("b1", "batch")  # a program's batch is fixed: the deployment's
        return max(evidence.median_interval(row.paired[kind].get(f"rounds_{b}", []))[0] for b in keys)

    if row.precision == "int8" and "parent" in row.paired:
        row.slower_than_parent = policy.slower(low("parent"), cfg.slower_margin)
    if row.precision == "fp32" and row.runtime != CUDA_RUNTIME and "torch_fp32" in row.paired:
        row.slower_than_fp32_baseline = low("torch_fp32") > FP32_SLOWDOWN_LIMIT
