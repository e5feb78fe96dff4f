"""python -m edgeq.device check DIR | plan DIR: argparse only (click is not on a device).

Every refusal is one line, `edgeq: error: <thing>: <problem>; <fix>`, exit 1: bad option values (the
parser's own errors included), a missing runtime (with the pip command), a report path inside the
bundle, and whatever the check or the plan raises as an EdgeqError.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from edgeq.errors import ConfigError, EdgeqError  # the standard library only

EPILOG_CHECK = """example:
  python -m edgeq.device check artifacts --threads 4 --json check.json
exits 1 with one line per failing file (missing or changed file, golden outputs missing or edited,
an ONNX file onnxruntime cannot load, an output of the wrong shape or off its golden outputs)."""
EPILOG_PLAN = """example:
  python -m edgeq.device plan artifacts --threads 4 --out plan.json
then on the build machine: edgeq export --plan plan.json (rebuilds exactly these decisions)."""
PIP = {"numpy": "numpy", "onnxruntime": "onnxruntime", "onnx": "onnx", "sympy": "sympy", "cryptography": "cryptography"}
DEFAULT_MEMORY_SHARE = 0.25  # of the device's RAM: the memory the check may add after its imports


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one `edgeq: error:` line and exit 1, like every other refusal."""

    def error(self, message: str):  # type: ignore[override]
        print(f"edgeq: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(1)


def whole(low: int, high: int):
    """An argparse type: a whole number in [low, high], refused in one line otherwise (`1e9`, `-5`)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {low} to {high}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low} to {high}")
        return value

    return parse


def positive(unit: str):
    """An argparse type: a finite number > 0 of `unit`, refused in one line otherwise."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit} > 0")
        return value

    return parse


gib, seconds = positive("GiB"), positive("seconds")


def _parser() -> argparse.ArgumentParser:
    from edgeq.device.check import MAX_BATCH, MAX_ROUNDS
    from edgeq.limits import cores

    p = Parser(prog="python -m edgeq.device",
               description="Check an edgeq export on the device, or plan its int8 files there (numpy and "
                           "onnxruntime only).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    c = sub.add_parser("check", help="hashes, signature, golden outputs, speed vs fp32, accuracy",
                       epilog=EPILOG_CHECK, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("directory", type=Path, help="the export folder (holding manifest.json)")
    c.add_argument("--public-key", type=Path, help="PEM public key: check edgeq.sig (needs `cryptography`)")
    c.add_argument("--accuracy", action="store_true", help="also run eval.npz in full")
    c.add_argument("--threads", type=whole(1, cores()),
                   help=f"intra-op threads, 1 to this device's {cores()} (default: the recipe's threads)")
    c.add_argument("--rounds", type=whole(0, MAX_ROUNDS), default=8,
                   help=f"paired timing rounds per int8 file, 0 (no timing) to {MAX_ROUNDS}")
    c.add_argument("--batch", type=whole(1, MAX_BATCH), action="append",
                   help=f"batch size timed, 1 to {MAX_BATCH} (repeatable; default 1)")
    c.add_argument("--optimization", choices=["disable", "basic", "extended", "all"],
                   help="override the manifest's graph optimization level (to measure tolerances)")
    c.add_argument("--memory-limit", type=gib, metavar="GIB",
                   help=f"memory (GiB) the check may add after its imports (default: {DEFAULT_MEMORY_SHARE:g} of "
                        "this device's memory); a file that needs more fails")
    c.add_argument("--time-limit", type=seconds, default=120.0, metavar="SECONDS",
                   help="an ONNX call that takes longer is stopped and fails its file (default: 120)")
    c.add_argument("--json", type=Path, dest="json_path", help="write the JSON report here (outside DIR)")
    c.add_argument("--quiet", action="store_true", help="print only failures and the verdict")
    pl = sub.add_parser("plan", help="time the mixed-precision search here and write a plan to replay",
                        epilog=EPILOG_PLAN, formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("directory", type=Path, help="the export folder (fp32 ONNX files, calibration data)")
    pl.add_argument("--out", type=Path, required=True, help="the plan file to write (outside DIR)")
    pl.add_argument("--threads", type=whole(1, cores()), help="intra-op threads to time at (default: the recipe's)")
    pl.add_argument("--budget", type=float, help="search seconds per model (default: the recipe's search_budget_s)")
    return p


def _output(path: Path, directory: Path, flag: str) -> None:
    from edgeq import bundle

    problem = bundle.output_problem(path, directory)
    if problem is not None:
        raise ConfigError(f"{flag} {path}: {problem}")


def _check(args: argparse.Namespace) -> int:
    from edgeq.device import report
    from edgeq.device.check import CheckConfig, check
    from edgeq.limits import physical_memory_gb

    if args.json_path is not None:
        _output(args.json_path, args.directory, "--json")
    memory = args.memory_limit or round(DEFAULT_MEMORY_SHARE * physical_memory_gb(), 2)
    cfg = CheckConfig(public_key=args.public_key, accuracy=args.accuracy, threads=args.threads, rounds=args.rounds,
                      batches=tuple(args.batch or (1,)), optimization=args.optimization, memory_limit_gb=memory,
                      time_limit_s=args.time_limit)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    result = check(args.directory, cfg, log)
    if not args.quiet:
        print("\n".join(report.summary(result)))
    if args.json_path:
        _write(report.write_json, result, args.json_path)
    for line in result.failure_lines():
        print(line)
    print(report.verdict(result))
    return 0 if result.passed else 1


def _write(write, result, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(result, path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write ({exc.strerror}); choose a writable path") from None


def _plan(args: argparse.Namespace) -> int:
    from edgeq.device.plan import plan

    _output(args.out, args.directory, "--out")
    path = plan(args.directory, args.out, threads=args.threads, budget_s=args.budget,
                log=lambda s: print(s, file=sys.stderr))
    print(f"plan written: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return _check(args) if args.command == "check" else _plan(args)
    except ModuleNotFoundError as exc:
        if exc.name not in PIP:
            raise
        print(f"edgeq: error: {exc.name} is not installed here: `pip install {PIP[exc.name]}` (the version in "
              "manifest.json's environment; docs/device.md)", file=sys.stderr)
        return 1
    except EdgeqError as exc:
        print(f"edgeq: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from edgeq.bundle import end_interrupted

        return end_interrupted("edgeq: interrupted")


if __name__ == "__main__":
    sys.exit(main())
