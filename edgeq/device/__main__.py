"""python -m edgeq.device check DIR | plan DIR: argparse only (click is not on a device)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgeq.errors import EdgeqError

EPILOG_CHECK = """example:
  python -m edgeq.device check artifacts --threads 4 --json check.json
exits 1 with one line per failing file (missing or changed file, golden outputs missing or edited,
an ONNX file onnxruntime cannot load, an output of the wrong shape or off its golden outputs)."""
EPILOG_PLAN = """example:
  python -m edgeq.device plan artifacts --threads 4 --out plan.json
then on the build machine: edgeq export --plan plan.json (rebuilds exactly these decisions)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgeq.device",
                                description="Check an edgeq export on the device, or plan its int8 files there "
                                            "(numpy and onnxruntime only).")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="hashes, signature, golden outputs, speed vs fp32, accuracy",
                       epilog=EPILOG_CHECK, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("directory", type=Path, help="the export folder (holding manifest.json)")
    c.add_argument("--public-key", type=Path, help="PEM public key: check edgeq.sig (needs `cryptography`)")
    c.add_argument("--accuracy", action="store_true", help="also run eval.npz in full")
    c.add_argument("--threads", type=int, help="intra-op threads (default: the recipe's threads)")
    c.add_argument("--rounds", type=int, default=8, help="paired timing rounds per int8 file; 0 skips timing")
    c.add_argument("--batch", type=int, action="append", help="batch size timed (repeatable; default 1)")
    c.add_argument("--optimization", choices=["disable", "basic", "extended", "all"],
                   help="override the manifest's graph optimization level (to measure tolerances)")
    c.add_argument("--json", type=Path, dest="json_path", help="write the JSON report here")
    c.add_argument("--quiet", action="store_true", help="print only failures and the verdict")
    pl = sub.add_parser("plan", help="time the mixed-precision search here and write a plan to replay",
                        epilog=EPILOG_PLAN, formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("directory", type=Path, help="the export folder (fp32 ONNX files, calibration data)")
    pl.add_argument("--out", type=Path, required=True, help="the plan file to write")
    pl.add_argument("--threads", type=int, help="intra-op threads to time at (default: the recipe's threads)")
    pl.add_argument("--budget", type=float, help="search seconds per model (default: the recipe's search_budget_s)")
    return p


def _check(args: argparse.Namespace) -> int:
    from edgeq.device.check import CheckConfig, check

    if args.threads is not None and args.threads < 1:
        raise EdgeqError(f"--threads must be >= 1, got {args.threads}")
    cfg = CheckConfig(public_key=args.public_key, accuracy=args.accuracy, threads=args.threads,
                      rounds=max(args.rounds, 0), batches=tuple(args.batch or (1,)), optimization=args.optimization)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    result = check(args.directory, cfg, log)
    if not args.quiet:
        flags = ", ".join(result.cpu["int8_flags"]) or "no int8 flags"
        print(f"{result.cpu['model']} ({result.cpu['machine']}, {flags})"
              f"{'; ' + result.cpu['emulated'] if 'emulated' in result.cpu else ''}; onnxruntime "
              f"{result.runtime['onnxruntime']}")
        for f in result.files:
            parts = [f"{f.status:<11} {f.file}"]
            if f.fidelity:
                parts.append(f"golden: logit error {f.fidelity['max_logit_error']:.2g}, top-1 "
                             f"{f.fidelity['top1_agreement']:.4f}{' (bit-equal)' if f.fidelity['bit_equal'] else ''}")
            if f.speed:
                parts += [f"{b}: {s['ratio']:.2f}x {f.speed['vs']}" for b, s in f.speed["batches"].items()]
            if f.accuracy:
                parts.append(f"accuracy {f.accuracy['accuracy']:.4f} (manifest {f.accuracy['manifest_accuracy']})")
            if f.note:
                parts.append(f.note)
            print("  " + "; ".join(parts))
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    for line in result.failure_lines():
        print(line)
    checked = sum(f.status == "ok" for f in result.files)
    print(f"{'passed' if result.passed else 'failed'}: {checked} files checked, "
          f"{sum(f.status == 'failed' for f in result.files)} failed, "
          f"{sum(f.status == 'not_checked' for f in result.files)} not checked here ({result.seconds:.1f} s)")
    return 0 if result.passed else 1


def _plan(args: argparse.Namespace) -> int:
    from edgeq.device.plan import plan

    path = plan(args.directory, args.out, threads=args.threads, budget_s=args.budget,
                log=lambda s: print(s, file=sys.stderr))
    print(f"plan written: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _check(args) if args.command == "check" else _plan(args)
    except EdgeqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
