"""The `edgeq` command line: each command maps its options onto one library call and echoes the result."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

# torch's C++ side prints int8 deprecation notices straight to stderr, where Python's warnings
# filters cannot reach them; users cannot act on them. Must be set before torch is imported.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
from pathlib import Path

import click

from edgeq.errors import EdgeqError


def _fail(exc: EdgeqError) -> None:
    click.echo(f"edgeq: error: {exc}", err=True)
    sys.exit(1)


def _csv(choices: tuple[str, ...]):
    def convert(ctx, param, value):
        if value is None:
            return None
        if value.strip().lower() == "none":
            return ()
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise click.BadParameter(f"{','.join(bad) or value!r} is not one of {', '.join(choices)}")
        return items

    return convert


class _Group(click.Group):
    """click's usage errors (a bad option value, a missing argument) as edgeq's other refusals are: one line
    naming the option and where the help is, exit 1, no usage block."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            if not standalone_mode:
                raise
            where = exc.ctx.command_path if exc.ctx is not None else "edgeq"
            click.echo(f"edgeq: error: {exc.format_message().rstrip('.')}; see `{where} --help`", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            if not standalone_mode:
                raise
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            if not standalone_mode:
                raise
            click.echo("Aborted!", err=True)
            sys.exit(1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeq")
def main() -> None:
    """edgeq: compress a PyTorch model into verified edge artifacts.

    \b
    Example:
      edgeq export --out artifacts
      edgeq verify artifacts
    """


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True,
              help="Output directory: new, empty or a previous edgeq export; replaced atomically when the "
                   "export succeeds.")
@click.option("--force", is_flag=True,
              help="Replace --out even when it holds files that are not a previous edgeq export (they are deleted).")
@click.option("--model", "models", multiple=True, metavar="mlp|cnn|FILE.py:FUNC",
              help="A built-in example (mlp, cnn; repeatable; default both), or your own: FILE.py:FUNC whose "
                   "FUNC() returns the trained torch.nn.Module (needs --data).")
@click.option("--data", "data_spec", default=None, metavar="FILE.py:FUNC",
              help="Your data: FUNC() returns (train, test) or (train, val, test), each (inputs, labels) or a "
                   "Dataset of (input, label), inputs preprocessed as the model takes them; val, when given, takes "
                   "the decisions and test is only reported.")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TOML recipe (edgeq.Recipe); the options below override it.")
@click.option("--variants", default=None, metavar="LIST",
              callback=_csv(("unstructured", "structured", "dynamic", "static", "qat")),
              help="Comma list of variants besides fp32: unstructured, structured, dynamic, static, qat, or none "
                   "(fp32 only). Default: all.")
@click.option("--prune-amount", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Fraction of weights zeroed by unstructured pruning [recipe: 0.8].")
@click.option("--prune-method", type=click.Choice(["l1", "random"]), default=None,
              help="Unstructured pruning criterion: global L1 magnitude, or random [recipe: l1].")
@click.option("--channel-amount", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Fraction of channels removed by structured pruning [recipe: 0.5].")
@click.option("--seed", type=int, default=None, help="Seed for pruning, fine-tunes and calibration [recipe: 0].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads the deployment runs with: int8-vs-fp32 decisions and the ship rule are timed at it "
                   "[recipe: 1].")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 100), default=None, metavar="POINTS",
              help="Accuracy (points) an int8 file may lose against its fp32 parent: more sensitive layers are "
                   "kept in fp32 until it holds, or the file is not shipped [recipe: 0.5].")
@click.option("--max-pruning-drop", type=click.FloatRange(0, 100), default=None, metavar="POINTS",
              help="Accuracy (points) a pruned file may lose against the fp32 model on the validation split: the "
                   "pruning amount is searched down until it holds, or the pruned files are not shipped [recipe: 0.5].")
@click.option("--target", type=click.Choice(["x86", "arm64"]), default=None,
              help="The CPU the files are for: x86 (U8S8 QDQ, reduce_range, torch x86 engine) or arm64 (S8S8 QDQ, "
                   "torch qnnpack) [recipe: this machine's].")
@click.option("--executorch/--no-executorch", "executorch", default=None,
              help="Also build ExecuTorch programs (.pte, XNNPACK) [recipe: yes, when ExecuTorch is installed].")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Built-in examples only: training epochs (default per model).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Built-in examples only: full MNIST in torchvision layout (DIR/MNIST/raw). Default: the "
                   "embedded 5,000 digits.")
@click.option("--download", is_flag=True, help="Built-in examples only: download full MNIST into --data-dir.")
@click.option("--sign-key", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="KEY",
              help="EC private key (PEM) to sign the whole output directory with (OpenSSF model-signing); "
                   "check it with `edgeq verify DIR --public-key PUB`.")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="PLAN",
              help="Rebuild with the decisions of a previous export (its plan.json) instead of timing anything: "
                   "same model, data and recipe give byte-identical files. Without it every decision is measured "
                   "afresh on this machine.")
@click.option("--jobs", type=click.IntRange(min=0), default=None, metavar="N",
              help="Worker processes for the untimed trials (calibration, sensitivity, the accuracy bar): 0 for every "
                   "core, 1 for none. Timed decisions always run alone. No file depends on it [recipe: 0].")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run the untimed trials on this Ray cluster (HOST:PORT, ray://HOST:PORT, auto, or local); also "
                   "RAY_ADDRESS. Needs pip install 'edgeq[ray]'. The files are those of a local export "
                   "(docs/scale.md).")
@click.option("--quiet", is_flag=True, help="No progress bars or stage lines.")
def export(out, force, models, data_spec, recipe_file, variants, prune_amount, prune_method, channel_amount, seed,
           threads, max_accuracy_drop, max_pruning_drop, target, executorch, epochs, data_dir, download, sign_key,
           plan_file, jobs, ray_address, quiet):
    """Prune, quantize and export a model (yours, or a built-in example), then write manifest.json.

    \b
    Example:
      edgeq export --out artifacts --model mlp --prune-amount 0.9
      edgeq export --model my_model.py:build --data my_model.py:load --out artifacts-mine
      edgeq export --plan artifacts/plan.json --out rebuilt
      edgeq export --ray 10.0.0.5:6379 --out artifacts
    """
    from edgeq.build import stage_profile, summary

    try:
        with _key_read_once(sign_key) as key:
            manifest = _export(out, force, models, data_spec, recipe_file, variants, prune_amount, prune_method,
                               channel_amount, seed, threads, {"max_accuracy_drop": max_accuracy_drop,
                                                               "max_pruning_drop": max_pruning_drop, "target": target,
                                                               "executorch": executorch, "jobs": jobs,
                                                               "ray_address": ray_address},
                               epochs, data_dir, download, key, plan_file, quiet)
        if manifest is None or not (out / "manifest.json").is_file():
            raise EdgeqError(f"the export returned without writing {out}/manifest.json; nothing was published")
    except EdgeqError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        from edgeq.bundle import end_interrupted

        sys.exit(end_interrupted(f"edgeq: interrupted; {out} is unchanged"))
    click.echo(summary(manifest))
    click.echo(stage_profile(manifest))
    click.echo(f"wrote {len(manifest.artifacts)} artifacts and manifest.json to {out} "
               f"in {manifest.timings['total_s']:.1f} s")


@contextlib.contextmanager
def _key_read_once(sign_key: Path | None) -> Iterator[Path | None]:
    """--sign-key read once, before any work, into a private temporary copy that the export signs with:
    a pipe (`--sign-key <(cat key.pem)`) can be read only once, and the signature is made at the end."""
    if sign_key is None:
        yield None
        return
    from edgeq import signing

    data = signing.check_private_key(sign_key)  # errors name the user's path
    with signing.key_copy(data) as copy:
        yield copy


def _export(out, force, models, data_spec, recipe_file, variants, prune_amount, prune_method, channel_amount, seed,
            threads, settings, epochs, data_dir, download, sign_key, plan_file, quiet):
    """Options -> Recipe -> one library call: edgeq.compress, or the MNIST example that calls it."""
    from dataclasses import replace

    from edgeq import entrypoint
    from edgeq.errors import ConfigError
    from edgeq.plan import BuildPlan
    from edgeq.recipe import Recipe

    recipe = Recipe.from_file(recipe_file) if recipe_file else None
    plan = BuildPlan.read(plan_file) if plan_file else None  # before any training: a bad plan fails at once
    overrides = _overrides(recipe or Recipe(), variants, prune_amount, prune_method, channel_amount, seed, threads)
    overrides.update({k: v for k, v in settings.items() if v is not None})
    user = [m for m in models if entrypoint.is_spec(m)]
    if user:
        if len(models) > 1:
            raise ConfigError("--model FILE.py:FUNC takes one model; run one export per model")
        if data_spec is None:
            raise ConfigError(f"--model {user[0]} needs --data FILE.py:FUNC returning (train, test) or "
                              "(train, val, test)")
        if epochs is not None or data_dir is not None or download:
            raise ConfigError("--epochs, --data-dir and --download are for the built-in examples; "
                              "train and load your model and data in your own functions")
        import edgeq

        model = entrypoint.call(user[0], "--model")
        data = entrypoint.call(data_spec, "--data")
        if not (isinstance(data, (tuple, list)) and len(data) in (2, 3)):
            raise ConfigError(f"--data {data_spec}: returned {type(data).__name__}"
                              f"{f' of {len(data)}' if isinstance(data, (tuple, list)) else ''}; "
                              "return (train, test) or (train, val, test)")
        name = Path(user[0].rpartition(":")[0]).stem or "model"
        split = {"train": data[0], "test": data[-1], **({"val": data[1]} if len(data) == 3 else {})}
        return edgeq.compress({name: model}, out=out, recipe=replace(recipe or Recipe(), **overrides), force=force,
                              sign_key=sign_key, plan=plan, progress=not quiet, **split)
    from edgeq.examples import mnist

    if data_spec is not None:
        raise ConfigError("--data is for your own model (--model FILE.py:FUNC); the built-in examples use MNIST")
    return mnist.export(out, tuple(models) or mnist.ARCHS, data_dir=str(data_dir) if data_dir else None,
                        download=download, epochs=epochs, recipe_overrides=overrides, recipe=recipe,
                        force=force, sign_key=sign_key, plan=plan, progress=not quiet)


def _overrides(base, variants, prune_amount, prune_method, channel_amount, seed, threads) -> dict:
    """The recipe fields the command line sets explicitly."""
    from dataclasses import replace

    out: dict = {}
    if variants is not None:
        out["variants"] = variants
    if prune_amount is not None or prune_method is not None:
        out["unstructured"] = replace(base.unstructured, **{k: v for k, v in
                                                            (("amount", prune_amount), ("method", prune_method))
                                                            if v is not None})
    if channel_amount is not None:
        out["structured"] = replace(base.structured, amount=channel_amount)
    if seed is not None:
        out["seed"] = seed
    if threads is not None:
        out["threads"] = threads
    return out


def _register_verify() -> None:
    from edgeq.verify.command import verify

    main.add_command(verify)


_register_verify()

if __name__ == "__main__":  # pragma: no cover
    main()
