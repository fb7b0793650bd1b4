"""glibc allocator settings (nucleibatch/allocator.py), each checked in a child process: the
settings are process-wide and only take full effect before threads start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

FORWARD_PASSES = textwrap.dedent(
    """
    import json, resource, sys, threading
    from nucleibatch.allocator import tune_allocator
    tuned = tune_allocator()
    import numpy as np
    from nucleibatch import load_model
    from nucleibatch.model import _forward

    model = load_model("default", precision="float32")  # the fault counts below are float32 activations
    batch = np.random.default_rng(0).random((4, 1, 256, 320), dtype=np.float32)
    outputs = []

    def run():  # on a thread, as segment's model runs
        for _ in range(2):  # warm-up: the heap grows to the network's working set
            _forward(model.network, batch, model.device, False, fast=False)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(6):
            output = _forward(model.network, batch, model.device, False, fast=False)
        outputs.extend([output, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    faults = outputs.pop()
    np.save(sys.argv[1], outputs[-1])
    print(json.dumps({"tuned": tuned, "faults_per_pass": faults / 6}))
    """
)


def _child(script: str, *args: str, default_malloc: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if default_malloc:
        env["NUCLEIBATCH_DEFAULT_MALLOC"] = "1"
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_tuned_allocator_stops_the_network_page_faulting_its_activations_afresh(tmp_path):
    """The reason for the settings: by default every forward pass page-faults its activations
    anew (mmapped, then unmapped); tuned, the freed pages are reused. Same outputs, bit for bit."""
    import numpy as np

    default = _child(FORWARD_PASSES, str(tmp_path / "default.npy"), default_malloc=True)
    tuned = _child(FORWARD_PASSES, str(tmp_path / "tuned.npy"))
    assert tuned["tuned"] and not default["tuned"]
    # measured here: ~19k faults a pass by default; tuned, 0 in most passes (a few thousand
    # when the heap still grows for a fragment)
    assert default["faults_per_pass"] > 10_000, default
    assert tuned["faults_per_pass"] < default["faults_per_pass"] / 5, (tuned, default)
    np.testing.assert_array_equal(np.load(tmp_path / "default.npy"), np.load(tmp_path / "tuned.npy"))


TRIM = textwrap.dedent(
    """
    import json
    import numpy as np
    from nucleibatch.allocator import FREE_BUDGET_BYTES, free_heap_bytes, release_free_memory, tune_allocator
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
    result = _child(TRIM)
    assert result["free_before"] >= 256 << 20  # the freed block stayed in the heap (no automatic trim)
    assert result["free_before"] < result["budget"] and result["kept"] is False
    assert result["trimmed"] is True


def test_the_engines_start_their_own_workers_with_the_settings(tmp_path):
    """Ray model actors and the Dask LocalCluster's workers start with ALLOCATOR_ENV (the arena
    count is fixed at a process's start), and glibc reads the variables we set."""
    from nucleibatch.allocator import ALLOCATOR_ENV

    assert ALLOCATOR_ENV == {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **ALLOCATOR_ENV, "NUCLEIBATCH_DEFAULT_MALLOC": "1"}
    result = subprocess.run([sys.executable, "-c", FORWARD_PASSES, str(tmp_path / "out.npy")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    faults = json.loads(result.stdout.strip().splitlines()[-1])["faults_per_pass"]
    assert faults < 4_000, faults  # the environment alone, mallopt not called (default: ~19k)
