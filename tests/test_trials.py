"""edgeq.trials with real trials: an fp32 ONNX file quantized by onnxruntime and scored, in this
process, in a process pool, and on a real two-node Ray cluster on loopback (tests/ray_cluster.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeq import trials
from edgeq.errors import ConfigError, TrialError
from edgeq.onnx_quant import QDQConfig
from edgeq.trials import Pool, Progress, Workers

CONFIGS = [QDQConfig(per_channel=pc, reduce_range=rr, activations=act)
           for pc in (True, False) for rr in (True, False) for act in ("uint8", "int8")][:6]


def tiny_classifier(seed: int = 0) -> bytes:
    """A small conv classifier (1x8x8 -> 10 logits) as fp32 ONNX bytes, weights from a seed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array(rng.normal(0, s, shape).astype(np.float32), name) for name, shape, s in
               (("w1", (8, 1, 3, 3), 0.5), ("b1", (8,), 0.1), ("w2", (10, 8 * 4 * 4), 0.2), ("b2", (10,), 0.1))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "b2"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def shared() -> dict:
    """What `qdq_accuracy` reads: the fp32 file's bytes, calibration batches, validation arrays, fp32 logits."""
    import onnxruntime as ort

    fp32 = tiny_classifier()
    x = np.random.default_rng(1).normal(0, 1, (256, 1, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    labels = ref.argmax(axis=1)
    labels[::7] = (labels[::7] + 1) % 10  # an fp32 accuracy below 100 %, so that int8 can differ from it
    return {"fp32": fp32, "calibration": [x[:64], x[64:128]], "x": x, "y": labels, "ref": ref}


@pytest.fixture(scope="module")
def expected(shared) -> list[dict]:
    """Every config's metrics, one after the other in this process."""
    return [t.value for t in trials.run(trials.qdq_accuracy, CONFIGS, shared, Workers(jobs=1), progress=False)]


# Trials must be module-level functions: workers import them by name.

def echo(shared, item):
    return item


def fails_on_three(shared, item):
    if item == 3:
        raise ValueError(f"item {item} is bad")
    return item


def dies_once(shared, item):
    """Kills its own worker process the first time it runs (a marker file says it did), then scores."""
    cfg, marker = item
    if marker is not None and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return trials.qdq_accuracy(shared, cfg)


def nap(shared, item):
    time.sleep(item)
    return item


def always_dies(shared, item):
    if item == "die":
        os._exit(3)
    return item


def lands_on_node(shared, item):
    """Records each start (the node it runs on), and on `kill_on` the first time waits there, mid-trial,
    for the test to kill that node."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    log = Path(item["log"])
    with open(log / f"{item['index']}.starts", "a") as f:
        f.write(node + "\n")
    if node == item["kill_on"] and not (log / "mid-trial").exists():
        (log / "mid-trial").write_text(node)
        time.sleep(60)  # killed during this sleep
    return trials.qdq_accuracy(shared, item["cfg"])


# ---------------------------------------------------------------------------------------------------


def test_import_brings_in_no_runtime():
    code = "import sys, edgeq.trials; print(sorted(m for m in ('torch', 'ray', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(trials.__file__).parents[1])})
    assert out.stdout.strip() == "[]"


FIRST_TRIAL = """
import pickle, sys
if sys.argv[2] == "torch first":
    import torch
from edgeq import trials
shared, cfg = pickle.loads(open(sys.argv[1], "rb").read())
value = trials.qdq_accuracy(shared, cfg)
torch_after_trial = "torch" in sys.modules
import onnxruntime.tools
from onnxruntime.tools import infer_input_info
from onnxruntime.tools.pytorch_export_helpers import infer_input_info as helper
whole = infer_input_info is helper and onnxruntime.tools.have_torch is not None
print(pickle.dumps((value, torch_after_trial, whole)).hex())
"""


@pytest.mark.parametrize("first", ["nothing", "torch first"])
def test_an_onnx_trial_in_a_fresh_process_imports_no_torch_and_leaves_onnxruntime_tools_whole(first, shared,
                                                                                                expected, tmp_path):
    """onnxruntime.tools' `__init__` imports torch for a helper quantization does not use: a worker's first ONNX
    trial gives the same scores without importing it, and the helper is still there for whoever asks."""
    import pickle

    data = tmp_path / "trial.pkl"
    data.write_bytes(pickle.dumps((dict(shared), CONFIGS[0])))
    out = subprocess.run([sys.executable, "-c", FIRST_TRIAL, str(data), first], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(Path(trials.__file__).parents[1])})
    value, torch_after_trial, helper_there = pickle.loads(bytes.fromhex(out.stdout.strip().splitlines()[-1]))
    assert value == expected[0]
    assert torch_after_trial == (first == "torch first")
    assert helper_there


@pytest.mark.parametrize("kwargs, says", [
    ({"jobs": 0}, "jobs=0"), ({"jobs": -2}, "jobs=-2"), ({"jobs": 1.5}, "jobs=1.5"), ({"retries": -1}, "retries=-1"),
    ({"ray_address": " "}, "--ray ' '"), ({"resources": {"target:arm64": 1}}, "give a Ray address"),
    ({"ray_address": "local", "resources": {"target:arm64": 0}}, "'target:arm64'"),
])
def test_bad_settings_are_one_line(kwargs, says):
    with pytest.raises(ConfigError) as err:
        Workers(**kwargs)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_results_in_order_and_equal_for_one_and_two_jobs(shared, expected):
    assert len({repr(v) for v in expected}) > 1  # configs that score differently: the order shows
    pooled = trials.run(trials.qdq_accuracy, CONFIGS, shared, Workers(jobs=2), progress=False)
    assert [t.index for t in pooled] == list(range(len(CONFIGS)))
    assert [t.value for t in pooled] == expected
    assert os.getpid() not in {t.pid for t in pooled} and all(t.node == "" for t in pooled)


def test_a_pool_keeps_its_workers_across_runs(shared, expected):
    with Pool(Workers(jobs=2)) as pool:
        first = pool.run(trials.qdq_accuracy, CONFIGS, shared, progress=False)
        backwards = pool.run(trials.qdq_accuracy, CONFIGS[::-1], shared, progress=False)
        other = pool.run(echo, ["a", "b", "c"], {"big": np.zeros(10)}, progress=False)
    assert [t.value for t in first] == expected and [t.value for t in backwards] == expected[::-1]
    assert [t.value for t in other] == ["a", "b", "c"]
    assert {t.pid for t in first + backwards + other} <= {t.pid for t in first} | {t.pid for t in backwards}
    assert len({t.pid for t in first + backwards + other}) <= 2


def test_a_killed_worker_has_its_trial_run_again(shared, expected, tmp_path):
    markers = [str(tmp_path / "killed-once") if i == 2 else None for i in range(len(CONFIGS))]
    out = trials.run(dies_once, list(zip(CONFIGS, markers)), shared, Workers(jobs=2), progress=False)
    assert (tmp_path / "killed-once").exists()  # the trial did kill its worker
    assert [t.value for t in out] == expected


def test_a_trial_that_always_kills_its_worker_is_named():
    with pytest.raises(TrialError) as err:
        trials.run(always_dies, ["a", "die", "c"], None, Workers(jobs=2, retries=1), progress=False)
    message = str(err.value)
    assert message.startswith("trial 2 of 3 ('die'): the worker process running it died 2 times") and "\n" not in message


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_trial_that_raises_stops_the_run_with_its_own_error(jobs):
    with pytest.raises(ValueError, match="item 3 is bad") as err:
        trials.run(fails_on_three, [1, 2, 3, 4], None, Workers(jobs=jobs), progress=False)
    assert "in trial 3 of 4 (3)" in getattr(err.value, "__notes__", [])


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_budget_starts_no_trial_that_would_end_past_it(jobs):
    """Every trial naps 0.3 s: once one has finished, the time spent plus the mean trial is at least 0.6 s,
    past the 0.5 s budget on any machine, so only the trials started before that (one per worker) run, and
    the rest are None in their places. A budget of 0 starts none."""
    out = trials.run(nap, [0.3] * 5, None, Workers(jobs=jobs), progress=False, budget_s=0.5)
    assert [t is not None for t in out] == [True] * jobs + [False] * (5 - jobs)
    assert [t.value for t in out[:jobs]] == [0.3] * jobs
    assert trials.run(nap, [0.3] * 3, None, Workers(jobs=jobs), progress=False, budget_s=0) == [None] * 3


def test_progress_reports_done_total_and_busy_workers():
    seen: list[Progress] = []
    trials.run(echo, list(range(5)), None, Workers(jobs=2), progress=seen.append, what="echo")
    assert seen[-1] == Progress("echo", 5, 5, 0, 2)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert all(0 <= p.busy <= 2 and p.total == 5 for p in seen) and any(p.busy == 2 for p in seen)


def test_progress_off_a_terminal_is_one_line(capsys):
    trials.run(echo, [1, 2], None, Workers(jobs=1), what="calibration")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("calibration: 2 trials in")


def test_a_pool_needs_module_level_functions():
    with pytest.raises(ConfigError, match="module-level function"):
        trials.run(lambda shared, item: item, [1, 2], None, Workers(jobs=2), progress=False)


def test_a_timed_round_waits_for_work_started_beside_it():
    """A job run beside this process (Pool.beside) shares no core with a timed round: the round starts
    after it ends (the worker starts and naps for a second; the round's window is a millisecond)."""
    from edgeq import timing

    with Pool(Workers(jobs=2)) as pool:
        job = pool.beside(nap, 1.0)
        timing.timed_round([lambda x: None], np.zeros(1), 0.001)
        assert job.done() and job.result() == 1.0
        assert job not in timing._BESIDE  # a finished job is not kept (nor the result it holds)


def test_a_timed_round_waits_for_the_workers_a_pool_started():
    """Starting a pool's workers (Pool.start, at an export's beginning) is work beside this process too: a timed
    round starts once every worker has started, its imports done (onnxruntime's library mapped), not while
    they spawn. A second start starts nothing and adds no wait."""
    from edgeq import timing

    with Pool(Workers(jobs=2)) as pool:
        pool.start()
        timing.timed_round([lambda x: None], np.zeros(1), 0.001)
        workers = list(pool._executor._processes)
        assert len(workers) == 2
        for pid in workers:
            assert "onnxruntime_pybind11_state" in Path(f"/proc/{pid}/maps").read_text(), pid
        pool.start()
        assert not timing._BESIDE and list(pool._executor._processes) == workers


def warm_logged() -> None:
    with open(os.environ["EDGEQ_TEST_WARM_LOG"], "a") as log:
        log.write(f"{os.getpid()}\n")


def warm_dies() -> None:
    os._exit(3)  # a worker killed while it imports (out of memory, a crash in native code)


def test_warm_up_runs_on_the_workers_before_a_timed_round_once(tmp_path, monkeypatch):
    """`Pool.warm_up` sends the pool's `warm` to its workers (as many jobs as workers), beside this process: a
    timed round starts once they ran; a second call sends nothing, a restarted pool is warmed again; a worker
    that dies warming up leaves a pool the next run starts afresh; without local workers nothing is sent."""
    from edgeq import timing

    log = tmp_path / "warm.log"
    monkeypatch.setenv("EDGEQ_TEST_WARM_LOG", str(log))  # before the workers spawn: they inherit it
    with Pool(Workers(jobs=2), warm=warm_logged) as pool:
        pool.warm_up()
        timing.timed_round([lambda x: None], np.zeros(1), 0.001)
        pids = log.read_text().split()
        assert len(pids) == 2 and {int(p) for p in pids} <= set(pool._executor._processes)
        pool.warm_up()
        timing.alone()
        assert len(log.read_text().split()) == 2  # once
        pool.restart()
        pool.warm_up()
        timing.alone()
        assert len(log.read_text().split()) == 4
    with Pool(Workers(jobs=2), warm=warm_dies) as pool:
        pool.warm_up()
        timing.alone()
        assert [t.value for t in pool.run(echo, [1, 2], None, progress=False)] == [1, 2]
    with Pool(Workers(jobs=1), warm=warm_logged) as pool:
        pool.warm_up()
        assert pool._executor is None and len(log.read_text().split()) == 4


def test_a_job_beside_runs_on_a_worker_and_one_whose_worker_died_leaves_a_pool_that_restarts():
    from concurrent.futures.process import BrokenProcessPool

    assert Pool(Workers(jobs=1)).beside(echo, 1) is None  # no local worker: the caller runs it
    with Pool(Workers(jobs=2)) as pool:
        assert pool.beside(echo, "x").result() == "x"
        job = pool.beside(always_dies, "die")
        with pytest.raises(BrokenProcessPool):
            job.result()
        pool.restart()
        assert [t.value for t in pool.run(echo, [1, 2], None, progress=False)] == [1, 2]
        assert pool.beside(echo, "y").result() == "y"


def imported(shared, name: str) -> dict:
    """A job that reports what its worker had imported before it ran (this file imports none of these at its
    top), its parent process, and two of its environment variables."""
    return {"modules": [m for m in ("torch", "onnx", "executorch.exir") if m in sys.modules], "parent": os.getppid(),
            "env": os.environ.get(name), "threads": os.environ.get("OMP_NUM_THREADS")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_fork_from_edgeqs_own_servers_that_imported_their_runtimes_and_take_this_processs_environment(
        monkeypatch):
    """Local workers are forked from a server of edgeq's own (edgeq.forkserver), which outlives a pool and forks
    with one thread: for a pool whose workers lower programs (a `warm`, as the export's), one that imported torch,
    onnx and ExecuTorch's lowering once; for the others, one that imported onnx and not torch. Each worker takes
    this process's environment variables as they are when its pool starts, not the server's: a variable set after
    the server started reaches the next pool's workers, one removed is gone from them. The process-wide
    `forkserver` start method is left alone: no server of its own, and none of edgeq's preloads."""
    import multiprocessing.forkserver

    from edgeq import forkserver, pte

    name = "EDGEQ_TEST_POOL_ENV"
    monkeypatch.setenv(name, "before")
    values = []
    for change in (lambda: None, lambda: monkeypatch.setenv(name, "after the server started"),
                   lambda: (monkeypatch.delenv(name), monkeypatch.setenv("OMP_NUM_THREADS", "7"))):
        change()
        with Pool(Workers(jobs=2), warm=pte.import_lowering) as pool:
            values += [t.value for t in pool.run(imported, [name, name], None, progress=False)]
    with Pool(Workers(jobs=2)) as pool:
        light = [t.value for t in pool.run(imported, [name, name], None, progress=False)]
    servers = {forkserver.server_pid(forkserver.LOWERING), forkserver.server_pid(forkserver.ONNX)}
    assert {v["parent"] for v in values} == {forkserver.server_pid(forkserver.LOWERING)}
    assert {v["parent"] for v in light} == {forkserver.server_pid(forkserver.ONNX)}
    assert len(servers) == 2 and os.getpid() not in servers
    assert all(len(os.listdir(f"/proc/{pid}/task")) == 1 for pid in servers)
    assert all(v["modules"] == ["torch", "onnx", "executorch.exir"] for v in values)
    assert all(v["modules"] == ["onnx"] for v in light)
    assert [v["env"] for v in values + light] == ["before"] * 2 + ["after the server started"] * 2 + [None] * 4
    assert {v["threads"] for v in values + light} == {"1"}  # the worker's own count, whatever this process's
    process_wide = multiprocessing.forkserver._forkserver
    assert process_wide._forkserver_pid is None and process_wide._preload_modules == ["__main__"]


def held_then_scored(shared, item):
    """Says it started (a file named with its index and pid), waits for the test's "go" file, then scores."""
    folder, index, cfg = item
    Path(folder, f"started-{index}-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while not Path(folder, "go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return trials.qdq_accuracy(shared, cfg)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_fork_server_killed_mid_run_is_started_again_and_the_trials_in_flight_run_again(shared, expected, tmp_path):
    """The server's exit looks to a pool like the death of its workers: they are stopped, and their trials run
    again, on workers forked from a new server, with the results of one process."""
    from edgeq import forkserver

    def kill_when_both_started() -> None:
        while len(list(tmp_path.glob("started-*"))) < 2:
            time.sleep(0.02)
        os.kill(forkserver.server_pid(forkserver.ONNX), signal.SIGKILL)
        (tmp_path / "go").touch()

    with Pool(Workers(jobs=2)) as pool:
        assert [t.value for t in pool.run(echo, [1, 2], None, progress=False)] == [1, 2]
        first = forkserver.server_pid(forkserver.ONNX)
        killer = threading.Thread(target=kill_when_both_started)
        killer.start()
        got = pool.run(held_then_scored, [(str(tmp_path), i, cfg) for i, cfg in enumerate(CONFIGS[:2])], shared,
                       progress=False)
        killer.join()
    assert [t.value for t in got] == expected[:2]
    assert forkserver.server_pid(forkserver.ONNX) not in (None, first)
    first_workers = {int(p.name.split("-")[2]) for p in tmp_path.glob("started-*")} - {t.pid for t in got}
    assert len(first_workers) == 2  # the two killed mid-trial, then these trials' new workers
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in first_workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in first_workers)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_its_running_server_cannot_fork_is_one_error_and_the_server_is_left_alone(monkeypatch):
    """Where the server runs but a fork request fails (here: the request's connection refused), the pool's run
    raises WorkerStartError (a TrialError: one line from the CLI) instead of waiting, and the server, whose other
    workers depend on it, is neither stopped nor replaced: the next pool uses it."""
    import multiprocessing.forkserver

    from edgeq import forkserver

    with Pool(Workers(jobs=2)) as pool:
        assert [t.value for t in pool.run(echo, [1], None, progress=False)] == [1]
    running = forkserver.server_pid(forkserver.ONNX)

    def refused(self, fds):
        raise ConnectionRefusedError("refused by the test")

    monkeypatch.setattr(multiprocessing.forkserver.ForkServer, "connect_to_new_process", refused)
    with Pool(Workers(jobs=2)) as pool, pytest.raises(forkserver.WorkerStartError, match="did not fork"):
        pool.run(echo, [1], None, progress=False)
    from edgeq import timing

    with Pool(Workers(jobs=2)) as pool:  # started ahead: the failed start ends the timed rounds' wait for it
        pool.start()
        (started,) = timing._BESIDE
        started.result(timeout=60)  # done once the start failed (about 2 s), not after WORKER_START_S (120 s)
    monkeypatch.undo()
    assert forkserver.server_pid(forkserver.ONNX) == running and Path(f"/proc/{running}").exists()
    assert issubclass(forkserver.WorkerStartError, TrialError)
    with Pool(Workers(jobs=2)) as pool:
        assert [t.value for t in pool.run(echo, [2], None, progress=False)] == [2]
    assert forkserver.server_pid(forkserver.ONNX) == running


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_workers_and_their_server_end_when_the_process_that_started_them_is_killed(tmp_path):
    """A process killed with its pool open (SIGKILL: it closes nothing) leaves no worker waiting on its queue, and
    no fork server kept alive by them."""
    (tmp_path / "starter_jobs.py").write_text("import os\n\ndef pid_of(shared, item):\n    return os.getpid()\n")
    script = tmp_path / "starter.py"
    script.write_text(
        "import time\n"
        "from edgeq import forkserver, pte\n"
        "from edgeq.trials import Pool, Workers\n"
        "from starter_jobs import pid_of\n"
        "pool = Pool(Workers(jobs=2), warm=pte.import_lowering)\n"
        "workers = {t.value for t in pool.run(pid_of, [1, 2, 3, 4], None, progress=False)}\n"
        "print(forkserver.server_pid(), *workers, flush=True)\n"
        "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
    finally:
        proc.kill()
        proc.wait()
    assert len(pids) >= 2  # the server, then the workers that ran the trials

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has ended
        except (FileNotFoundError, IndexError):
            return False

    deadline = time.monotonic() + 60
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(running, pids))


def scratch_of(shared, item):
    return str(trials.scratch_dir())


def test_pool_workers_remove_their_scratch_folders_when_the_pool_closes():
    """A worker's scratch folder (`shared_file`'s copies of models) is gone once its pool is closed, for workers
    forked from either server (they end without running atexit)."""
    from edgeq import pte

    folders = []
    for warm in (None, pte.import_lowering):
        with Pool(Workers(jobs=2), warm=warm) as pool:
            folders += [t.value for t in pool.run(scratch_of, [1, 2], None, progress=False)]
            assert all(Path(f).is_dir() for f in folders[-2:])
    assert folders and not any(Path(f).exists() for f in folders)


def test_a_script_without_a_main_guard_runs_once_whatever_its_pool_starts(tmp_path):
    """A user's script that starts a pool at its top level, with no `if __name__ == "__main__"` guard, is not run
    again in the workers (forked from edgeq's server, as in a pool started ahead, `Pool.start`)."""
    log = tmp_path / "runs.log"
    script = tmp_path / "user_script.py"
    script.write_text(
        "import operator, os\n"
        "from edgeq.trials import Pool, Workers\n"
        f"open({str(log)!r}, 'a').write(str(os.getpid()) + '\\n')\n"
        "with Pool(Workers(jobs=2)) as pool:\n"
        "    pool.start()\n"
        "    print([t.value for t in pool.run(operator.getitem, ['a', 'b'], {'a': 1, 'b': 2}, progress=False)])\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "[1, 2]", done.stderr
    assert len(log.read_text().split()) == 1


def test_shared_file_writes_bytes_once_per_content():
    a, b = b"model one", b"model two"
    path = trials.shared_file(a, ".onnx")
    assert path.read_bytes() == a and path.suffix == ".onnx"
    assert trials.shared_file(a, ".onnx") == path == trials.shared_file(bytes(bytearray(a)), ".onnx")
    assert trials.shared_file(b, ".onnx") != path


def test_scratch_of_a_killed_process_is_removed_by_the_next_one():
    code = "import os, edgeq.trials as t; print(t.shared_file(b'weights', '.onnx').parent, flush=True); os._exit(0)"
    env = {**os.environ, "PYTHONPATH": str(Path(trials.__file__).parents[1])}

    def scratch_of_a_process_that_exits_without_cleaning_up() -> Path:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        return Path(out.stdout.strip())

    first = scratch_of_a_process_that_exits_without_cleaning_up()
    assert first.exists()  # os._exit: no exit handler ran
    second = scratch_of_a_process_that_exits_without_cleaning_up()
    assert not first.exists() and second.exists()
    subprocess.run([sys.executable, "-c", "import edgeq.trials as t; t.scratch_dir()"], check=True, env=env)
    assert not second.exists()


@pytest.mark.slow
def test_ray_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    with pytest.raises(ConfigError, match=r"^--ray local: Ray is not installed; pip install 'edgeq\[ray\]'$"):
        trials.run(echo, [1], None, Workers(ray_address="local"), progress=False)


def test_an_unreachable_ray_address_is_one_line():
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'edgeq[ray]'")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=rf"^--ray 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}"):
        trials.run(echo, [1], None, Workers(ray_address=f"127.0.0.1:{port}"), progress=False)


def test_workers_are_values():
    a, b = Workers(ray_address="h:1", resources={"target:arm64": 1}), Workers(ray_address="h:1", resources={"target:arm64": 1.0})
    assert a == b and hash(a) == hash(b) and len({a, b, Workers()}) == 2
    with pytest.raises(TypeError):
        a.resources["target:x86"] = 1  # read-only


def test_workers_from_env_reads_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert Workers.from_env(jobs=2).ray_address == "10.0.0.5:6379"
    assert Workers.from_env(ray_address="local").ray_address == "local"
    monkeypatch.delenv("RAY_ADDRESS")
    assert Workers.from_env().backend == "pool" and Workers(jobs=1).backend == "serial"


# --------------------------------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_trials_run_on_both_nodes_with_the_local_results(ray_cluster, shared, expected):
    out = trials.run(trials.qdq_accuracy, CONFIGS, shared, Workers(ray_address=ray_cluster.address), progress=False)
    assert [t.value for t in out] == expected
    assert {t.node for t in out} == {ray_cluster.head_node, ray_cluster.worker_node}


@pytest.mark.slow
def test_ray_trials_needing_a_label_run_on_the_labelled_node(ray_cluster, shared, expected):
    labelled = Workers(ray_address=ray_cluster.address, resources={"target:test": 1})
    out = trials.run(trials.qdq_accuracy, CONFIGS[:2], shared, labelled, progress=False)
    assert [t.value for t in out] == expected[:2] and {t.node for t in out} == {ray_cluster.worker_node}
    with pytest.raises(ConfigError, match=r"no node offers target:arm64 1 .*--resources"):
        trials.run(echo, [1], None, Workers(ray_address=ray_cluster.address, resources={"target:arm64": 1}),
                   progress=False)


@pytest.mark.slow
def test_ray_trial_that_raises_stops_the_run_with_its_own_error(ray_cluster):
    with pytest.raises(ValueError, match="item 3 is bad") as err:
        trials.run(fails_on_three, [1, 2, 3, 4], None, Workers(ray_address=ray_cluster.address), progress=False)
    assert "in trial 3 of 4 (3)" in getattr(err.value, "__notes__", [])


# The tests that end the worker node come last: the test after one starts it again (4 s).
@pytest.mark.slow
def test_ray_worker_node_killed_mid_trial_still_gives_the_local_results(ray_cluster, shared, expected, tmp_path):
    worker_sid = ray_cluster.worker_sid
    items = [{"index": i, "cfg": cfg, "log": str(tmp_path), "kill_on": ray_cluster.worker_node}
             for i, cfg in enumerate(CONFIGS)]

    def kill_when_mid_trial() -> None:
        deadline = time.monotonic() + 120
        while not (tmp_path / "mid-trial").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        ray_cluster.kill_worker()

    killer = threading.Thread(target=kill_when_mid_trial, daemon=True)
    killer.start()
    out = trials.run(lands_on_node, items, shared, Workers(ray_address=ray_cluster.address), progress=False)
    killer.join(timeout=5)
    assert [t.value for t in out] == expected
    starts = [(tmp_path / f"{i}.starts").read_text().split() for i in range(len(items))]
    killed = [i for i, nodes in enumerate(starts) if ray_cluster.worker_node in nodes]
    assert len(killed) == 1, starts  # the worker node's one CPU held the trial that waited there
    assert starts[killed[0]] == [ray_cluster.worker_node, ray_cluster.head_node]  # killed there, run again
    assert out[killed[0]].node == ray_cluster.head_node
    assert not ray_cluster.worker_alive() and worker_sid == ray_cluster.worker_sid  # none of its processes left


@pytest.mark.slow
def test_ray_stopping_a_node_leaves_none_of_its_processes(ray_cluster):
    from ray_cluster import _sessions_of

    sid = ray_cluster.worker_sid
    assert _sessions_of({sid})
    ray_cluster.stop_worker()
    assert not _sessions_of({sid})  # a later test's `ray_cluster` starts it again
