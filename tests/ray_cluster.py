"""A real two-node Ray cluster on loopback, for tests: `ray start --head` on 127.0.0.2, a second node
on 127.0.0.3, one CPU each, in a private temp dir and HOME, with token authentication.

Each node is started in a session of its own, and Ray's workers stay in their node's session (they
get process groups of their own), so a node is every live process of its session: `kill_worker()`
SIGKILLs them all (a machine lost mid-run) and `stop()` ends both sessions, then checks that no
process of them, and none naming the temp dir, is left. Nothing else on the machine is touched
(never a global `ray stop`).

The fixtures in tests/conftest.py wrap this: `ray_cluster` gives a test the running cluster with
both nodes up and this process's environment set to connect (`cluster.address`), and disconnects
after the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import edgeq
import edgeq.target

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
# labels, as a device farm's nodes carry their target: one no export asks for, and this machine's target
WORKER_RESOURCES = json.dumps({"target:test": 1, f"target:{edgeq.target.here().name}": 1})
OBJECT_STORE_BYTES = 256 * 1024 * 1024  # per node; /dev/shm may be small
START_TIMEOUT_S = 120.0
# SIGTERM first, SIGKILL after this grace: the head's gcs_server, raylet and runtime-env agent outlive a
# SIGTERM for good (here every stop waited out a 5 s grace), the other processes end within 0.5 s
STOP_GRACE_S = 1.0
# The head declares a node dead after 3 missed 1 s health checks (Ray's default: about 15 s).
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                      "RAY_health_check_failure_threshold": "3"}


def ray_available() -> str | None:
    """None when this machine can run the cluster, else one line saying why not."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return "Ray is not installed: pip install 'edgeq[ray]'"
    for ip in (HEAD_IP, WORKER_IP):
        try:
            with socket.socket() as s:
                s.bind((ip, 0))
        except OSError as exc:
            return f"loopback address {ip} is not usable here ({exc})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _sessions_of(sids: set[int]) -> dict[int, str]:
    """Live (not zombie) processes whose session is one of `sids` -> their command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
            if fields[0] != "Z" and int(fields[3]) in sids:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def _naming(text: str) -> dict[int, str]:
    """Live processes whose command line contains `text`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if text in cmd and state != "Z":
                found[int(entry.name)] = cmd
    return found


class RayCluster:
    """Start with `start()`, end with `stop()` (also after a failed start)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="eqray-"))  # short: Ray's socket paths must fit 107 bytes
        self.temp_dir = self.root / "ray"
        self.home = self.root / "home"
        self.home.mkdir()
        self.port = _free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.token = secrets.token_hex(32)
        self.head_sid: int | None = None
        self.worker_sid: int | None = None
        self.head_node = ""
        self.worker_node = ""
        code = [str(Path(edgeq.__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
        self.node_env = {**os.environ, "HOME": str(self.home), "PYTHONPATH": os.pathsep.join(
            code + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]), **self.driver_env(),
            **FAST_HEALTH_CHECKS}
        self.node_env.pop("RAY_ADDRESS", None)
        ray_bin = Path(sys.executable).with_name("ray")
        self.ray = str(ray_bin) if ray_bin.exists() else (shutil.which("ray") or "ray")

    def driver_env(self) -> dict[str, str]:
        """What a process needs in its environment to connect: token authentication and its token."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self) -> RayCluster:
        """The head, then the worker node; returns once both are registered."""
        self.head_sid = self._ray_start(["--head", f"--node-ip-address={HEAD_IP}", f"--port={self.port}",
                                         "--include-dashboard=false", f"--dashboard-port={_free_port()}"], "head")
        self.start_worker()
        return self

    def start_worker(self) -> None:
        """The second node (again, after `kill_worker`)."""
        self.worker_sid = self._ray_start([f"--address={self.address}", f"--node-ip-address={WORKER_IP}",
                                           f"--resources={WORKER_RESOURCES}"], "worker")
        self._wait_for_nodes()

    def _ray_start(self, args: list[str], name: str) -> int:
        """`ray start` in a new session -> the session id its daemons keep."""
        log = self.root / f"{name}.log"
        cmd = [self.ray, "start", *args, "--num-cpus=1", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               f"--object-store-memory={OBJECT_STORE_BYTES}", f"--dashboard-agent-listen-port={_free_port()}",
               f"--metrics-export-port={_free_port()}"]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, env=self.node_env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.root)
        try:
            code = proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            self._end_session(proc.pid)
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"`ray start` ({name}) failed with {code}:\n{tail}")
        return proc.pid

    def _wait_for_nodes(self) -> None:
        """Both nodes alive in the head's view; their ids recorded."""
        code = ("import ray, json; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print(json.dumps([[n['NodeManagerAddress'], n['NodeID']] for n in ray.nodes() if n['Alive']]))"
                % self.address)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            out = subprocess.run([sys.executable, "-c", code], env={**self.node_env, "HOME": str(self.home)},
                                 capture_output=True, text=True, timeout=START_TIMEOUT_S, cwd=self.root)
            alive = dict(json.loads(out.stdout.strip().splitlines()[-1])) if out.returncode == 0 and out.stdout.strip() else {}
            if HEAD_IP in alive and WORKER_IP in alive:
                self.head_node, self.worker_node = alive[HEAD_IP], alive[WORKER_IP]
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ray nodes did not register: {alive or out.stderr[-1000:]}")
            time.sleep(1)

    def processes(self) -> dict[int, str]:
        """Every live process this cluster started."""
        sids = {s for s in (self.head_sid, self.worker_sid) if s}
        return {**_sessions_of(sids), **_naming(str(self.root))}

    def on_worker(self, pid: int) -> bool:
        """Whether a process belongs to the worker node (its session)."""
        try:
            return self.worker_sid is not None and os.getsid(pid) == self.worker_sid
        except OSError:
            return False

    def worker_alive(self) -> bool:
        return bool(self.worker_sid and _sessions_of({self.worker_sid}))

    def kill_worker(self) -> None:
        """SIGKILL every process of the worker node, at once: a machine lost mid-run."""
        if self.worker_sid:
            self._end_session(self.worker_sid, grace_s=0.0)

    def stop_worker(self) -> None:
        """End the worker node as `stop()` ends a node (SIGTERM, then SIGKILL)."""
        if self.worker_sid:
            self._end_session(self.worker_sid, grace_s=STOP_GRACE_S)

    def stop(self) -> None:
        """End both nodes (SIGTERM, then SIGKILL after a grace period), then check that nothing is left."""
        for sid in (self.worker_sid, self.head_sid):
            if sid:
                self._end_session(sid, grace_s=STOP_GRACE_S)
        for _ in range(50):
            left = self.processes()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        left = self.processes()
        shutil.rmtree(self.root, ignore_errors=True)
        if left:
            raise RuntimeError(f"Ray processes left after stop: {left}")

    @staticmethod
    def _end_session(sid: int, grace_s: float = STOP_GRACE_S) -> None:
        """Signal every process of session `sid` (SIGTERM, then SIGKILL) until none is left."""
        deadline = time.monotonic() + grace_s
        sig = signal.SIGTERM if grace_s else signal.SIGKILL
        while True:
            pids = _sessions_of({sid})
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if time.monotonic() > deadline:
                sig = signal.SIGKILL
            if time.monotonic() > deadline + 30:
                raise RuntimeError(f"Ray processes of session {sid} survive SIGKILL: {pids}")
            time.sleep(0.1)

    @contextlib.contextmanager
    def connected_env(self) -> Iterator[None]:
        """This process's environment set to connect (token auth) for the block, restored after it,
        and the Ray connection the block opened closed."""
        saved = {k: os.environ.get(k) for k in (*self.driver_env(), "RAY_ADDRESS")}
        os.environ.update(self.driver_env())
        os.environ.pop("RAY_ADDRESS", None)
        _reload_ray_auth()
        try:
            yield
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Ray reads RAY_AUTH_MODE and the token once, when it is imported: have it read them again (what
    ray.init does itself when it turns token authentication on)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
