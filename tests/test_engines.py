"""The Dask engine (LocalCluster on 127.0.0.1) gives exactly the local engine's outputs.

The Ray engine is tested through `ray job submit` on a real two-node cluster in test_ray_jobs.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import zarr

from nucleibatch.errors import ModelBundleError, UsageError
from nucleibatch.metrics import image_scores
from nucleibatch.output.folder import OutputFolder, label_path
from nucleibatch.segment.job import run_segment_job
from nucleibatch.segment.settings import SegmentSettings
from tests.helpers import input_files as files
from tests.helpers.outputs import assert_same_masks_and_tables, image_groups

SETTINGS = SegmentSettings(block_size=256, block_margin=64)
# bf16 convolutions on CPUs with AVX512-BF16 (oneDNN) round differently with the batch size, so
# outputs that must not depend on batching are compared in float32
PRECISION = "float32"


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The archive and the local engine's outputs on it (default model, CPU)."""
    root = tmp_path_factory.mktemp("archive")
    ids = files.write_small_archive(root / "in")
    summary = run_segment_job([str(root / "in")], root / "local", model="default", device="cpu", settings=SETTINGS, progress=False)
    assert summary.n_images == len(ids) and summary.n_failed == 1 and summary.n_nuclei > 100
    return root


def _own_processes() -> set[str]:
    """Child processes of this test process, except multiprocessing's resource tracker (which
    lives as long as its parent, by design)."""
    listing = subprocess.run(["ps", "-ww", "--ppid", str(os.getpid()), "-o", "pid=,args="], capture_output=True, text=True).stdout
    return {line.strip() for line in listing.splitlines() if line.strip() and "resource_tracker" not in line and " ps " not in f" {line} "}


def test_post_processing_processes_give_the_local_engines_outputs(local_reference, tmp_path):
    """`--post-workers 2`: the model here, plan/finish/complete units in two processes (the GPU
    set-up, run on the CPU): the same labels and tables, the processes gone afterwards."""
    before = _own_processes()
    out = tmp_path / "pool"
    summary = run_segment_job([str(local_reference / "in")], out, model="default", device="cpu", settings=SETTINGS, post_workers=2, progress=False)
    assert summary.exit_code == 3 and summary.n_failed == 1
    assert_same_masks_and_tables(local_reference / "local", out)
    run = json.loads(OutputFolder(out).run_json.read_text())
    assert run["engine"] == "local" and run["post_workers"] == 2 and run["model_busy_seconds"] > 0
    finishers = [w for w, units in run["placement"]["workers"].items() if units["finish"]]
    assert len(finishers) == 2 and f":{os.getpid()}" not in " ".join(finishers)  # other processes than this one
    assert not (_own_processes() - before), "the post-processing processes outlived the run"


def test_instances_on_the_device_with_threads_and_with_processes(local_reference, tmp_path):
    """`--instances-on device` (torch next to the network; here on the CPU, the code a GPU runs):
    the model's process makes the labels, so threads and post-processing processes write the
    same outputs; they find the nuclei of the scikit-image watershed (local engine's reference)."""
    settings = dataclasses.replace(SETTINGS, instances_on="device")
    runs = {}
    for post_workers in (0, 2):
        out = tmp_path / f"post-{post_workers}"
        summary = run_segment_job([str(local_reference / "in")], out, model="default", device="cpu", settings=settings, post_workers=post_workers, progress=False)
        assert summary.n_failed == 1
        run = json.loads(OutputFolder(out).run_json.read_text())
        assert run["instances_on"] == "device" and run["stage_seconds"]["instances"] > 0
        runs[post_workers] = out
    assert_same_masks_and_tables(runs[0], runs[2])
    reference_nuclei = pd.read_parquet(OutputFolder(local_reference / "local").nuclei)
    device_nuclei = pd.read_parquet(OutputFolder(runs[0]).nuclei)
    per_image = reference_nuclei.groupby("image_id").size().to_frame("cpu").join(device_nuclei.groupby("image_id").size().rename("device"))
    assert (abs(per_image["cpu"] - per_image["device"]) <= 0.02 * per_image["cpu"] + 1).all(), per_image
    root_cpu, root_device = zarr.open_group(OutputFolder(local_reference / "local").masks, mode="r"), zarr.open_group(OutputFolder(runs[0]).masks, mode="r")
    for name in image_groups(root_cpu):
        agreement = image_scores(np.asarray(root_cpu[label_path(0, name)]), np.asarray(root_device[label_path(0, name)]))
        assert agreement["ap50"] >= 0.95 and agreement["map"] >= 0.9, (name, agreement)


def test_post_processing_processes_start_ready_and_without_torch():
    """The processes import the units' modules as they start (while the model loads), and not
    torch: its import is most of a process's start-up, and they never run the network."""
    from nucleibatch.segment.engines.process_pool import start_post_pool

    pool = start_post_pool(1)
    try:
        # a builtin: a function of this module would import it, and torch with it, in the process
        loaded = pool.submit(eval, "[name in __import__('sys').modules for name in ('torch', 'nucleibatch.segment.units', 'pandas')]")
        assert loaded.result() == [False, True, True]
    finally:
        pool.shutdown()


def test_a_model_that_fails_to_load_leaves_no_post_processing_process(tmp_path):
    """The processes start before the model loads: a bad --model must not leave them behind."""
    (tmp_path / "in").mkdir()
    before = _own_processes()
    with pytest.raises(ModelBundleError):
        run_segment_job([str(tmp_path / "in")], tmp_path / "out", model=str(tmp_path / "no-such-bundle"), device="cpu", post_workers=2, progress=False)
    assert not (_own_processes() - before), "the post-processing processes outlived the failed run"


def test_post_workers_default_to_none_on_the_cpu_and_the_spare_cores_on_a_gpu():
    from nucleibatch.segment.engines.process_pool import default_post_workers

    assert default_post_workers("cpu", cpus=16) == 0
    assert default_post_workers("cuda", "cpu", cpus=16) == 14 and default_post_workers("cuda", "cpu", cpus=2) == 1
    # instances and measurements on the GPU (its default): the host's share runs in threads
    assert default_post_workers("cuda", cpus=16) == default_post_workers("cuda", "device", cpus=16) == 0


def test_dask_engine_on_a_local_cluster_matches_the_local_engine(local_reference, tmp_path):
    before = _own_processes()
    out = tmp_path / "dask"
    summary = run_segment_job(
        [str(local_reference / "in")], out, model="default", device="cpu", settings=SETTINGS, engine="dask", workers=2, progress=False
    )
    assert summary.exit_code == 3 and summary.n_failed == 1
    images = assert_same_masks_and_tables(local_reference / "local", out)
    failed = images[images.status == "failed"]
    assert list(failed.image_id) == ["slides/notes"] and "TIFF" in failed.error.iloc[0]
    run = json.loads(OutputFolder(out).run_json.read_text())
    assert run["engine"] == "dask"
    workers = run["placement"]["workers"]
    assert len(workers) == 2 and all(w.startswith("dask-worker:tcp://127.0.0.1:") for w in workers)  # loopback only
    ok = images[images.status == "ok"]
    n_blocks = int(sum(-(-h // 256) * -(-w // 256) for h, w in zip(ok.height, ok.width, strict=True)))
    assert sum(w["predict"] for w in workers.values()) == run["placement"]["block_units"] == n_blocks > len(ok)
    assert not (_own_processes() - before), "the LocalCluster's worker processes outlived the run"


def test_a_rerun_on_the_dask_engine_resumes(local_reference, tmp_path):
    out = tmp_path / "resume"
    first = run_segment_job([str(local_reference / "in" / "copy_0")], out, model="default", device="cpu", settings=SETTINGS, engine="dask", workers=1, progress=False)
    assert first.n_ok == 5
    with pytest.raises(UsageError, match="would get another id"):  # the folder above: the same files under other ids
        run_segment_job([str(local_reference / "in")], out, model="default", device="cpu", settings=SETTINGS, engine="dask", workers=1, progress=False)
    again = run_segment_job([str(local_reference / "in")], out, model="default", device="cpu", settings=SETTINGS, engine="dask", workers=1, progress=False, overwrite=True)
    assert again.n_resumed == 0 and again.n_images == 7
    third = run_segment_job([str(local_reference / "in")], out, model="default", device="cpu", settings=SETTINGS, engine="dask", workers=1, progress=False)
    assert third.n_resumed == third.n_images == 7 and third.n_nuclei == again.n_nuclei


@pytest.mark.parametrize("engine, post_workers", [("local", 0), ("local", 2), ("dask", None)])
def test_a_failing_block_fails_only_its_image(tmp_path, engine, post_workers):
    """A nucleus wider than the block margin fails its image (in a find_block_nuclei unit on a worker or
    a post-processing process, or in the local engine's finisher thread while the model goes on);
    the error reaches the images table with its advice, other images finish."""
    import numpy as np

    from nucleibatch.synthetic import threshold_model

    big = np.zeros((256, 256), np.uint8)
    big[40:200, 40:200] = 200  # one 160 px "nucleus" against a 16 px margin
    files.write_tiff(tmp_path / "in" / "big.tif", big)
    files.write_plate_tree(tmp_path / "in" / "plates")
    settings = SegmentSettings(block_size=128, block_margin=16)
    summary = run_segment_job([str(tmp_path / "in")], tmp_path / "out", model=threshold_model(), settings=settings, engine=engine, workers=2, post_workers=post_workers, progress=False)
    assert summary.exit_code == 3 and summary.n_failed == 1 and summary.n_ok >= 4
    images = __import__("pandas").read_parquet(OutputFolder(tmp_path / "out").images).set_index("image_id")
    assert "raise --block-margin" in images.loc["big", "error"] and __import__("pandas").isna(images.loc["big", "store_path"])


def test_small_images_share_predict_units_with_the_local_engine_outputs(tmp_path):
    """Images that fit one tile are predicted `batch_size` to a model call on the workers; the
    labels and tables stay exactly those of the local engine (one image per call)."""
    import pandas as pd

    from nucleibatch.synthetic import threshold_model

    files.write_small_archive(tmp_path / "in", copies=2, bad_file=False)
    model = threshold_model(tile_size=512, halo=32)  # the 256², 320 x 256 and 360² demo images fit a tile
    local = run_segment_job([str(tmp_path / "in")], tmp_path / "local", model=model, progress=False)
    grouped = run_segment_job([str(tmp_path / "in")], tmp_path / "dask", model=model, engine="dask", workers=1, batch_size=4, progress=False)
    assert grouped.n_ok == local.n_ok == 11
    assert_same_masks_and_tables(tmp_path / "local", tmp_path / "dask")
    units = pd.read_json(OutputFolder(tmp_path / "dask").placement, lines=True)
    # how many share a call depends on when their start units finish: at least one group, none above batch_size
    assert len(units) == 11 and 2 <= units.predict_group.max() <= 4, units.predict_group.tolist()
    assert set(units[units.predict_group > 1].image_id) <= {i for i in units.image_id if not i.startswith("slides/")}


def test_a_bad_read_in_a_group_of_small_images_fails_only_its_own_block(tmp_path):
    import numpy as np

    from nucleibatch.errors import ImageReadError
    from nucleibatch.io.discover import discover_inputs
    from nucleibatch.output.store import open_root
    from nucleibatch.segment.settings import instance_params
    from nucleibatch.segment.steps import start_image
    from nucleibatch.segment.units import BlockPredictor, block_nuclei_unit
    from nucleibatch.synthetic import synthetic_nuclei, threshold_model

    for k in range(3):
        files.write_plain(tmp_path / "in" / f"f{k}.png", synthetic_nuclei((120, 140), n_nuclei=6, seed=k)[0])
    model, settings = threshold_model(), SegmentSettings()
    open_root(OutputFolder(tmp_path / "out").masks)
    plans = [start_image(record, settings, model.config, tmp_path / "out") for record in discover_inputs([str(tmp_path / "in")])]
    (tmp_path / "in" / "f1.png").unlink()  # vanishes between planning and reading
    predictor = BlockPredictor(model, "cpu", settings, batch_size=4)
    grouped = predictor.predict([(plan, 0) for plan in plans])
    assert isinstance(grouped[1], ImageReadError) and [g.predict_group for g in (grouped[0], grouped[2])] == [3, 3]
    alone = BlockPredictor(model, "cpu", settings, batch_size=4).predict([(plans[2], 0)])[0]
    np.testing.assert_array_equal(grouped[2].probabilities, alone.probabilities)
    with pytest.raises(ImageReadError):
        block_nuclei_unit(plans[1], 0, grouped[1], settings, instance_params(settings, model), tmp_path / "out")
    with pytest.raises(ImageReadError):  # a block predicted alone raises as before (the unit fails, Ray/Dask report it)
        BlockPredictor(model, "cpu", settings, batch_size=4).predict([(plans[1], 0)])


def test_a_group_of_reads_fails_the_block_that_failed_unless_alone_or_fatal():
    """The one rule both reading paths (the model worker's, the post-processing processes')
    follow: a failed read in a group fails its own image; alone, or fatal (the output side), it
    is raised, and a lazy group is read no further."""
    import errno

    import numpy as np

    from nucleibatch.errors import ImageReadError
    from nucleibatch.segment.units import gather_reads
    from nucleibatch.tiling import block_grid

    class Plan:  # what gather_reads uses of an ImagePlan
        blocks = block_grid((64, 64), 64, 0)

    def read():
        return np.zeros((64, 64, 1)), (0, 64, 0, 64), np.zeros((64, 64)), {"read": 0.5, "normalise": 0.25}

    units = [(Plan(), 0)] * 3
    bad = ImageReadError("gone")
    items, failed, timer = gather_reads(units, [read(), bad, read()])
    assert len(items) == 2 and failed == {1: bad} and timer.seconds == {"read": 1.0, "normalise": 0.5}
    with pytest.raises(ImageReadError):
        gather_reads(units[:1], [bad])
    asked = []

    def lazily():
        for k, outcome in enumerate([read(), OSError(errno.ENOSPC, "disk full"), read()]):
            asked.append(k)
            yield outcome

    with pytest.raises(OSError, match="disk full"):
        gather_reads(units, lazily())
    assert asked == [0, 1]


def test_read_units_open_an_image_once_for_its_blocks(tmp_path, monkeypatch):
    """The post-processing processes' read units keep an image open for its next blocks (a
    remote slide is not opened once per block) and close it after its last; the blocks read are
    those of a freshly opened image."""
    import numpy as np

    from nucleibatch.io import readers
    from nucleibatch.io.discover import discover_inputs
    from nucleibatch.output.store import open_root
    from nucleibatch.segment import units
    from nucleibatch.segment.steps import start_image
    from nucleibatch.synthetic import synthetic_nuclei, threshold_model

    files.write_plain(tmp_path / "in" / "big.png", synthetic_nuclei((600, 520), n_nuclei=40, seed=3)[0])
    model = threshold_model()
    open_root(OutputFolder(tmp_path / "out").masks)
    (record,) = discover_inputs([str(tmp_path / "in")])
    plan = start_image(record, SETTINGS, model.config, tmp_path / "out")
    assert len(plan.blocks) >= 4
    opened, closed, real_open = [], [], readers.open_source

    def counting_open(image_record):
        source = real_open(image_record)
        real_close = source.close
        source.close = lambda: (closed.append(source), real_close())
        opened.append(source)
        return source

    monkeypatch.setattr(readers, "open_source", counting_open)
    outcomes = [units.read_unit(plan, index, 64) for index in range(len(plan.blocks))]
    assert len(opened) == 1 and closed == opened and record.image_id not in units._UNIT_IMAGES.open
    monkeypatch.setattr(readers, "open_source", real_open)
    for index, outcome in enumerate(outcomes):
        fresh = real_open(record)
        try:
            expected = units.read_block_outcome(plan, index, fresh, 64)
        finally:
            fresh.close()
        for got, want in zip(outcome[:3], expected[:3], strict=True):
            np.testing.assert_array_equal(got, want)


def test_model_workers_are_dealt_over_the_nodes_that_can_hold_them():
    """Ray's SPREAD skips a node whose CPUs are busy for a moment; the model workers are dealt
    round-robin over every alive node with the resource instead (soft: a dead node is left),
    never more to a node than it holds (a soft affinity to a full node would wait forever)."""
    from nucleibatch.segment.engines.ray_engine import spread_over_nodes

    a, b = "aa" * 28, "bb" * 28
    nodes = [
        {"NodeID": b, "Alive": True, "Resources": {"CPU": 2.0, "GPU": 3.0}},
        {"NodeID": a, "Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}},
        {"NodeID": "cc" * 28, "Alive": True, "Resources": {}},  # a head without CPUs for work
        {"NodeID": "dd" * 28, "Alive": False, "Resources": {"CPU": 8.0}},
    ]
    placements = spread_over_nodes(nodes, "CPU", 1.0, 3)
    assert [p.node_id for p in placements] == [a, b, a] and all(p.soft for p in placements)
    assert [p.node_id for p in spread_over_nodes(nodes, "GPU", 1.0, 4)] == [a, b, b, b]  # a holds one GPU worker
    assert [p.node_id for p in spread_over_nodes(nodes, "GPU", 0.5, 3)] == [a, b, a]
    beyond = spread_over_nodes(nodes, "CPU", 1.0, 6)
    assert [getattr(p, "node_id", p) for p in beyond] == [a, b, a, b, "SPREAD", "SPREAD"]  # more than the nodes hold: pending
    assert spread_over_nodes(nodes, "GPU", 4.0, 2) == ["SPREAD", "SPREAD"]  # no GPU node big enough yet
    assert [p.node_id for p in spread_over_nodes(nodes, "CPU", 0.0, 3)] == [a, b, a]  # a zero reservation still needs CPUs


def test_small_images_are_batched_by_network_window():
    """The distributed driver groups one-tile images by window (a model call then holds one
    shape); larger and unreadable images keep their order, first."""
    from nucleibatch.io.discover import ImageRecord
    from nucleibatch.segment.engines.driver import batching_order

    shapes = {"a": (256, 320), "big1": (2000, 3000), "b": (250, 250), "c": (256, 300), "bad": None, "d": (256, 256), "big2": (513, 100)}
    records = [ImageRecord(name, name, name, "plain", shape, 1 if shape else None, "uint8" if shape else None, error=None if shape else "unreadable") for name, shape in shapes.items()]
    ordered = [record.image_id for record in batching_order(records, tile_size=512)]
    assert ordered == ["big1", "bad", "big2", "b", "d", "a", "c"]  # windows 256x256 (b, d), then 256x320 (a, c)
    assert sorted(ordered) == sorted(shapes)


def test_the_local_engine_groups_small_images_into_shared_calls_with_unchanged_outputs(tmp_path, monkeypatch):
    """One-tile images share network calls in the local engine too (batch_size windows' worth,
    one shape per call): the labels and tables are those of one image per call, the broken file
    fails alone."""
    from nucleibatch.segment.engines import driver

    files.write_small_archive(tmp_path / "in", copies=3)
    grouped = run_segment_job([str(tmp_path / "in")], tmp_path / "grouped", model="default", device="cpu", precision=PRECISION, batch_size=4, progress=False)
    monkeypatch.setattr(driver, "small_images_per_unit", lambda batch_size, window: 1)
    alone = run_segment_job([str(tmp_path / "in")], tmp_path / "alone", model="default", device="cpu", precision=PRECISION, batch_size=4, progress=False)
    assert grouped.n_ok == alone.n_ok == 16 and grouped.n_failed == alone.n_failed == 1
    assert_same_masks_and_tables(tmp_path / "alone", tmp_path / "grouped")
    calls = {tuple(shape[:3]): shape[3] for shape in json.loads(OutputFolder(tmp_path / "grouped").run_json.read_text())["model_batches"]}
    one_by_one = {tuple(shape[:3]): shape[3] for shape in json.loads(OutputFolder(tmp_path / "alone").run_json.read_text())["model_batches"]}
    assert max(n for n, _, _ in calls) == 3 and max(n for n, _, _ in one_by_one) == 1  # the 3 copies of each demo image
    assert sum(calls.values()) < sum(one_by_one.values())


def test_small_images_are_grouped_per_window_up_to_one_call(tmp_path):
    """Nine one-tile images of one window, batch_size 1 (one 512² tile's pixels per call): units of
    at most as many 224² windows as one call holds (5; fewer when the model would otherwise wait
    for images still being planned); an image of several blocks goes alone."""
    from nucleibatch.segment.engines.driver import small_images_per_unit
    from nucleibatch.synthetic import synthetic_nuclei, threshold_model

    assert small_images_per_unit(1, (224, 224)) == 5 and small_images_per_unit(4, (256, 256)) == 16 and small_images_per_unit(1, (1024, 1024)) == 1
    for k in range(9):
        files.write_plain(tmp_path / "in" / f"f{k}.png", synthetic_nuclei((200, 200), n_nuclei=5, seed=k)[0])
    files.write_plain(tmp_path / "in" / "large.png", synthetic_nuclei((300, 200), n_nuclei=8, seed=9)[0])
    summary = run_segment_job([str(tmp_path / "in")], tmp_path / "out", model=threshold_model(), settings=SegmentSettings(block_size=256, block_margin=32), batch_size=1, progress=False)
    assert summary.n_ok == 10
    calls = Counter()
    for n, *window, count in json.loads(OutputFolder(tmp_path / "out").run_json.read_text())["model_batches"]:
        calls[(n, *window)] += count
    small = sorted(n for (n, h, w), count in calls.items() for _ in range(count) if (h, w) == (224, 224))
    assert sum(small) == 9 and max(small) <= 5 and len(small) < 9, calls


def test_a_group_of_small_images_fails_only_the_image_that_fails(tmp_path, monkeypatch):
    """An image gone between discovery and reading, and one of several blocks, in a group: the
    first gets its error, the second the whole-image path; the others are those of one by one."""
    from nucleibatch.io.discover import discover_inputs
    from nucleibatch.segment.engines import EngineRun, driver
    from nucleibatch.segment.engines.local import LocalEngine
    from nucleibatch.segment.settings import JobOptions
    from nucleibatch.segment.timer import Timer
    from nucleibatch.synthetic import synthetic_nuclei, threshold_model

    for k in range(3):
        files.write_plain(tmp_path / "in" / f"f{k}.png", synthetic_nuclei((120, 140), n_nuclei=6, seed=k)[0])
    files.write_plain(tmp_path / "in" / "f3.png", synthetic_nuclei((200, 240), n_nuclei=12, seed=3)[0])
    model, settings = threshold_model(), SegmentSettings(block_size=160, block_margin=32)
    records = discover_inputs([str(tmp_path / "in")])
    (tmp_path / "in" / "f1.png").unlink()

    def segment(out_dir) -> dict[str, dict]:
        rows: list[dict] = []
        with LocalEngine(JobOptions(model=model, post_workers=0), settings) as engine:
            engine.run(EngineRun(records, model, settings, out_dir, 4, Timer(), rows.append, []))
        return {row["image_id"]: row for row in rows}

    grouped = segment(tmp_path / "grouped")
    assert grouped["f1"]["status"] == "failed" and "f1.png" in grouped["f1"]["error"], grouped
    assert [grouped[f"f{k}"]["status"] for k in (0, 2, 3)] == ["ok"] * 3, grouped
    monkeypatch.setattr(driver, "small_images_per_unit", lambda batch_size, window: 1)
    alone = segment(tmp_path / "alone")
    for k in (0, 2, 3):
        row = alone[f"f{k}"]
        assert row["n_nuclei"] == grouped[f"f{k}"]["n_nuclei"] > 0
        grouped_labels = zarr.open_group(OutputFolder(tmp_path / "grouped").masks, mode="r")[label_path(0, row["store_path"].split("/")[-1])]
        alone_labels = zarr.open_group(OutputFolder(tmp_path / "alone").masks, mode="r")[label_path(0, row["store_path"].split("/")[-1])]
        np.testing.assert_array_equal(np.asarray(grouped_labels), np.asarray(alone_labels))


def test_small_images_wait_for_full_calls_while_the_model_is_busy(monkeypatch, tmp_path):
    """The driver sends a partial group of one-tile images only when the model would otherwise
    wait and no image of that window is being planned; with more images than it plans at once
    (here 40, planning at most 15), the model is never handed partial calls while it is busy:
    on a CPU, calls of few small windows cost about twice the network time per pixel."""
    from types import SimpleNamespace

    from nucleibatch.io.discover import ImageRecord
    from nucleibatch.segment.engines import driver

    monkeypatch.setattr(driver, "record_finished_image", lambda out_dir, record, row: None)
    shape = (200, 200)

    class Handle(SimpleNamespace):
        __hash__ = object.__hash__  # a future: hashable by identity
        __eq__ = object.__eq__

    class FifoExecutor:
        """One worker runs every unit in submission order: each wait returns the oldest."""

        workers, finish_slots, batch_size = 1, 1, 1
        model_config = SimpleNamespace(tile_size=512)

        def __init__(self) -> None:
            self.queue: list[Handle] = []
            self.calls: list[int] = []

        def _submit(self, kind: str, value: object) -> Handle:
            future = Handle(kind=kind, value=value, order=len(self.queue))
            self.queue.append(future)
            return future

        def start(self, record):
            plan = SimpleNamespace(shape=shape, scale=1.0, blocks=[SimpleNamespace(index=0)], done_blocks=(), image_id=record.image_id)
            plan.blocks_to_do = plan.blocks
            return self._submit("start", plan)

        def predict(self, units):
            self.calls.append(len(units))
            return [None] * len(units)

        def find_block_nuclei(self, plan, index, prediction):
            return self._submit("block", None)

        def stitch(self, plan, results):
            return self._submit("stitch", ({"image_id": plan.image_id}, {}, []))

        def wait(self, futures):
            return [min(futures, key=lambda future: future.order)]

        def result(self, future):
            return future.value

        def cancel(self, futures):
            pass

    records = [ImageRecord(f"f{k}", f"f{k}", f"f{k}", "plain", shape, 1, "uint8") for k in range(40)]
    executor, rows = FifoExecutor(), []
    driver.run_distributed(executor, records, tmp_path, SimpleNamespace(add=lambda seconds: None), rows.append, [])
    group = driver.small_images_per_unit(1, driver.record_window(records[0], 512))
    assert group == 5 and len(rows) == 40 and sum(executor.calls) == 40
    assert executor.calls == [group] * 8, executor.calls


def test_units_that_open_a_new_masks_zarr_at_once_all_get_it(tmp_path):
    """The first units of a run may create OUT/masks.zarr's root in several threads or workers at
    once: each gets the group, none fails its image with zarr's 'A group exists'."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from nucleibatch.output.store import open_root

    for trial in range(20):
        path = tmp_path / f"masks{trial}.zarr"
        barrier = threading.Barrier(6)

        def open_together(_: int, path=path, barrier=barrier):
            barrier.wait()
            return open_root(path)

        with ThreadPoolExecutor(6) as pool:
            groups = list(pool.map(open_together, range(6)))
        assert all(group.store_path.store.root == path for group in groups)


def test_a_chained_units_value_is_freed_once_the_next_unit_has_it_without_the_garbage_collector():
    """The local engine chains units with futures (a block's prediction -> its find_block_nuclei
    unit). A value must go when the unit that takes it is done, not at the garbage collector's next
    full pass: held in reference cycles, the probabilities of every block of a slide piled up
    (peak memory grew with the image size)."""
    import gc
    import weakref
    from concurrent.futures import ThreadPoolExecutor

    from nucleibatch.segment.engines.local import _after_all, _then

    class Probabilities:
        pass

    alive: list[weakref.ref] = []

    def predict() -> Probabilities:
        value = Probabilities()
        alive.append(weakref.ref(value))
        return value

    gc.disable()
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            group = _after_all([pool.submit(predict), pool.submit(predict)], lambda values: pool.submit(lambda: values))
            finished = [_then(_then(group, lambda values, k=k: pool.submit(lambda: values[k])), lambda value: pool.submit(id, value)) for k in range(2)]
            assert all(isinstance(future.result(timeout=10), int) for future in finished)
            del group
        assert len(alive) == 2 and [ref() for ref in alive] == [None, None]
    finally:
        gc.enable()
