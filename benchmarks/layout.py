"""Eager PyTorch in channels-last memory against the usual layout: a training step and an evaluation.

edgeq trains (pruning recovery, QAT) and evaluates a model with depthwise convolutions in channels-last
memory (`edgeq.train.fast_layout`), and leaves other models in the usual layout. This script measures
both layouts on the models of `benchmarks/byom.py` at 3x32x32, at edgeq's fine-tune settings (2 torch
threads, batches of 64; evaluation of 800 samples in batches of 500): alternating rounds, the median
per-round ratio channels-last / usual, and how far the logits of the two layouts are apart (the same
computation, summed in another order; untrained models give tiny logits: pass `--cache` for byom.py's
trained weights where it kept them).

    .venv/bin/python benchmarks/layout.py [--models efficientnet_b0,mobilenet_v2,mobilenet_v3_small,mbconv,resnet18]
        [--cache DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeq.train import has_depthwise

sys.path.insert(0, str(Path(__file__).parent))
import byom  # noqa: E402  (the models and data of benchmarks/byom.py)
from builds import cpu  # noqa: E402


def steps(model, x, y, n: int = 5) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    t0 = time.perf_counter()
    for _ in range(n):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / n


def evaluate(model, x) -> tuple[float, torch.Tensor]:
    model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)])
    return time.perf_counter() - t0, out


def measure(name: str, rounds: int, cache: Path | None) -> dict:
    torch.manual_seed(0)
    train, test = byom.digits_rgb32()
    base = byom.build(name)
    kept = sorted(cache.glob(f"{name}-e*.pt")) if cache is not None else []
    if kept:  # the weights byom.py trained (the logits' difference is then that of a trained model)
        base.load_state_dict(torch.load(kept[0], weights_only=True))
    x, y = torch.from_numpy(train.x[:64].copy()), torch.from_numpy(train.y[:64].copy())
    xv = torch.from_numpy(test.x[:800].copy())
    usual = copy.deepcopy(base)
    last = copy.deepcopy(base).to(memory_format=torch.channels_last)
    steps(usual, x, y, 2), steps(last, x, y, 2)  # warm
    train_r, eval_r, times = [], [], {"usual": [], "last": []}
    for r in range(rounds):
        got = {}
        for which in (("usual", "last") if r % 2 == 0 else ("last", "usual")):
            model = usual if which == "usual" else last
            s = steps(model, x, y)
            e, out = evaluate(model, xv)
            got[which] = (s, e, out)
            times[which].append((s, e))
        train_r.append(got["last"][0] / got["usual"][0])
        eval_r.append(got["last"][1] / got["usual"][1])
    _, a = evaluate(copy.deepcopy(base), xv)
    _, b = evaluate(copy.deepcopy(base).to(memory_format=torch.channels_last), xv)
    return {"model": name, "depthwise": has_depthwise(base), "trained": bool(kept),
            "step_usual": statistics.median(t[0] for t in times["usual"]),
            "step_last": statistics.median(t[0] for t in times["last"]), "step_ratio": statistics.median(train_r),
            "eval_usual": statistics.median(t[1] for t in times["usual"]),
            "eval_last": statistics.median(t[1] for t in times["last"]), "eval_ratio": statistics.median(eval_r),
            "max_logit_diff": float((a - b).abs().max()), "same_top1": float((a.argmax(1) == b.argmax(1)).float().mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet_b0,mobilenet_v2,mobilenet_v3_small,mbconv,resnet18")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=None, help="byom.py's --cache: trained weights, where kept")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    print(f"CPU: {cpu()}; 2 torch threads; {args.rounds} alternating rounds; ratio = channels-last / usual")
    for name in args.models.split(","):
        r = measure(name, args.rounds, args.cache)
        print(f"{name:18s} {'trained' if r['trained'] else 'untrained'} depthwise={'yes' if r['depthwise'] else 'no ':3s} "
              f"train step (64): {r['step_usual']:.3f} -> {r['step_last']:.3f} s, ratio {r['step_ratio']:.2f}; "
              f"eval (800): {r['eval_usual']:.3f} -> {r['eval_last']:.3f} s, ratio {r['eval_ratio']:.2f}; "
              f"logits within {r['max_logit_diff']:.1e}, top-1 {100 * r['same_top1']:.1f}% the same")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
