"""A real Ray head on 127.0.0.1 for tests, stopped by process group id (never `ray stop`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """``ray start --head --block`` in its own process group; ``stop()`` kills that group."""

    def __init__(self, num_cpus: int = 2, tmp_dir: Path | None = None) -> None:
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
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
