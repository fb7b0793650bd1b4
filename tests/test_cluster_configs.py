"""The deployment files in cluster/: they parse, their commands name real entrypoints and flags,
and the clusters they describe have the shape the engines need (CPU head, GPU workers)."""

from __future__ import annotations

import argparse
import importlib.util
import py_compile
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nucleibatch.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml"))
COMMAND_FILES = [*YAMLS, CLUSTER / "README.md", CLUSTER / "dask_slurm.py"]
SUBCOMMANDS = ("segment", "train", "evaluate")


def _documents(path: Path) -> list:
    with open(path) as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def _one(name: str) -> dict:
    [doc] = _documents(CLUSTER / name)
    return doc


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _commands(text: str) -> list[tuple[str, str]]:
    """(subcommand, argument text) of every `python jobs/X.py ...` and `nucleibatch X ...` in text.

    Shell continuations (a trailing backslash, also inside # comments) are joined; a command
    ends at the end of its line, a backtick, ';', '|' or '&'."""
    text = re.sub(r"\\\n\s*(?:#\s*)?", " ", text)
    found = [(m[1], m[2]) for m in re.finditer(r"python\s+jobs/(\w+)\.py([^\n`;|&]*)", text)]
    found += [(m[1], m[2]) for m in re.finditer(r"\bnucleibatch\s+(segment|train|evaluate)\b([^\n`;|&]*)", text)]
    return found


def _flags(arguments: str) -> list[str]:
    return re.findall(r"(?:^|\s)(--?[A-Za-z][\w-]*)", arguments)


def test_cluster_folder_has_the_deployment_files():
    names = {p.name for p in CLUSTER.iterdir()}
    for expected in (
        "README.md", "runtime_env.yaml", "ray-cluster.yaml", "kuberay-raycluster.yaml", "kuberay-pvc.yaml",
        "kuberay-rayjob-segment.yaml", "kuberay-rayjob-train.yaml", "dask_slurm.py",
    ):  # fmt: skip
        assert expected in names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_yaml_parses(path):
    docs = _documents(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)


def test_commands_name_existing_entrypoints_and_real_flags():
    subparsers = _subparsers()
    options = {name: {s for a in sub._actions for s in a.option_strings} for name, sub in subparsers.items()}
    seen: dict[str, int] = {}
    for path in COMMAND_FILES:
        commands = _commands(path.read_text())
        seen[path.name] = len(commands)
        for subcommand, arguments in commands:
            where = f"{path.name}: {subcommand} {arguments.strip()}"
            assert (ROOT / "jobs" / f"{subcommand}.py").is_file(), where
            assert subcommand in subparsers, where
            unknown = [f for f in _flags(arguments) if f not in options[subcommand]]
            assert not unknown, f"{where}: unknown flags {unknown}"
    # the check is not vacuous: the files that show commands have them
    for name in ("README.md", "dask_slurm.py", "runtime_env.yaml", "kuberay-rayjob-segment.yaml", "kuberay-rayjob-train.yaml"):
        assert seen[name] > 0, f"no command found in cluster/{name}"
    readme = {sub for sub, _ in _commands((CLUSTER / "README.md").read_text())}
    assert {"segment", "train"} <= readme


def _pod_specs(cluster_spec: dict) -> dict[str, dict]:
    pods = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]}
    for group in cluster_spec["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def _gpus(pod: dict) -> list:
    return [
        c.get("resources", {}).get(kind, {}).get("nvidia.com/gpu")
        for c in pod["containers"]
        for kind in ("requests", "limits")
    ]


def _check_ray_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert not any(_gpus(head["template"]["spec"])), "the head group must not request GPUs"
    assert str(head.get("rayStartParams", {}).get("num-gpus", "0")) == "0"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if any(_gpus(g["template"]["spec"]))]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in gpu_groups:
        limits = [c["resources"]["limits"] for c in group["template"]["spec"]["containers"]]
        assert all(int(limit["nvidia.com/gpu"]) >= 1 for limit in limits)  # GPUs are set as limits on Kubernetes
        assert group.get("minReplicas", 0) <= group.get("replicas", 1) <= group.get("maxReplicas", group.get("replicas", 1))
    for name, pod in _pod_specs(spec).items():
        claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert mounts.get("/data") in claims, f"{name}: no shared PVC mounted at /data"
        for container in pod["containers"]:
            assert container["image"]


def test_kuberay_raycluster_has_a_cpu_head_and_a_gpu_worker_group():
    cluster = _one("kuberay-raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    _check_ray_cluster_spec(cluster["spec"])


def test_kuberay_pvc_is_shared_and_used_by_the_pods():
    pvc = _one("kuberay-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob-segment.yaml", "kuberay-rayjob-train.yaml"):
        text = (CLUSTER / name).read_text()
        assert f"claimName: {pvc['metadata']['name']}" in text, name


@pytest.mark.parametrize("job", ["segment", "train"])
def test_kuberay_rayjobs_run_their_entrypoint_on_a_gpu_cluster(job):
    from ray.runtime_env import RuntimeEnv

    rayjob = _one(f"kuberay-rayjob-{job}.yaml")
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["python", f"jobs/{job}.py"]
    args = _subparsers()[job].parse_args(words[2:])  # a real parse: values and required options
    assert args.output.startswith("/data/")
    if job == "segment":
        assert (args.engine, args.device) == ("ray", "cuda") and all(i.startswith("/data/") for i in args.inputs)
    else:
        assert args.gpu and args.workers >= 1 and all(d.startswith("/data/") for d in args.data)
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    working_dir = runtime_env.pop("working_dir")
    assert working_dir.startswith("/") or "://" in working_dir  # a path inside the image, or a URI
    assert set(runtime_env) <= RuntimeEnv.known_fields
    RuntimeEnv(**runtime_env)  # Ray's own validation of the other fields' values (the path exists only in the image)
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    if "rayClusterSpec" in spec:
        _check_ray_cluster_spec(spec["rayClusterSpec"])
        if job == "train":  # enough GPU workers for --workers N --gpu
            replicas = sum(g.get("replicas", 1) for g in spec["rayClusterSpec"]["workerGroupSpecs"] if any(_gpus(g["template"]["spec"])))
            assert replicas >= args.workers


def test_runtime_env_has_only_valid_fields():
    from ray.runtime_env import RuntimeEnv

    runtime_env = _one("runtime_env.yaml")
    assert set(runtime_env) <= RuntimeEnv.known_fields, set(runtime_env) - RuntimeEnv.known_fields
    assert set(runtime_env) <= {"env_vars", "pip", "uv", "conda", "excludes", "working_dir", "py_modules", "py_executable", "container", "image_uri", "config", "worker_process_setup_hook", "java_jars"}
    RuntimeEnv(**runtime_env)
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values())


def test_ray_launcher_config_is_valid_with_a_cpu_head_and_gpu_workers():
    from ray.autoscaler._private.util import validate_config

    config = _one("ray-cluster.yaml")
    validate_config(config)  # Ray's JSON schema of cluster-launcher configs
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU", 0) >= 1
    gpu_types = {name: t for name, t in types.items() if name != config["head_node_type"] and t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker node type"
    for node_type in gpu_types.values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
    setup = "\n".join(config["setup_commands"])
    assert re.search(r"pip install .*torch==\d", setup), "torch (CUDA build) is pinned in the setup commands"
    assert "nucleibatch" in setup
    assert any("--head" in c for c in config["head_start_ray_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard stays on the head's loopback"
    assert not any("dashboard-host=0.0.0.0" in c for c in config["worker_start_ray_commands"])


def test_dask_slurm_script_compiles_and_shows_help_without_dask_jobqueue(tmp_path):
    script = CLUSTER / "dask_slurm.py"
    py_compile.compile(str(script), cfile=str(tmp_path / "dask_slurm.pyc"), doraise=True)
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for flag in ("--jobs", "--queue", "--walltime", "-o"):
        assert flag in result.stdout
    text = script.read_text()
    for needle in ('"--resources", "GPU=1"', '"--gres=gpu:1"', 'engine="dask"', "closing_summary", "--engine dask --address tcp://"):
        assert needle in text


@pytest.mark.skipif(importlib.util.find_spec("dask_jobqueue") is not None, reason="dask-jobqueue is installed")
def test_dask_slurm_script_says_how_to_install_dask_jobqueue(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(CLUSTER / "dask_slurm.py"), str(tmp_path), "-o", str(out), "--jobs", "1"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "pip install dask-jobqueue" in result.stderr
    assert not out.exists()  # nothing was started or written
