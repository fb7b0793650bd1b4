"""The README's Ray Jobs recipe, run as written: a head with token authentication on loopback,
`ray job submit` of the demo, and the one-line refusal of a Python without nucleibatch."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from nucleibatch.output.folder import OutputFolder
from tests.helpers.paths import REPO
from tests.helpers.raycluster import free_port


def readme_recipe() -> list[str]:
    """The command lines of the README's first bash block under "### Ray Jobs" (continuations joined)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Ray Jobs") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README: no bash block under '### Ray Jobs'"
    joined = block.group(1).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_the_readme_recipe_is_the_one_this_test_runs():
    recipe = readme_recipe()
    assert recipe[0] == "source .venv/bin/activate"
    assert "export RAY_AUTH_MODE=token" in recipe
    start = next(line for line in recipe if " ray start --head" in f" {line}")
    assert "--node-ip-address 127.0.0.1" in start and "--dashboard-host 127.0.0.1" in start and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in start
    submit = next(line for line in recipe if line.startswith("ray job submit"))
    assert "--runtime-env cluster/runtime_env.yaml" in submit and "--working-dir ." in submit and "jobs/segment.py" in submit
    assert recipe[-1] == "ray stop"


def _ray_processes(temp_dir: Path) -> list[str]:
    return subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout.split()


@pytest.mark.slow
def test_the_readme_ray_jobs_recipe_runs_the_demo_with_token_authentication(tmp_path):
    """Each line as the README gives it, in bash from the checkout, with HOME in tmp_path (the
    token is generated there). Two changes keep it from touching other Rays on this machine: free
    ports instead of the defaults, a temp dir of its own; and it is stopped by process id, not
    `ray stop` (which stops every Ray of the user)."""
    if not (REPO / ".venv" / "bin" / "activate").exists() or Path(sys.prefix) != REPO / ".venv":
        pytest.skip("the recipe activates the checkout's .venv; run the suite with .venv/bin/python")  # CI does
    home, temp_dir = tmp_path / "home", Path(f"/tmp/nbrecipe{os.getpid()}")  # short: Ray's socket paths are limited
    home.mkdir()
    port, dashboard = free_port(), free_port()
    extra_ports = (
        f" --port {port} --dashboard-port {dashboard} --temp-dir {temp_dir} --ray-client-server-port {free_port()}"
        f" --dashboard-agent-listen-port {free_port()} --dashboard-agent-grpc-port {free_port()}"
        f" --runtime-env-agent-port {free_port()} --metrics-export-port {free_port()} --num-cpus 2"
    )
    lines = []
    for line in readme_recipe()[:-1]:  # all but `ray stop`
        if "ray start --head" in line:
            line += extra_ports
        lines.append(line.replace("127.0.0.1:8265", f"127.0.0.1:{dashboard}"))
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout + done.stderr
        assert (home / ".ray" / "auth_token").stat().st_size > 0
        images = pd.read_parquet(OutputFolder(home / "demo_ray").images)
        assert len(images) == 5 and (images.status == "ok").all()

        # token authentication is on: a client without RAY_AUTH_MODE=token is refused
        refused = subprocess.run(
            [str(REPO / ".venv" / "bin" / "ray"), "job", "list", "--address", f"http://127.0.0.1:{dashboard}"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()
        # and every server of the head listens on loopback only
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout if shutil.which("ss") else ""
        pids = set(_ray_processes(temp_dir))
        exposed = [line for line in listening.splitlines() if any(f"pid={p}," in line for p in pids) and "127.0.0.1" not in line.split()[3]]
        assert exposed == [], exposed
    finally:
        for pid in _ray_processes(temp_dir):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        deadline = time.time() + 20
        while _ray_processes(temp_dir) and time.time() < deadline:
            time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert _ray_processes(temp_dir) == []


def test_a_job_whose_python_lacks_nucleibatch_says_so_in_one_line(tmp_path):
    bare = Path(getattr(sys, "_base_executable", "") or shutil.which("python3") or "")
    check = subprocess.run([str(bare), "-s", "-c", "import nucleibatch"], capture_output=True, cwd=tmp_path)
    if check.returncode == 0:
        pytest.skip(f"{bare} has nucleibatch installed: no Python without it to try")
    for job in ("segment", "train", "evaluate"):
        done = subprocess.run([str(bare), "-s", str(REPO / "jobs" / f"{job}.py"), "in", "-o", "out"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert "cannot import nucleibatch" in lines[0] and "source .venv/bin/activate" in lines[0]
