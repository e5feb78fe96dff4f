"""The latency phase of `verify`: every row timed in alternating windows with its references.

Round r times every row once (its candidate and reference windows back to back) before round r+1
starts, so each row's rounds are spread over the whole phase: a burst of slowness on a shared
machine hits one of them, and the medians (of times and of per-round ratios) discard it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeq import runtime
from edgeq.verify import measure
from edgeq.verify.rows import Subject, VerifyConfig

WARMUP_CALLS = 3  # per runner and batch size: TorchScript re-optimizes on the first calls of a shape


@dataclass
class _Session:
    """One row's latency measurement: the runners timed together and what each round measured."""

    subject: Subject
    slots: list[Subject]  # [candidate, *distinct references], the order of the timed functions
    kinds: dict[str, int]  # reference kind -> slot
    rounds: dict[str, list[list[list[float]]]] = field(default_factory=dict)  # batch -> round -> slot -> s


def measure_latency(active: list[Subject], refs: dict[tuple[str, str], dict[str, Subject]], x: np.ndarray,
                    cfg: VerifyConfig, bar) -> None:
    """Paired latency of every loaded row at batch 1 and at cfg.batch against its references, by kind
    (refs[row key]); fills the rows' latency fields. `bar` is the caller's tqdm progress bar."""
    import torch

    torch.set_num_threads(cfg.threads)  # process-wide; onnxruntime's threads are per session
    batches = {"b1": np.ascontiguousarray(x[:1]), "batch": x[np.arange(cfg.batch) % len(x)]}
    ready = [s for s in active if s.runner is not None and _warm(s, batches, cfg)]
    sessions = [_session(s, refs[s.row.key], ready) for s in ready]
    bar.set_description("verify: latency", refresh=False)
    bar.reset(total=cfg.rounds * len(sessions))
    for r in range(cfg.rounds):
        for t in sessions if r % 2 == 0 else reversed(sessions):
            bar.set_postfix_str(t.subject.row.label, refresh=False)
            fns = [_timing_runner(slot, cfg).run for slot in t.slots]
            for b, xb in batches.items():
                t.rounds.setdefault(b, []).append(measure.timed_round(fns, xb, cfg.window_s, reverse=r % 2 == 1))
            bar.update()
    for t in sessions:
        _latency_figures(t, refs[t.subject.row.key], cfg)


def _warm(s: Subject, batches: dict[str, np.ndarray], cfg: VerifyConfig) -> bool:
    """Build the timing runner and warm it up at every batch size; False (row failed) if it cannot run."""
    try:
        runner = _timing_runner(s, cfg)
        for xb in batches.values():
            measure.warm_up([runner.run], xb, WARMUP_CALLS)
    except Exception as exc:  # a runtime's own error: the accuracy pass worked, timing does not
        s.row.fail(f"{s.art.file}: fails while timing ({runtime.first_line(exc)})")
        return False
    return True


def _session(s: Subject, refs: dict[str, Subject], ready: list[Subject]) -> _Session:
    """Slot the candidate and its distinct, runnable references (a reference can serve two kinds)."""
    slots, kinds = [s], {}
    for kind, ref in refs.items():
        if ref is s or not any(ref is r for r in ready):
            continue  # itself, or a reference that failed
        if not any(ref is slot for slot in slots):
            slots.append(ref)
        kinds[kind] = next(i for i, slot in enumerate(slots) if slot is ref)
    return _Session(s, slots, kinds)


def _latency_figures(t: _Session, refs: dict[str, Subject], cfg: VerifyConfig) -> None:
    """p50/p90 from all candidate samples; speed-ups and the slower flag from per-round paired ratios."""
    row = t.subject.row
    row.threads, row.batch = cfg.threads, cfg.batch
    samples = {b: measure.by_function(rounds) for b, rounds in t.rounds.items()}
    b1 = measure.flatten(samples["b1"][0])
    row.p50_ms_b1, row.p90_ms_b1 = (1e3 * float(np.percentile(b1, q)) for q in (50, 90))
    row.p50_ms_batch = 1e3 * float(np.median(measure.flatten(samples["batch"][0])))
    row.samples_per_s = cfg.batch / (row.p50_ms_batch / 1e3)
    for kind, slot in t.kinds.items():
        ratios = {b: measure.round_ratios(per_slot[0], per_slot[slot]) for b, per_slot in samples.items()}
        row.paired[kind] = {"reference": t.slots[slot].row.name, "runtime": t.slots[slot].row.runtime,
                            **{f"ratio_{b}": float(np.median(r)) for b, r in ratios.items()},
                            **{f"rounds_{b}": r for b, r in ratios.items()}}
    for kind in ("torch_fp32", "ort_fp32"):
        for b in samples:
            ratio = 1.0 if refs.get(kind) is t.subject else row.paired.get(kind, {}).get(f"ratio_{b}")
            setattr(row, f"speedup_vs_{kind}_{b}", None if ratio is None else 1.0 / ratio)
    if row.precision == "int8" and "parent" in row.paired:
        worst = max(row.paired["parent"]["ratio_b1"], row.paired["parent"]["ratio_batch"])
        row.slower_than_parent = worst > 1.0 + cfg.slower_margin


def _timing_runner(s: Subject, cfg: VerifyConfig) -> runtime.Runner:
    """The accuracy runner, except ONNX with threads != 1: a session with cfg.threads, built once.

    torch threads are process-wide (set before timing); onnxruntime's are fixed per session.
    """
    if s.timer is None:
        s.timer = s.runner
        if s.art.format == "onnx" and cfg.threads != 1 and s.path is not None:
            s.timer = runtime.load(s.path, "onnx", threads=cfg.threads, options=s.art.runtime.get("session_options"))
    assert s.timer is not None
    return s.timer
