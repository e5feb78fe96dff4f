"""Hardening, third round, the export side: each test reproduces one attack or fault and asserts the promise.

Real processes where the fault needs one (a SIGKILL between the publish renames followed by a `mkdir -p`
and a SIGTERM mid-build, warnings turned into errors), real file systems (a small tmpfs as TMPDIR), and
plans edited as a file. The tiny model (8 inputs, 3 classes) of tests/test_hardening2.py keeps every
export to seconds; its fixtures and one-line-error helper are shared.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgeq import publish
from edgeq.manifest import sha256_file
from edgeq.plan import BuildPlan
from edgeq.verify import verify
from test_hardening2 import (FAST, USER, _precision_entry, cli, copy, env, export_args, mounted, one_line_error,
                             tiny, user, wait_for)

__all__ = ["tiny", "user"]  # fixtures, shared with tests/test_hardening2.py

MODELS = USER + '''

class Branchy(nn.Module):
    """The answer for one sample depends on the whole batch: its sum picks the branch."""

    def __init__(self):
        super().__init__()
        self.net = build()

    def forward(self, x):
        y = self.net(x)
        return y if x.sum() > 0 else -y


class BatchStats(nn.Module):
    """Inputs normalised by the batch's own mean: batch statistics at inference."""

    def __init__(self):
        super().__init__()
        self.net = build()

    def forward(self, x):
        return self.net(x - x.mean(0, keepdim=True))


class OnnxAtOne(nn.Module):
    """Computes the same in eager PyTorch at every batch, but its ONNX graph answers zeros at batch 1."""

    def __init__(self):
        super().__init__()
        self.net = build()

    def forward(self, x):
        y = self.net(x)
        if torch.onnx.is_in_onnx_export():
            n = torch.ones_like(x[:, :1]).sum()  # the batch size, as a tensor the exporter keeps dynamic
            return y * (n > 1).float()
        return y


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class Custom(nn.Module):
    """A custom autograd.Function: TorchScript cannot save it; ONNX can."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(Square.apply(self.a(x)))


def branchy():
    return Branchy().eval()


def batch_stats():
    return BatchStats().eval()


def onnx_at_one():
    return OnnxAtOne().eval()


def custom():
    return Custom().eval()


def _with(value, sample=3):
    (x, y), test = load()
    x = x.copy()
    x[sample, 2] = value
    return (x, y), test


def hard():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Hardsigmoid(), nn.Linear(16, 3)).eval()


def huge():
    return _with(3e38)


def outlier():
    return _with(1e15)


def val_is_test():
    train, test = load()
    return train, test, test


def val_bad_labels():
    train, test = load()
    return train, (test[0][:8], np.full(8, 5)), test


def val_bad_shape():
    train, test = load()
    return train, (test[0][:8, :6], test[1][:8]), test
'''


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "models.py"
    path.write_text(MODELS)
    return path


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def skipped_of(out: Path) -> dict[str, str]:
    return {s["name"]: s["reason"] for s in manifest_of(out)["skipped"]}


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") and not p.name.endswith(".lock"))


def export_process(user: Path, out: Path, *extra: str, model: str = "build",
                   environment: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgeq", *export_args(user, out, model, *extra)],
                            env=environment or env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_between_renames(user: Path, out: Path, flag: Path) -> None:
    """A real export SIGKILLed between `out -> .out.old-<pid>` and `tmp -> out` (its own pause hook)."""
    proc = export_process(user, out, "--no-executorch", model="wide",  # publishing is the subject, not programs
                          environment={**env(), publish.PAUSE_ENV: str(flag)})
    try:
        wait_for(lambda: flag.exists() or proc.poll() is not None)
        assert flag.exists(), proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()


def mid_build(parent: Path, name: str, pid: int) -> bool:
    """True once the temporary build directory of process `pid` beside `out` holds its first file."""
    return any(p.name.startswith(f".{name}.tmp-{pid}-") and any(p.iterdir()) for p in parent.iterdir())


# item 4: publishing never loses the previous export ---------------------------------------------------


def test_a_kill_between_the_renames_then_mkdir_then_sigterm_keeps_the_previous_export(
        user: Path, tiny: Path, tmp_path: Path) -> None:
    out = copy(tiny, tmp_path / "art")
    before = {p.relative_to(out).as_posix(): sha256_file(p) for p in out.rglob("*") if p.is_file()}
    kill_between_renames(user, out, tmp_path / "paused")
    assert not out.exists() and len([n for n in leftovers(tmp_path, "art") if n.startswith(".art.old-")]) == 1
    out.mkdir()  # what a CI script's `mkdir -p` does next
    proc = export_process(user, out, "--variants", "static", "--no-executorch")
    try:
        wait_for(lambda: mid_build(tmp_path, "art", proc.pid) or proc.poll() is not None)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"{out} is unchanged" in err
    assert {p.relative_to(out).as_posix(): sha256_file(p) for p in out.rglob("*") if p.is_file()} == before
    assert leftovers(tmp_path, "art") == []


SWALLOWS = """
import os, signal, sys, time
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import edgeq
from user import build, load


def finetune(model, data, epochs):  # a caller's code that catches everything, a KeyboardInterrupt too
    try:
        os.kill(os.getpid(), int(sys.argv[3]))
        time.sleep(30)  # the handler's KeyboardInterrupt lands here
    except BaseException:
        print("swallowed", file=sys.stderr)
    return model


train, test = load()
try:
    edgeq.compress(build(), train, test, sys.argv[2], recipe=edgeq.Recipe(variants=("unstructured",), executorch=False),
                   finetune=finetune, log=lambda _: None)
except KeyboardInterrupt:
    sys.exit(130)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_whose_interrupt_is_swallowed_still_stops_the_export(user: Path, tiny: Path, tmp_path: Path,
                                                                      sig) -> None:
    """The signal's KeyboardInterrupt lands in code that swallows it (here the caller's finetune; in the
    wild an import that fails halfway and is caught as an ImportError): the export goes on, but
    publishes nothing and ends interrupted."""
    out = copy(tiny, tmp_path / "art")
    before = {p.relative_to(out).as_posix(): sha256_file(p) for p in out.rglob("*") if p.is_file()}
    script = tmp_path / "swallows.py"
    script.write_text(SWALLOWS)
    proc = subprocess.run([sys.executable, str(script), str(user), str(out), str(int(sig))], env=env(),
                          capture_output=True, text=True, timeout=300,  # SIGINT as a terminal delivers it
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "swallowed" in proc.stderr and proc.returncode == 130, proc.stderr
    assert {p.relative_to(out).as_posix(): sha256_file(p) for p in out.rglob("*") if p.is_file()} == before
    assert leftovers(tmp_path, "art") == []


def test_after_the_interrupted_line_further_signals_do_not_change_the_exit_code(tmp_path: Path) -> None:
    """A second Ctrl-C or SIGTERM while an interrupted command shuts down leaves its exit code at 130."""
    script = ("import os, signal, sys, time\n"
              "from edgeq.bundle import end_interrupted\n"
              "code = end_interrupted('edgeq: interrupted')\n"
              "for sig in (signal.SIGINT, signal.SIGTERM):\n"
              "    os.kill(os.getpid(), sig)\n"
              "time.sleep(0.2)\n"
              "sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130 and proc.stderr == "edgeq: interrupted\n", proc.stderr


def test_an_interrupt_that_left_a_string_exec_still_exits_130_under_python_m(tmp_path: Path) -> None:
    """The SIGTERM's KeyboardInterrupt leaves an exec of a string (as it does when it lands while a library
    defines a dataclass during an import); CPython then marks it unhandled although it is handled, and a
    `python -m` process would end by SIGINT (-2) instead of exiting 130."""
    (tmp_path / "interrupted_in_exec.py").write_text(
        "import sys\n"
        "from edgeq.bundle import end_interrupted, terminate_as_interrupt\n"
        "try:\n"
        "    with terminate_as_interrupt():\n"
        "        exec('import os, signal, time\\nos.kill(os.getpid(), signal.SIGTERM)\\ntime.sleep(30)')\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(end_interrupted('edgeq: interrupted'))\n")
    proc = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and proc.stderr == "edgeq: interrupted\n", (proc.returncode, proc.stderr)


def test_a_sigterm_between_the_renames_puts_the_previous_export_back(user: Path, tiny: Path, tmp_path: Path) -> None:
    out = copy(tiny, tmp_path / "art")
    before = (out / "manifest.json").read_bytes()
    flag = tmp_path / "paused"
    proc = export_process(user, out, "--no-executorch", model="wide",  # publishing is the subject, not programs
                          environment={**env(), publish.PAUSE_ENV: str(flag)})
    try:
        wait_for(lambda: flag.exists() or proc.poll() is not None)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert (out / "manifest.json").read_bytes() == before and leftovers(tmp_path, "art") == []


def test_an_old_copy_is_never_deleted_while_out_holds_no_whole_export(tmp_path: Path, tiny: Path) -> None:
    """A killed run's `.old` stays while `out` holds something else (the user's files); it goes once `out` is
    a whole export again."""
    out = tmp_path / "art"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    old = copy(tiny, tmp_path / f".art.old-{dead_pid()}-abcdefgh")
    publish.clean_stale(out)
    assert (old / "manifest.json").is_file() and (out / "mine.txt").is_file()
    (out / "mine.txt").unlink()  # out is now empty: the old copy goes back in its place
    publish.clean_stale(out)
    assert not old.exists() and (out / "manifest.json").read_bytes() == (tiny / "manifest.json").read_bytes()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(("intruder", "named"), [
    ("golden/NOTES.md", "golden/NOTES.md"),
    ("golden/test_data_set_0/input_0.pb", "golden/test_data_set_0,"),  # the first entry no listed file explains
    ("golden/user-fp32-onnx/extra.pb", "golden/user-fp32-onnx/extra.pb"),
    ("golden/empty-folder/", "golden/empty-folder,"),
])
def test_a_re_export_refuses_unlisted_files_at_any_depth(user: Path, tiny: Path, tmp_path: Path,
                                                          intruder: str, named: str) -> None:
    out = copy(tiny, tmp_path / "art")
    path = out / intruder
    if intruder.endswith("/"):
        path.mkdir()
    else:
        path.parent.mkdir(exist_ok=True)
        path.write_text("mine")
    one_line_error(cli(*export_args(user, out)), f"--out {out}", f"holds {named}", "--force")
    assert path.exists()
    r = cli(*export_args(user, out), "--force", "--no-executorch")  # asked for: replaced (programs: not the subject)
    assert r.exit_code == 0, r.output
    assert not path.exists()


def test_a_symlink_inside_the_golden_folder_is_not_an_export_file(user: Path, tiny: Path, tmp_path: Path) -> None:
    out = copy(tiny, tmp_path / "art")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    target = out / "golden" / "user-fp32-onnx" / "output_0.pb"
    target.unlink()
    target.symlink_to(victim)
    one_line_error(cli(*export_args(user, out)), "golden/user-fp32-onnx/output_0.pb", "not a regular file")
    assert victim.read_text() == "keep"


# item 5: a model whose answer depends on the batch ----------------------------------------------------


@pytest.mark.parametrize("model", ["branchy", "batch_stats"])
def test_a_model_whose_outputs_depend_on_the_batch_is_refused_up_front(models: Path, tmp_path: Path,
                                                                      model: str) -> None:
    out = tmp_path / "art"
    one_line_error(cli(*export_args(models, out, model)), f"model 'models'", "depend on the rest of the batch",
                   "one sample at a time")
    assert not out.exists() and leftovers(tmp_path, "art") == []


def test_an_fp32_file_that_differs_only_at_the_deployment_batch_is_not_shipped(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    r = cli(*export_args(models, out, "onnx_at_one"))
    assert r.exit_code == 0, r.output
    reason = skipped_of(out)["models-fp32-onnx"]
    assert "at the deployment batch of 1" in reason, reason
    assert {a["name"] for a in manifest_of(out)["artifacts"]} >= {"models-fp32-ts", "models-fp32-ckpt"}
    assert not (out / "models-fp32.onnx").exists()


# item 6: extreme training values ---------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "needles"), [
    ("huge", ["train: sample 3 holds 3e+38", "overflow float32 once squared"]),
    ("outlier", ["train: sample 3 holds 1e+15", "times the largest value of a typical sample", "clip"]),
])
def test_extreme_training_values_are_one_line_before_any_work(models: Path, tmp_path: Path, data: str,
                                                              needles: list[str]) -> None:
    out = tmp_path / "art"
    args = export_args(models, out, "build", "--variants", "static", "--no-executorch")
    args[args.index(f"{models}:load")] = f"{models}:{data}"
    one_line_error(cli(*args), *needles)
    assert not out.exists()


# items 7 and 10: a plan replays only into its own target, and never ships against its own evidence -----------


def _plan_with(tiny: Path, tmp_path: Path, edit) -> Path:
    plan = json.loads((tiny / "plan.json").read_text())
    edit(plan["models"]["user"])
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def _x86_entry(fam: dict) -> None:
    fam["precision"]["fp32"] = _precision_entry()  # U8S8, reduce_range, per-tensor: the x86 format


def test_an_x86_plan_relabelled_arm64_does_not_replay_into_an_arm64_export(user: Path, tiny: Path,
                                                                           tmp_path: Path) -> None:
    def relabel(fam: dict) -> None:
        _x86_entry(fam)
        fam["recipe"]["target"] = "arm64"

    path = _plan_with(tiny, tmp_path, relabel)
    out = tmp_path / "art"
    one_line_error(cli(*export_args(user, out, "build", "--target", "arm64", "--plan", path)),
                   f"--plan {path}", "x86 format", "recipe.target is 'arm64'")
    assert not out.exists()

    def honest(fam: dict) -> None:
        _x86_entry(fam)
        fam["recipe"]["target"] = "x86"

    BuildPlan.read(_plan_with(tiny, tmp_path, honest))  # the same decisions under their own target load


def _ship(ship: bool, interval: list, settled: str, latest: float | None, median: float | None = None) -> dict:
    mid = median if median is not None else round(sum(interval) / 2, 3)
    evidence = {"blocks": 4 if settled.startswith("undecided") else 2, "settled": settled,
                "ratios": {"1": {"median": mid, "interval": interval, "rounds": 32}}}
    if latest is not None:
        evidence["latest_block_medians"] = {"1": latest}
    return {"ship": ship, "latency_vs_parent": {"1": mid}, "evidence": evidence}


@pytest.mark.parametrize(("gate", "needle"), [
    (_ship(True, [2.9, 3.1], "departed", 3.0), "departed"),
    (_ship(True, [2.9, 3.1], "undecided: default kept", None), "no last block recorded"),
    (_ship(True, [2.9, 3.1], "undecided: default kept", 3.0), "confirmed by the last block"),
    (_ship(False, [0.9, 1.1], "departed", 1.0), "no batch's interval lies wholly past"),
    ({"ship": True, "latency_vs_parent": {"1": 3.0},
      "evidence": _ship(True, [0.98, 1.02], "ruled out", 1.0, 1.0)["evidence"]}, "median is 1x"),
    ({"ship": True, "latency_vs_parent": {"1": 3.0}}, "no interval recorded"),
], ids=["departed-but-shipped", "slow-no-last-block", "slow-confirmed", "dropped-not-slow", "median-edited",
        "no-evidence"])
def test_a_ship_decision_against_its_own_evidence_is_refused_on_load(user: Path, tiny: Path, tmp_path: Path,
                                                                     gate: dict, needle: str) -> None:
    path = _plan_with(tiny, tmp_path, lambda fam: fam["ships"].update({"user-static-onnx": gate}))
    out = tmp_path / "art"
    one_line_error(cli(*export_args(user, out, "build", "--plan", path)), f"--plan {path}", "user-static-onnx",
                   "contradicts its own recorded timings", needle)
    assert not out.exists()


@pytest.mark.parametrize("gate", [
    _ship(True, [0.97, 1.04], "ruled out", 1.0),
    _ship(True, [1.2, 1.4], "undecided: default kept", 1.0),  # slow overall, not confirmed by the last block
    _ship(False, [1.2, 1.4], "departed", 1.3),
    _ship(True, [0.9, None], "undecided: default kept", 1.1, 1.2),
])
def test_ship_decisions_the_rule_supports_still_load(tiny: Path, tmp_path: Path, gate: dict) -> None:
    BuildPlan.read(_plan_with(tiny, tmp_path, lambda fam: fam["ships"].update({"user-static-onnx": gate})))


def test_a_shipped_int8_file_no_faster_than_its_parent_says_so_and_names_the_ops_it_runs_in_fp32(
        models: Path, tmp_path: Path) -> None:
    """An int8 file whose ship decision read no faster than its parent (within the noise margin: shipped) carries
    a note with the ratio and, for ONNX, the ops onnxruntime runs in fp32 between its int8 layers (here the
    HardSigmoid it has no int8 kernel for); a file read faster carries none. The decisions are replayed from
    an edited plan: no timing of this run decides anything here."""
    first = tmp_path / "first"
    r = cli(*export_args(models, first, "hard"), "--variants", "static")
    assert r.exit_code == 0, r.output
    plan = json.loads((first / "plan.json").read_text())
    ships = plan["models"]["models"]["ships"]
    assert {"models-static-onnx", "models-static-ts", "models-static-pte"} <= set(ships)
    ships["models-static-onnx"] = ships["models-static-pte"] = _ship(True, [0.97, 1.04], "ruled out", 1.0, 1.02)
    ships["models-static-ts"] = _ship(True, [0.75, 0.85], "ruled out", 0.8, 0.8)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    out = tmp_path / "art"
    r = cli(*export_args(models, out, "hard", "--plan", path), "--variants", "static")
    assert r.exit_code == 0, r.output
    arts = {a["name"]: a for a in manifest_of(out)["artifacts"]}
    note = arts["models-static-onnx"]["notes"]
    assert "not faster than its fp32 parent" in note and "1.02x at batch 1" in note, note
    assert "HardSigmoid x1" in note and "between its int8 layers" in note, note
    assert arts["models-static-onnx"]["quantization"]["optimized_ops"].get("HardSigmoid") == 1
    assert "not faster than its fp32 parent" in arts["models-static-pte"]["notes"]  # an ExecuTorch program too
    assert "1.02x at batch 1" in arts["models-static-pte"]["notes"]
    assert arts["models-static-ts"]["notes"] == ""  # read faster: nothing to say


# item 5 of round 2, left over: (a) a custom autograd.Function, (b) a full TMPDIR, (c) warnings as errors -------


def test_a_custom_autograd_function_builds_what_it_can_and_says_why_not_the_rest(
        models: Path, tmp_path: Path, verify_worker) -> None:
    out = tmp_path / "art"
    r = cli(*export_args(models, out, "custom", "--variants", "dynamic", "--no-executorch"))
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "re-run" not in r.output
    skipped = skipped_of(out)
    assert "TorchScript cannot save this model" in skipped["models-fp32-ts"], skipped
    assert "its fp32 parent models-fp32-ts was not shipped" in skipped["models-dynamic-ts"], skipped
    assert "models-fp32-onnx" in {a["name"] for a in manifest_of(out)["artifacts"]}
    result = verify(out, FAST, verify_worker)
    assert result.passed, result.failures


def test_a_full_tmpdir_below_outs_parent_is_named_not_out(user: Path, tmp_path: Path) -> None:
    """TMPDIR mounted inside the folder that holds --out: its files' paths lie under --out's parent, but the
    file system that is full is TMPDIR's."""
    out = tmp_path / "art"
    with mounted(tmp_path / "scratch", "size=256k") as scratch:
        (scratch / "filler").write_bytes(bytes(244 << 10))
        proc = export_process(user, out, "--variants", "static", "--no-executorch",
                              environment={**env(), "TMPDIR": str(scratch)})
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"edgeq: error: TMPDIR {scratch}: no space left"), line
    assert f"--out {out}: no space" not in err
    assert not out.exists() and leftovers(tmp_path, "art") == []


def test_warnings_as_errors_do_not_drop_the_programs_and_the_export_verifies(
        user: Path, tmp_path: Path, verify_worker) -> None:
    from edgeq import pte

    if pte.available() is not None:
        pytest.skip(f"ExecuTorch is not usable here: {pte.available()}")
    out = tmp_path / "art"
    proc = export_process(user, out, environment={**env(), "PYTHONWARNINGS": "error"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "ExecuTorch is not installed" not in err
    assert "user-fp32-pte" in {a["name"] for a in manifest_of(out)["artifacts"]}, skipped_of(out)
    result = verify(out, FAST, verify_worker)
    assert result.passed, result.failures


# the data contract: val named as val, val equal to test, a tiny training part ------------------------------------


@pytest.mark.parametrize(("data", "needle"), [
    ("val_bad_labels", "val labels range over [5, 5]"),
    ("val_bad_shape", "val inputs are [6]"),
])
def test_problems_in_val_are_named_val(models: Path, tmp_path: Path, data: str, needle: str) -> None:
    args = export_args(models, tmp_path / "art")
    args[args.index(f"{models}:load")] = f"{models}:{data}"
    line = one_line_error(cli(*args), needle)
    assert "test" not in line.split(";")[0], line


def test_val_identical_to_test_is_warned_and_recorded(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    args = export_args(models, out)
    args[args.index(f"{models}:load")] = f"{models}:val_is_test"
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "warning: val is the test split" in r.output
    assert manifest_of(out)["dataset"]["val"]["shared_with_test"]["samples"] == 48


def test_a_val_fraction_that_leaves_a_few_training_samples_is_warned(user: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("val_fraction = 0.99\n")
    out = tmp_path / "art"
    r = cli(*export_args(user, out), "--recipe", recipe)
    assert r.exit_code == 0, r.output
    warning = next(line for line in r.output.splitlines() if line.startswith("warning: train split of"))
    assert "fewer than the" in warning and "lower recipe.val_fraction" in warning, warning
    assert manifest_of(out)["dataset"]["train_size"] < 10
