"""A real Ray head on 127.0.0.1 for tests, stopped by process group id (never `ray stop`)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """``ray start --head --block`` in its own process group; ``stop()`` kills that group."""

    def __init__(self, num_cpus: int = 2, tmp_dir: Path | None = None) -> None:
        self.num_cpus = num_cpus
        self.nodes: list[RayWorkerNode] = []
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # token auth off: a throwaway head on loopback only, for this test session
        env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # keeps 127.0.0.1 as the node address: loopback only
        env.pop("RAY_ADDRESS", None)
        self.env = env
        command = [
            str(BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address", "127.0.0.1", "--port", str(self.port),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--ray-client-server-port", str(free_port()),
            # fixed default ports (e.g. the agent's 52365) would clash with any other Ray on the machine
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
            "--min-worker-port", "20000", "--max-worker-port", "29999",
        ]  # fmt: skip
        if tmp_dir is not None:
            command += ["--temp-dir", str(tmp_dir)]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited: {self.process.stdout.read()[-2000:]}")
            result = subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", self.dashboard], env=self.env, capture_output=True, text=True
            )
            if result.returncode == 0:
                return
            time.sleep(2)
        self.stop()
        raise RuntimeError("the Ray head did not become ready in time")

    def add_worker_node(self, num_cpus: int = 2) -> RayWorkerNode:
        """A second Ray node on this machine (own raylet and ports), joined to this head."""
        node = RayWorkerNode(self, num_cpus)
        self.nodes.append(node)
        return node

    def submit(self, *args: str) -> str:
        """``ray job submit --no-wait``; returns the submission id."""
        command = [str(BIN / "ray"), "job", "submit", "--no-wait", "--address", self.dashboard, "--working-dir", str(REPO), "--", *args]
        for _ in range(30):
            result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120, cwd=REPO)
            if result.returncode == 0:
                break
            if "No available agent" not in result.stdout + result.stderr:
                raise RuntimeError(result.stdout + result.stderr)
            time.sleep(3)
        match = re.search(r"raysubmit_\w+", result.stdout + result.stderr)
        if match is None:
            raise RuntimeError(result.stdout + result.stderr)
        return match.group(0)

    def wait_job(self, job_id: str, timeout: float = 600) -> tuple[str, str]:
        """Wait until the job ends; returns (final status, its logs)."""
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(self.dashboard)
        deadline = time.time() + timeout
        status = client.get_job_status(job_id)
        while not status.is_terminal() and time.time() < deadline:
            time.sleep(2)
            status = client.get_job_status(job_id)
        return str(status.value), client.get_job_logs(job_id)

    def job(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run ``ray job submit --address DASHBOARD --working-dir REPO -- ARGS`` and wait for it."""
        command = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO), "--", *args]
        for _ in range(30):
            result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
            # the head's job agent comes up a little after the dashboard answers
            if result.returncode == 0 or "No available agent" not in result.stdout + result.stderr:
                return result
            time.sleep(3)
        return result

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        _stop_group(self.process)


class RayWorkerNode:
    """A second Ray node on this machine, joined to a :class:`RayHead`.

    ``ray start --address`` refuses to join a head started as a single-machine Ray (which is
    what keeps the head on 127.0.0.1), and with that check lifted it swaps 127.0.0.1 for the
    machine's external address. So the node is started the way Ray's own multi-node tests do
    (``ray._private.node.Node``, as in ``ray.cluster_utils``), by ``python tests/helpers/raycluster.py
    --join GCS_ADDRESS --num-cpus N`` in its own process group.
    """

    def __init__(self, head: RayHead, num_cpus: int) -> None:
        command = [sys.executable, str(Path(__file__)), "--join", head.address, "--num-cpus", str(num_cpus)]
        self.process = subprocess.Popen(command, env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True, cwd=REPO)
        deadline = time.time() + 120
        while time.time() < deadline:  # joined when the cluster counts its CPUs
            if self.process.poll() is not None:
                raise RuntimeError(f"the Ray worker node exited: {self.process.stdout.read()[-2000:]}")
            status = subprocess.run([str(BIN / "ray"), "status", "--address", head.address], env=head.env, capture_output=True, text=True).stdout
            if _total_cpus(status) >= num_cpus + head.num_cpus:
                return
            time.sleep(2)
        self.stop()
        raise RuntimeError("the Ray worker node did not join in time")

    def stop(self) -> None:
        _stop_group(self.process)


def _join(gcs_address: str, num_cpus: int) -> None:
    """Start a Ray worker node on 127.0.0.1 joined to ``gcs_address``; block until killed."""
    import ray._private.node
    import ray._private.parameter
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # 127.0.0.1 stays 127.0.0.1
    params = ray._private.parameter.RayParams(
        gcs_address=gcs_address, node_ip_address="127.0.0.1", num_cpus=num_cpus, num_gpus=0,
        node_manager_port=0, include_log_monitor=False, dashboard_agent_listen_port=free_port(),
        metrics_export_port=free_port(), runtime_env_agent_port=free_port(), min_worker_port=15000, max_worker_port=19999,  # below the ephemeral range free_port() draws from
    )  # fmt: skip
    ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print("joined", flush=True)
    while True:
        time.sleep(3600)


def _total_cpus(status: str) -> float:
    match = re.search(r"[\d.]+/([\d.]+) CPU", status)
    return float(match.group(1)) if match else 0.0


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group of ``process``, then SIGKILL whatever of it is left after 5 s
    (``ray start --block`` takes about 33 s to exit on SIGTERM here, waiting on its own shutdown
    timeouts; the group's SIGKILL leaves no Ray process either: the fixtures check it)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=5)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--join", required=True)
    parser.add_argument("--num-cpus", type=int, default=2)
    arguments = parser.parse_args()
    _join(arguments.join, arguments.num_cpus)
