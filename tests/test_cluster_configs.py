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

import nucleibatch
from nucleibatch.cli import build_parser
from nucleibatch.runtime.allocator import ALLOCATOR_ENV
from tests.helpers.paths import REPO

CLUSTER = REPO / "cluster"
YAMLS = sorted(CLUSTER.glob("*.yaml"))
COMMAND_FILES = [*YAMLS, CLUSTER / "README.md", CLUSTER / "dask_slurm.py"]
SUBCOMMANDS = ("segment", "train", "evaluate")
# the node image: built from the repository's Dockerfile, tagged with the package version
IMAGE = re.compile(r"^[\w.-]+(?::\d+)?/(?:[\w.-]+/)*nucleibatch:" + re.escape(nucleibatch.__version__) + "$")
MIN_CPUS_PER_GPU = 12  # post-processing needs about 12-18 CPUs per GPU to keep it busy
MAX_GIB_PER_CPU = 6


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
            assert (REPO / "jobs" / f"{subcommand}.py").is_file(), where
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
    autoscaled = spec.get("enableInTreeAutoscaling") is True
    for group in gpu_groups:
        limits = [c["resources"]["limits"] for c in group["template"]["spec"]["containers"]]
        assert all(int(limit["nvidia.com/gpu"]) >= 1 for limit in limits)  # GPUs are set as limits on Kubernetes
        for limit in limits:  # sized for post-processing beside each GPU
            gpus, cpus = int(limit["nvidia.com/gpu"]), _quantity(limit["cpu"])
            assert cpus >= MIN_CPUS_PER_GPU * gpus, f"{group['groupName']}: {cpus} CPUs for {gpus} GPU(s)"
            assert _quantity(limit["memory"]) <= MAX_GIB_PER_CPU * 2**30 * cpus, f"{group['groupName']}: memory {limit['memory']} for {cpus} CPUs"
    for group in spec["workerGroupSpecs"]:
        replicas = group.get("replicas", 1)
        if autoscaled:  # a range that KubeRay's autoscaler honours
            assert group["minReplicas"] <= replicas <= group["maxReplicas"] and group["minReplicas"] < group["maxReplicas"]
        else:  # without the autoscaler only replicas counts: min / max, where given, must not promise a range
            assert group.get("minReplicas", replicas) == replicas == group.get("maxReplicas", replicas), (
                f"{group['groupName']}: minReplicas / maxReplicas need enableInTreeAutoscaling: true"
            )
    for name, pod in _pod_specs(spec).items():
        claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert mounts.get("/data") in claims, f"{name}: no shared PVC mounted at /data"
        for container in pod["containers"]:
            assert IMAGE.match(container["image"]), f"{name}: image {container['image']} is not the Dockerfile's nucleibatch:{nucleibatch.__version__}"


def _quantity(value) -> float:
    """A Kubernetes quantity (``"16"``, ``"500m"``, ``"64Gi"``, ``"8G"``) as a number (bytes for memory)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


def test_kuberay_raycluster_has_a_cpu_head_and_a_gpu_worker_group():
    cluster = _one("kuberay-raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    _check_ray_cluster_spec(cluster["spec"])
    # its worker group scales between minReplicas and maxReplicas: KubeRay's autoscaler is on
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert set(cluster["spec"].get("autoscalerOptions", {})) <= {"idleTimeoutSeconds", "upscalingMode", "resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext"}


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
    assert words[:4] == ["python", "-m", "nucleibatch", job]  # the package of the image: no working dir needed
    args = _subparsers()[job].parse_args(words[4:])  # a real parse: values and required options
    assert args.output.startswith("/data/")
    if job == "segment":
        assert (args.engine, args.device) == ("ray", "cuda") and all(i.startswith("/data/") for i in args.inputs)
    else:
        assert args.gpu and args.workers >= 1 and all(d.startswith("/data/") for d in args.data)
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "working_dir" not in runtime_env  # nothing to upload or to find in the image: the entrypoint is the package's
    assert {key: runtime_env["env_vars"].get(key) for key in ALLOCATOR_ENV} == ALLOCATOR_ENV
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


def test_runtime_env_sets_the_allocator_variables_of_allocator_py():
    """The job's workers start with glibc's settings of nucleibatch/runtime/allocator.py (the one source of
    their values), as the workers that the engines start themselves do."""
    env_vars = _one("runtime_env.yaml")["env_vars"]
    assert {key: env_vars.get(key) for key in ALLOCATOR_ENV} == ALLOCATOR_ENV


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
        assert node_type["resources"]["CPU"] >= MIN_CPUS_PER_GPU * node_type["resources"]["GPU"]
    # every node runs the image (torch, Ray and nucleibatch inside): nothing of them installed on the nodes
    assert IMAGE.match(config["docker"]["image"]), config["docker"]["image"]
    setup = "\n".join(config["setup_commands"] + config["worker_setup_commands"] + config["head_setup_commands"])
    assert not re.search(r"pip install .*(torch|nucleibatch|ray\[)", setup)
    # the shared filesystem is mounted on the hosts and bound into the containers at the same path
    assert any("mount -t nfs4" in c and "/shared" in c for c in config["initialization_commands"])
    assert "--volume /shared:/shared" in config["docker"]["run_options"]
    assert any("--head" in c for c in config["head_start_ray_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard stays on the head's loopback"
    assert not any("dashboard-host=0.0.0.0" in c for c in config["worker_start_ray_commands"])


def test_dask_slurm_script_compiles_and_shows_help_without_dask_jobqueue(tmp_path):
    script = CLUSTER / "dask_slurm.py"
    py_compile.compile(str(script), cfile=str(tmp_path / "dask_slurm.pyc"), doraise=True)
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    for flag in ("--jobs", "--queue", "--walltime", "-o"):
        assert flag in result.stdout
    text = script.read_text()
    for needle in ('"--resources", "GPU=1"', '"--gres=gpu:1"', 'engine = "dask"', "run_segment(", "--engine dask --address tcp://"):
        assert needle in text


def _dask_slurm():
    """cluster/dask_slurm.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("dask_slurm", CLUSTER / "dask_slurm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dask_slurm_passes_segment_options_through_to_segment(tmp_path):
    """Options the script does not define reach `nucleibatch segment`'s own argument parsing,
    wherever they stand; the script's own options stay its own."""
    parse = _dask_slurm().parse_arguments
    own, segment = parse([
        str(tmp_path), "-o", str(tmp_path / "out"), "--jobs", "3", "--model", "he", "--block-size", "1024",
        "--queue", "gpu", "--pixel-size", "0.325", "--tta", "on", "--retry-failed", "--json", "--prologue", "module load cuda",
    ])  # fmt: skip
    assert (own.jobs, own.queue, own.prologue, own.cores, own.memory) == (3, "gpu", ["module load cuda"], 16, "64GB")
    assert segment.inputs == [str(tmp_path)] and segment.output == str(tmp_path / "out")
    assert (segment.model, segment.block_size, segment.pixel_size, segment.tta) == ("he", 1024, 0.325, "on")
    assert segment.retry_failed and segment.json and not segment.overwrite
    assert (segment.engine, segment.device, segment.address) == ("dask", "cuda", None)  # the address: the scheduler's, once it runs
    assert parse([str(tmp_path), "-o", "out", "--device", "cpu"])[1].device == "cpu"  # --device cuda unless given
    # the segment arguments are exactly those `nucleibatch segment` parses
    reference = build_parser().parse_args(["segment", str(tmp_path), "-o", "out", "--model", "he", "--device", "cuda", "--engine", "dask"])
    assert vars(parse([str(tmp_path), "-o", "out", "--model", "he"])[1]) == vars(reference)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["IN", "-o", "OUT", "--engine", "ray"], "--engine is set by this script"),
        (["IN", "-o", "OUT", "--address=tcp://h:8786"], "--address is set by this script"),
        (["IN", "-o", "OUT", "--block-size", "big"], "argument --block-size: invalid int value"),
        (["IN", "-o", "OUT", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["IN", "--jobs", "2"], "the following arguments are required: -o/--output"),
        (["IN", "-o", "OUT", "--jobs", "two"], "argument --jobs: invalid int value"),
    ],
)
def test_dask_slurm_refuses_bad_options_before_submitting_anything(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        _dask_slurm().parse_arguments(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_dask_slurm_commands_in_the_docs_parse():
    """`python cluster/dask_slurm.py ...` as cluster/README.md and the script's docstring show it."""
    parse = _dask_slurm().parse_arguments
    found = 0
    for path in (CLUSTER / "README.md", CLUSTER / "dask_slurm.py"):
        text = re.sub(r"\\\n\s*", " ", path.read_text())
        for match in re.finditer(r"python\s+cluster/dask_slurm\.py([^\n`#]*)", text):
            own, segment = parse(shlex.split(match[1]))
            assert segment.inputs and segment.output and own.jobs >= 1
            found += 1
    assert found >= 3


@pytest.mark.skipif(importlib.util.find_spec("dask_jobqueue") is not None, reason="dask-jobqueue is installed")
def test_dask_slurm_script_says_how_to_install_dask_jobqueue(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(CLUSTER / "dask_slurm.py"), str(tmp_path), "-o", str(out), "--jobs", "1"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert "pip install dask-jobqueue" in result.stderr
    assert not out.exists()  # nothing was started or written
