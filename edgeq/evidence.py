"""The rule behind every timed decision: when a measurement may move a file away from the default.

Every timed decision of an export compares paired ratios (candidate / reference, one per round of
alternating windows: edgeq.timing) with a threshold: keep a layer in fp32 when that is
faster, use per-tensor weight scales when they are faster, drop an int8 file that is slower than
its fp32 parent. The defaults are int8, per-channel and ship. The machines are shared: a burst on
the other core can slow a whole window by 1.3-2x, and the load moves from minute to minute. So:

- Rounds are taken in blocks of `block_rounds`. After each block, every ratio gets a
  distribution-free confidence interval for its median (order statistics of the binomial(n, 1/2)
  law; it assumes nothing about the shape of the noise, whose bursts are heavy-tailed).
- The interval is taken at `confidence` per look. With up to `max_blocks` looks, the chance that
  noise alone makes a departure is at most max_blocks * (1 - confidence) / 2 (Bonferroni over the
  looks, one-sided): 2% with the defaults.
- A departure holds only when the interval of all the rounds so far is past the threshold, AND the
  latest block on its own, taken after the one that first showed it, agrees on its medians: the
  evidence must survive a re-measurement, so a departure needs two blocks at least. One window,
  or one block, under load is never enough.
- The default is kept as soon as the interval rules the departure out, or when `max_blocks`
  blocks have not settled it (a difference too small to tell from noise is no reason to depart).
- No block is taken that cannot change the decision: when even the most favourable ratios the
  blocks left could give (every ratio a departure wants, at its extreme: `favouring`) would not
  make the rule depart at any later look, the default is kept now ("cannot depart"). The decision
  is the one the remaining blocks would give whatever they measured; only their cost is saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

import numpy as np

from edgeq import policy


@dataclass(frozen=True)
class Rule:
    confidence: float = 0.99  # per look, two-sided, for the median of the paired ratios
    block_rounds: int = 8  # rounds per block: with 8, the 99% interval is [min, max] of the block
    max_blocks: int = 4  # then the default stands

    def describe(self) -> dict:
        return {
            "statistic": "median of paired per-round ratios (candidate / reference, alternating windows)",
            "interval": f"distribution-free {self.confidence:.0%} confidence interval of the median "
                        "(binomial order statistics), per look",
            "blocks": f"rounds in blocks of {self.block_rounds}, at most {self.max_blocks} blocks",
            "departure": "the interval over all rounds lies past the threshold, and the latest block alone agrees "
                         "on its medians (at least two blocks: the evidence survives a re-measurement)",
            "default": "kept when the interval rules the departure out, or after the last block",
            "stop": "no further block when no ratios it and the blocks left could give would make the rule depart",
            "false_departure_bound": round(self.max_blocks * (1 - self.confidence) / 2, 4),
        }


RULE = Rule()


def median_interval(values: list[float], confidence: float = RULE.confidence) -> tuple[float, float]:
    """A confidence interval for the median: [x_(k), x_(n+1-k)] with the largest k whose coverage,
    1 - 2 * P(Binomial(n, 1/2) < k), is at least `confidence`. With too few values for that
    coverage the interval is unbounded: no evidence yet."""
    xs = sorted(values)
    n = len(xs)
    k, tail = 0, 0.0
    while k < n // 2:  # grow k while the coverage of [x_(k+1), x_(n-k)] stays >= confidence
        tail_next = tail + math.comb(n, k) / 2 ** n
        if 1 - 2 * tail_next < confidence:
            break
        tail, k = tail_next, k + 1
    if k == 0:
        return -math.inf, math.inf
    return xs[k - 1], xs[n - k]


def fewest_rounds(confidence: float = RULE.confidence) -> int:
    """The fewest paired values whose median has a bounded interval at `confidence` (8 at 99%): with fewer,
    no rule that reads the interval can find anything."""
    n = 1
    while math.isinf(median_interval([0.0] * n, confidence)[0]):
        n += 1
    return n


@dataclass
class Evidence:
    """Paired ratios per key (a batch size, or ('cand_vs_best', batch)), and what they support."""

    ratios: dict = field(default_factory=dict)
    point: bool = False  # judge the medians alone (a block's re-measurement check), no interval
    confidence: float = RULE.confidence

    def add(self, block: Mapping[Hashable, list[float]]) -> None:
        for key, values in block.items():
            self.ratios.setdefault(key, []).extend(float(v) for v in values)

    def median(self, key: Hashable) -> float:
        return float(np.median(self.ratios[key]))

    def lo(self, key: Hashable) -> float:
        return self.median(key) if self.point else median_interval(self.ratios[key], self.confidence)[0]

    def hi(self, key: Hashable) -> float:
        return self.median(key) if self.point else median_interval(self.ratios[key], self.confidence)[1]

    def summary(self) -> dict:
        """What a plan records: rounds, median and interval per key."""
        out = {}
        for key in self.ratios:
            lo, hi = median_interval(self.ratios[key], self.confidence)
            out[_key(key)] = {"median": round(self.median(key), 3),
                              "interval": [_finite(lo), _finite(hi)], "rounds": len(self.ratios[key])}
        return out


def _key(key: Hashable) -> str:
    return "/".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _finite(v: float) -> float | None:
    return round(v, 3) if math.isfinite(v) else None


Verdict = Callable[[Evidence], "bool | None"]  # True: depart from the default; False: keep it; None: undecided


def favouring(verdict: Verdict, high: Callable[[Hashable], bool]) -> Verdict:
    """`verdict`, marked with the side on which each key's ratios favour a departure: `high(key)` True when
    larger ratios can only make it depart sooner, False when smaller ones can. `decide` stops taking blocks
    once even such ratios, at their extreme, could not make it depart. A verdict not marked is never cut short."""
    verdict.favours_high = high  # type: ignore[attr-defined]
    return verdict


def can_still_depart(pooled: Evidence, verdict: Verdict, blocks: int, rule: Rule = RULE,
                     per_block: int | None = None) -> bool:
    """Whether some later look of `decide` could depart: the rounds so far, followed by blocks (of `per_block`
    ratios per key, `rule.block_rounds` by default) in which every ratio is at the extreme that favours a
    departure (0, or infinity: `favouring`), depart at some look of `rule` with a confirming block. False is a
    proof: a verdict monotone in the direction it is marked with departs no sooner on any ratios the blocks
    could really give. True when the verdict is not marked, or a ratio so far is NaN (no order to reason on)."""
    high = getattr(verdict, "favours_high", None)
    if high is None or any(math.isnan(v) for values in pooled.ratios.values() for v in values):
        return True
    n = per_block or rule.block_rounds
    for more in range(1, rule.max_blocks - blocks + 1):
        extreme = {k: [math.inf if high(k) else 0.0] * (more * n) for k in pooled.ratios}
        then = Evidence({k: v + extreme[k] for k, v in pooled.ratios.items()}, confidence=pooled.confidence)
        latest = Evidence({k: v[:n] for k, v in extreme.items()}, point=True)
        if blocks + more >= 2 and verdict(then) and verdict(latest):
            return True
    return False


@dataclass
class Decision:
    depart: bool
    evidence: Evidence
    blocks: int
    settled: str  # "departed" | "ruled out" | "cannot depart" | "undecided: default kept"
    latest: Evidence | None = None  # the last block alone: the re-measurement a departure must agree with

    def summary(self) -> dict:
        """What a plan records: enough to check the decision against the rule again (edgeq.plan)."""
        out = {"blocks": self.blocks, "settled": self.settled, "ratios": self.evidence.summary()}
        if self.latest is not None:
            out["latest_block_medians"] = {_key(k): round(self.latest.median(k), 3) for k in self.latest.ratios}
        return out


def decide(measure_block: Callable[[int], Mapping[Hashable, list[float]]], verdict: Verdict,
           rule: Rule = RULE) -> Decision:
    """Measure blocks of rounds (`measure_block(rounds)` -> ratios per key) until `verdict` departs
    with a confirming block, rules the departure out, no later block can make it depart
    (`can_still_depart`), or `rule.max_blocks` blocks are spent."""
    return decide_each(lambda rounds, names: {None: measure_block(rounds)}, {None: verdict}, rule)[None]


def decide_each(measure_block: Callable[[int, list], Mapping[Hashable, Mapping[Hashable, list[float]]]],
                verdicts: Mapping[Hashable, Verdict], rule: Rule = RULE) -> dict[Hashable, Decision]:
    """`decide` for several decisions whose blocks are measured together (files timed against one parent in
    the same rounds): `measure_block(rounds, names)` -> ratios per key for each name still open; each name is
    settled by its own verdict under `rule`, exactly as `decide` settles it, and leaves the later blocks."""
    pooled = {name: Evidence(confidence=rule.confidence) for name in verdicts}
    settled: dict[Hashable, Decision] = {}
    for blocks in range(1, rule.max_blocks + 1):
        open_ = [n for n in verdicts if n not in settled]
        if not open_:  # every decision settled (or none asked for): no block is timed
            break
        measured = measure_block(rule.block_rounds, open_)
        for name in open_:
            d = _look(pooled[name], measured[name], verdicts[name], blocks, rule)
            if d is not None:
                settled[name] = d
    return settled


def _look(pooled: Evidence, block: Mapping[Hashable, list[float]], verdict: Verdict, blocks: int,
          rule: Rule) -> Decision | None:
    """The rule's look after a decision's `blocks`-th block (added to `pooled`): its Decision, or None when
    another block is to be taken."""
    pooled.add(block)
    v = verdict(pooled)
    latest = Evidence(dict(block), point=True)
    if v is False:
        return Decision(False, pooled, blocks, "ruled out", latest)
    if v and blocks >= 2 and verdict(latest):
        return Decision(True, pooled, blocks, "departed", latest)
    if blocks == rule.max_blocks:
        return Decision(False, pooled, blocks, "undecided: default kept", latest)
    per_block = max([rule.block_rounds, *map(len, block.values())])  # a block may give more than it was asked
    if not can_still_depart(pooled, verdict, blocks, rule, per_block):
        return Decision(False, pooled, blocks, "cannot depart", latest)
    return None


def ship_race(runs: Mapping[int, tuple[Callable, Mapping[Hashable, Callable]]], inputs: Mapping[int, np.ndarray],
              window_s: float, rule: Rule = RULE) -> dict[Hashable, dict]:
    """The ship rule for the files of one parent, timed in the same alternating rounds: at each input `n`,
    `runs[n]` is (the parent's function, {file: its function}), loaded for that input alone. A round is a
    window of the parent, then one of each file still undecided: k files take k + 1 windows a round, not 2k.
    Each file is decided on its own ratios to the parent's window of its round (`decide_each`, `slower_verdict`):
    it ships unless slower beyond the noise margin with confidence, confirmed by a second block. Its functions
    are warmed up before the first block at each input only. -> {file: {ship, latency_vs_parent, evidence}}.
    The exporter (edgeq.speed) and the device plan (edgeq.device.plan) both time with it."""
    from edgeq.timing import first_warm_up, round_ratios, timed_rounds

    warmed: set = set()

    def block(rounds: int, names: list) -> dict:
        out: dict = {name: {} for name in names}
        for n, x in inputs.items():
            ref, files = runs[n]
            samples = timed_rounds([ref, *(files[name] for name in names)], x, rounds, window_s,
                                   warmup_calls=first_warm_up(warmed, n))
            for name, s in zip(names, samples[1:], strict=True):
                out[name][n] = round_ratios(s, samples[0])
        return out

    names = list(next(iter(runs.values()), (None, {}))[1])
    decided = decide_each(block, {name: slower_verdict(tuple(inputs)) for name in names}, rule)
    return {name: {"ship": not d.depart, "latency_vs_parent": {str(n): round(d.evidence.median(n), 3) for n in inputs},
                   "evidence": d.summary()} for name, d in decided.items()}


def slower_verdict(keys: tuple) -> Verdict:
    """The ship rule on paired ratios (file / parent) per key (a batch size): slower when some key's interval
    lies wholly past the noise margin (edgeq.policy); not slower when every key's interval is within it;
    else undecided. The exporter's ship decision and the device plan's both use it."""
    def slower(e: Evidence) -> bool | None:
        if any(policy.slower(e.lo(n)) for n in keys):
            return True
        return False if all(policy.not_slower(e.hi(n)) for n in keys) else None

    return favouring(slower, lambda key: True)  # a larger ratio: a slower file
