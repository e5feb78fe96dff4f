"""What running accuracy trials in parallel costs and saves (edgeq.trials), on this machine.

Figures:
- Ray: `ray.init(address="local", num_cpus=N, include_dashboard=False)` start time, and a warm
  task's cost (one at a time, and per trial through `edgeq.trials.run` over a batch);
- the local pool: start-up of N workers (a no-op trial each), and a one-shot run's cold cost;
- the share of a core a pool worker got during its trials (its CPU time over its wall time: 1.0 on
  a quiet machine);
- a batch of real trials (`edgeq.trials.qdq_accuracy`: the MNIST CNN's fp32 ONNX file quantized by
  onnxruntime with 16 QDQ settings, each scored on 800 validation digits) with 1 worker (in this
  process), with N workers started for the run (cold), with N workers of a `Pool` that ran the
  batch once already (warm), and on Ray; the N-worker / 1-worker wall ratio of each. The values
  must be identical whatever ran them: the script stops if they are not.

Wall times on a shared machine drift with its load (printed with the figures): each batch is timed
`--repeats` times, alternating the subjects, and the median is reported.

    .venv/bin/python benchmarks/trials.py [--jobs 2] [--repeats 3] [--no-ray] [--ray-temp-dir DIR] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgeq import trials
from edgeq.environment import cpu_info
from edgeq.trials import Pool, Workers

CALIBRATION = 256  # training digits, in batches of 64
VALIDATION = 800


def nothing(shared, item):
    return item


def qdq_timed(shared, cfg):
    """`qdq_accuracy`, with the trial's CPU time and wall time: their ratio is the share of a core the
    worker got, which the machine's other load decides."""
    wall, cpu = time.perf_counter(), time.process_time()
    trials.qdq_accuracy(shared, cfg)
    return time.process_time() - cpu, time.perf_counter() - wall


def importable():
    """This file as an importable module (`trials`, from the script's folder on `sys.path`): a local pool's
    workers take their trials from it, as edgeq.trials hides a script's `__main__` from them."""
    import importlib

    return importlib.import_module(Path(__file__).stem) if __name__ == "__main__" else sys.modules[__name__]


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def build_shared(work: Path) -> dict:
    """The MNIST CNN (one epoch on the embedded digits), its fp32 ONNX file and the arrays a trial reads."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from edgeq.examples import mnist
    from edgeq.export import export_onnx

    train, val, _ = mnist.splits(mnist.load_embedded())
    model = mnist.train_model("cnn", train, epochs=1, progress=False)
    path = export_onnx(model, work / "cnn.onnx", torch.from_numpy(train.x[:1]))
    x = np.ascontiguousarray(val.x[:VALIDATION])
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    calibration = [np.ascontiguousarray(train.x[i : i + 64]) for i in range(0, CALIBRATION, 64)]
    return {"fp32": path.read_bytes(), "calibration": calibration, "x": x, "y": val.y[:VALIDATION], "ref": ref}


def configs() -> list:
    from edgeq.onnx_quant import QDQConfig

    return [QDQConfig(per_channel=pc, reduce_range=rr, activations=act, calibrate_method=method)
            for method in ("MinMax", "Percentile") for pc in (True, False) for rr in (True, False)
            for act in ("uint8", "int8")]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="workers of the parallel runs (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timings of each batch (default 3)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray figures")
    parser.add_argument("--ray-temp-dir", help="Ray's session folder root (default Ray's, /tmp/ray)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()

    fig: dict = {"cpu": cpu_info()["model"], "cores": trials.available_cores(), "jobs": args.jobs, "load_before": load()}
    print(f"cpu: {fig['cpu']}, {fig['cores']} cores; load average {fig['load_before']}")
    with tempfile.TemporaryDirectory() as tmp:
        shared = build_shared(Path(tmp))
    items = configs()
    print(f"batch: {len(items)} quantize-and-score trials (MNIST CNN, {VALIDATION} digits each)")

    bench = importable()
    fig["pool_start_s"], _ = timed(lambda: trials.run(bench.nothing, list(range(args.jobs)), None,
                                                       Workers(jobs=args.jobs), progress=False))
    print(f"pool start-up ({args.jobs} workers, a no-op trial each): {fig['pool_start_s']:.2f} s")

    expected = [t.value for t in trials.run(trials.qdq_accuracy, items[:1], shared, Workers(jobs=1), progress=False)]
    walls: dict[str, list[float]] = {"serial": [], "cold": [], "warm": []}
    with Pool(Workers(jobs=args.jobs)) as pool:
        pool.run(trials.qdq_accuracy, items, shared, progress=False)  # the pool's workers import their runtimes
        for r in range(args.repeats):
            subjects = {
                "serial": lambda: trials.run(trials.qdq_accuracy, items, shared, Workers(jobs=1), progress=False),
                "cold": lambda: trials.run(trials.qdq_accuracy, items, shared, Workers(jobs=args.jobs), progress=False),
                "warm": lambda: pool.run(trials.qdq_accuracy, items, shared, progress=False),
            }
            for name in (list(subjects) if r % 2 == 0 else list(subjects)[::-1]):
                wall, out = timed(subjects[name])
                walls[name].append(wall)
                values = [t.value for t in out]
                if name == "serial" and r == 0:
                    expected = values
                elif values != expected:
                    raise SystemExit(f"{name}: values differ from the 1-worker run")
        times = [t.value for t in pool.run(bench.qdq_timed, items, shared, progress=False)]
    fig["core_share"] = round(sum(c for c, _ in times) / sum(w for _, w in times), 2)
    serial = statistics.median(walls["serial"])
    for name, label in (("serial", "1 worker (in this process)"), ("cold", f"{args.jobs} workers, started for the run"),
                        ("warm", f"{args.jobs} workers of a warm Pool")):
        fig[f"{name}_s"] = statistics.median(walls[name])
        fig[f"{name}_runs_s"] = [round(w, 2) for w in walls[name]]
        ratio = fig[f"{name}_s"] / serial
        fig[f"{name}_ratio"] = round(ratio, 3)
        print(f"{label}: {fig[f'{name}_s']:.2f} s (runs {fig[f'{name}_runs_s']}), ratio to 1 worker {ratio:.2f}")

    print(f"share of a core a pool worker got during its trials (CPU time / wall time): {fig['core_share']:.2f}")
    if not args.no_ray:
        ray_figures(fig, args, shared, items, expected)
    fig["load_after"] = load()
    print(f"load average after: {fig['load_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(fig, indent=2) + "\n")


def ray_figures(fig: dict, args, shared: dict, items: list, expected: list) -> None:
    """A local Ray cluster of `jobs` CPUs: its start, a warm task, and the batch on it."""
    import ray

    extra = {"_temp_dir": args.ray_temp_dir} if args.ray_temp_dir else {}
    fig["ray_start_s"], _ = timed(lambda: ray.init(address="local", num_cpus=args.jobs, include_dashboard=False,
                                                   logging_level="ERROR", **extra))
    print(f"ray.init(address='local', num_cpus={args.jobs}): {fig['ray_start_s']:.2f} s")
    try:
        task = ray.remote(num_cpus=1)(nothing)
        ray.get([task.remote(None, i) for i in range(2 * args.jobs)])  # workers up
        n = 200
        wall, _ = timed(lambda: [ray.get(task.remote(None, i)) for i in range(n)])
        fig["ray_task_ms"] = round(1000 * wall / n, 2)
        print(f"a warm Ray task, one at a time: {fig['ray_task_ms']:.2f} ms")
        local = Workers(ray_address="local")
        trials.run(nothing, list(range(n)), None, local, progress=False)
        wall, _ = timed(lambda: trials.run(nothing, list(range(n)), None, local, progress=False))
        fig["ray_trial_ms"] = round(1000 * wall / n, 2)
        print(f"a no-op trial through edgeq.trials.run on Ray, {n} in a batch: {fig['ray_trial_ms']:.2f} ms each")
        trials.run(trials.qdq_accuracy, items, shared, local, progress=False)  # Ray's workers import their runtimes
        walls, serial_walls = [], []
        for r in range(args.repeats):  # alternating with the 1-worker batch: the load changes meanwhile
            for name in ("ray", "serial") if r % 2 == 0 else ("serial", "ray"):
                on = local if name == "ray" else Workers(jobs=1)
                wall, out = timed(lambda: trials.run(trials.qdq_accuracy, items, shared, on, progress=False))
                (walls if name == "ray" else serial_walls).append(wall)
                if [t.value for t in out] != expected:
                    raise SystemExit(f"{name}: values differ from the 1-worker run")
        fig["ray_s"], fig["ray_runs_s"] = statistics.median(walls), [round(w, 2) for w in walls]
        fig["ray_serial_runs_s"] = [round(w, 2) for w in serial_walls]
        fig["ray_ratio"] = round(fig["ray_s"] / statistics.median(serial_walls), 3)
        print(f"{args.jobs} Ray workers (local cluster, warm): {fig['ray_s']:.2f} s (runs {fig['ray_runs_s']}; "
              f"1 worker meanwhile {fig['ray_serial_runs_s']}), ratio to 1 worker {fig['ray_ratio']:.2f}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
