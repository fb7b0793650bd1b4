"""glibc allocator settings (nucleibatch/runtime/allocator.py), each checked in a child process: the
settings are process-wide and only take full effect before threads start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

FORWARD_PASSES = textwrap.dedent(
    """
    import json, resource, sys, threading
    from nucleibatch.runtime.allocator import tune_allocator
    tuned = tune_allocator()
    import numpy as np
    from nucleibatch import load_model
    from nucleibatch.model import forward_batch

    model = load_model("default", precision="float32")  # the fault counts below are float32 activations
    batch = np.random.default_rng(0).random((4, 1, 256, 320), dtype=np.float32)
    outputs = []

    def run():  # on a thread, as segment's model runs
        for _ in range(2):  # warm-up: the heap grows to the network's working set
            forward_batch(model.network, batch, model.device, False, bf16=False)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(6):
            output = forward_batch(model.network, batch, model.device, False, bf16=False)
        outputs.extend([output, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    faults = outputs.pop()
    np.save(sys.argv[1], outputs[-1])
    print(json.dumps({"tuned": tuned, "faults_per_pass": faults / 6}))
    """
)


def _clean_environment() -> dict[str, str]:
    """This environment without allocator settings of its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "NUCLEIBATCH_DEFAULT_MALLOC")}


def _child(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env or _clean_environment(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def glibc_default(tmp_path_factory):
    """Forward passes with glibc's defaults (NUCLEIBATCH_DEFAULT_MALLOC=1): faults and outputs."""
    out = tmp_path_factory.mktemp("malloc") / "default.npy"
    return _child(FORWARD_PASSES, str(out), env={**_clean_environment(), "NUCLEIBATCH_DEFAULT_MALLOC": "1"}), out


def test_tuned_allocator_stops_the_network_page_faulting_its_activations_afresh(glibc_default, tmp_path):
    """The reason for the settings: by default every forward pass page-faults its activations
    anew (mmapped, then unmapped); tuned, the freed pages are reused. Same outputs, bit for bit."""
    import numpy as np

    default, default_out = glibc_default
    tuned = _child(FORWARD_PASSES, str(tmp_path / "tuned.npy"))
    assert tuned["tuned"] and not default["tuned"]
    # measured: by default ~19k faults a pass on an AMD EPYC, 9-11.5k on an Intel Xeon (oneDNN
    # allocates differently there); tuned, 0 in most passes, 200-1,700 on average when the heap
    # still grows for a fragment
    assert default["faults_per_pass"] > 5_000, default
    assert tuned["faults_per_pass"] < default["faults_per_pass"] / 3, (tuned, default)
    np.testing.assert_array_equal(np.load(default_out), np.load(tmp_path / "tuned.npy"))


TRIM = textwrap.dedent(
    """
    import json
    import numpy as np
    from nucleibatch.runtime.allocator import FREE_BUDGET_BYTES, free_heap_bytes, release_free_memory, tune_allocator
    assert tune_allocator()
    block = np.ones((256, 1 << 20), dtype=np.uint8)  # 256 MiB from the heap (mmap is off)
    keep = np.ones(1 << 20, dtype=np.uint8)  # after it: the freed block is not at the heap's top
    del block
    free_before = free_heap_bytes()
    kept = release_free_memory()  # below the budget: the pages stay for the next block
    trimmed = release_free_memory(budget_bytes=64 << 20)
    print(json.dumps({"budget": FREE_BUDGET_BYTES, "free_before": free_before, "kept": kept, "trimmed": trimmed}))
    """
)


def test_freed_heap_memory_is_kept_below_the_budget_and_trimmed_above_it():
    from nucleibatch.runtime.allocator import free_heap_bytes

    if free_heap_bytes() is None:
        pytest.skip("glibc < 2.33 has no mallinfo2: trimming falls back to at most once a second")
    result = _child(TRIM)
    assert result["free_before"] >= 256 << 20  # the freed block stayed in the heap (no automatic trim)
    assert result["free_before"] < result["budget"] and result["kept"] is False
    assert result["trimmed"] is True


def test_the_environment_variables_alone_give_the_settings(glibc_default, tmp_path):
    """What the engines' worker processes get (ALLOCATOR_ENV at start-up, mallopt not called
    here) stops the faults as mallopt does."""
    from nucleibatch.runtime.allocator import ALLOCATOR_ENV

    assert ALLOCATOR_ENV == {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
    default, _ = glibc_default
    env = {**_clean_environment(), **ALLOCATOR_ENV, "NUCLEIBATCH_DEFAULT_MALLOC": "1"}
    from_env = _child(FORWARD_PASSES, str(tmp_path / "out.npy"), env=env)
    assert not from_env["tuned"] and from_env["faults_per_pass"] < default["faults_per_pass"] / 5, (from_env, default)


def test_default_malloc_opt_out_reaches_the_workers(monkeypatch):
    from nucleibatch.runtime.allocator import ALLOCATOR_ENV, worker_environment

    monkeypatch.delenv("NUCLEIBATCH_DEFAULT_MALLOC", raising=False)
    assert worker_environment() == ALLOCATOR_ENV
    monkeypatch.setenv("NUCLEIBATCH_DEFAULT_MALLOC", "1")
    assert worker_environment() == {}


def _startup_environment() -> dict[str, str]:
    """The environment this process started with (what glibc read), not os.environ's later changes."""
    with open("/proc/self/environ", "rb") as handle:
        pairs = [item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item]
    return {key.decode(): value.decode() for key, value in pairs}


def _pid_and_startup_environment() -> tuple[int, dict[str, str]]:
    time.sleep(0.2)  # long enough for the tasks to spread over the pool's processes
    return os.getpid(), _startup_environment()


def test_the_dask_engines_workers_start_with_the_settings(monkeypatch):
    """A nanny's ``env=`` is applied after its worker started; the engine's LocalCluster passes
    the settings as Dask's pre-spawn environment instead, so glibc reads them at start-up (and
    Dask's own MALLOC_TRIM_THRESHOLD_=65536 does not). The nannies set them in this process's
    environment to spawn: they are taken out again (children started later get glibc's defaults)."""
    from distributed import Client

    from nucleibatch.runtime.allocator import ALLOCATOR_ENV
    from nucleibatch.segment.engines.dask_engine import start_local_cluster

    for key in ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    cluster = start_local_cluster(1)
    assert not any(key in os.environ for key in ALLOCATOR_ENV)
    try:
        with Client(cluster) as client:
            [environment] = client.run(_startup_environment).values()
    finally:
        cluster.close()
    assert {key: environment.get(key) for key in ALLOCATOR_ENV} == ALLOCATOR_ENV


def test_the_post_processing_processes_start_with_the_settings(monkeypatch):
    """`segment --post-workers N` starts its processes with the settings in their environment
    (this process's own environment is left as it was)."""
    from nucleibatch.runtime.allocator import ALLOCATOR_ENV
    from nucleibatch.segment.engines.process_pool import start_post_pool

    for key in ALLOCATOR_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("NUCLEIBATCH_DEFAULT_MALLOC", raising=False)
    pool = start_post_pool(2)
    try:
        answers = [future.result() for future in [pool.submit(_pid_and_startup_environment) for _ in range(6)]]
    finally:
        pool.shutdown()
    assert len({pid for pid, _ in answers}) == 2  # both processes answered
    assert all({key: env.get(key) for key in ALLOCATOR_ENV} == ALLOCATOR_ENV for _, env in answers)
    assert not any(key in os.environ for key in ALLOCATOR_ENV)
