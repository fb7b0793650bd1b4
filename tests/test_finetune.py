"""`nucleibatch train --init default --freeze-encoder-epochs 1`: one tiny real run (Ray Train, 2 DDP
workers on the CPU, the small generated DSB-layout files), checked through its checkpoints, bundle
and overlays.

The option checks that need no training (conflicting --encoder, another --init on resume, the
learning rate, which start wins) are unit tests in tests/test_training.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nucleibatch
from nucleibatch.cli import main
from nucleibatch.model import DEFAULT_BUNDLE, sha256_file
from nucleibatch.training.loop import STATE_NAME
from nucleibatch.training.overlays import PREDICTED_RGB, TRUE_RGB
from tests.helpers.training import has_colour, png_rgb, read_metrics, tiny_network, train_argv

pytestmark = pytest.mark.slow


def _ddp_steps(model, optimizer, generator) -> None:
    model.train()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        model(torch.rand(2, 1, 64, 64, generator=generator)).square().mean().backward()
        optimizer.step()


def _ddp_worker(rank: int, store_path: str, out_dir: str) -> None:
    """One of 2 gloo ranks: a frozen-encoder phase, then the encoder unfrozen, once re-wrapped for DDP
    (as the training loop does) and once left in the frozen phase's wrapper; saves the encoders."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from nucleibatch.training.loop import set_encoder_trainable, wrap_for_phase

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        for rewrap in (True, False):
            network = tiny_network()  # the same seed on both ranks
            optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
            generator = torch.Generator().manual_seed(rank)  # each rank its own data, as DDP shards it

            model = wrap_for_phase(network, True, DistributedDataParallel)
            _ddp_steps(model, optimizer, generator)
            if rewrap:
                model = None
                model = wrap_for_phase(network, False, DistributedDataParallel)
            else:
                set_encoder_trainable(network, True)
            _ddp_steps(model, optimizer, generator)
            torch.save(network.encoder.state_dict(), f"{out_dir}/encoder_{rewrap}_{rank}.pt")
            del model
    finally:
        dist.destroy_process_group()


# First in the module: the multiprocessing helper process that spawn leaves running must exist
# before ray_session takes its list of processes (it checks that Ray leaves none behind).
def test_ddp_ranks_agree_on_the_encoder_after_unfreezing_only_when_rewrapped(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rewrap in (True, False):
        encoders = [torch.load(tmp_path / f"encoder_{rewrap}_{rank}.pt") for rank in (0, 1)]
        weights = [k for k in encoders[0] if "running" not in k and "num_batches" not in k]
        same = all(torch.equal(encoders[0][k], encoders[1][k]) for k in weights)
        assert same is rewrap  # without a new wrapper the unfrozen encoder's gradients are not averaged


@pytest.fixture(scope="module")
def finetune_run(ray_session, small_dsb_root, tmp_path_factory):
    """2 epochs from the default bundle, the encoder frozen in the first; returns (status, RUN_DIR)."""
    run_dir = tmp_path_factory.mktemp("finetune") / "run"
    status = main(train_argv(small_dsb_root, run_dir, "--epochs", "2", "--init", "default", "--freeze-encoder-epochs", "1"))
    return status, run_dir


def checkpoint_states(run_dir: Path) -> dict[int, dict]:
    """The model weights of each checkpoint Ray kept under RUN_DIR/ray_train, by epoch (from 1)."""
    states = {}
    for path in (run_dir / "ray_train").glob(f"checkpoint_*/{STATE_NAME}"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        states[state["epoch"]] = state["model"]
    return states


def test_fine_tuning_starts_from_the_bundle_and_unfreezes_the_encoder_after_n_epochs(finetune_run):
    status, run_dir = finetune_run
    assert status == 0
    assert [int(r["epoch"]) for r in read_metrics(run_dir)] == [1, 2]
    default = nucleibatch.load_model("default").network.state_dict()
    states = checkpoint_states(run_dir)
    assert sorted(states) == [1, 2]  # Ray keeps 2 checkpoints
    encoder = [k for k in default if k.startswith("encoder.")]
    rest = [k for k in default if not k.startswith("encoder.") and default[k].is_floating_point()]
    # epoch 1, encoder frozen: exactly the default bundle's encoder (weights and batch-norm statistics),
    # so the weights were loaded; the decoder and head did learn
    assert all(torch.equal(states[1][k], default[k]) for k in encoder)
    assert all(not torch.equal(states[1][k], default[k]) for k in rest if not k.endswith("num_batches_tracked"))
    # epoch 2, unfrozen: every encoder tensor has moved
    moved = [k for k in encoder if not torch.equal(states[2][k], states[1][k])]
    assert len(moved) == len(encoder)


def test_the_fine_tuned_bundle_records_its_init_and_learning_rate(finetune_run):
    status, run_dir = finetune_run
    assert status == 0
    config = nucleibatch.load_model(run_dir / "bundle").config
    init = {"name": "nuclei-unet-resnet18", "source": "default", "sha256": sha256_file(DEFAULT_BUNDLE / "model.safetensors")}
    assert config.init == init and config.training["init"] == init
    assert config.name == "nuclei-unet-resnet18-finetuned" and config.encoder == "resnet18"
    assert config.training["learning_rate"] == pytest.approx(2e-4) and config.training["freeze_encoder_epochs"] == 1
    settings = json.loads((run_dir / "train_settings.json").read_text())
    assert settings["init"] == "default" and settings["extra"]["init"] == init
    assert json.loads((run_dir / "summary.json").read_text())["init"] == init


def test_overlays_of_the_fine_tuned_model_show_both_outline_colours(finetune_run):
    status, run_dir = finetune_run
    assert status == 0
    for epoch in (1, 2):  # numbered from 1
        rgb = png_rgb(run_dir / "overlays" / f"epoch_{epoch:03d}.png")
        assert has_colour(rgb, TRUE_RGB) and has_colour(rgb, PREDICTED_RGB)  # the default model finds nuclei from the start


def test_resuming_with_another_init_is_refused(finetune_run, small_dsb_root, tiny_bundle, capfd):
    status, run_dir = finetune_run
    assert status == 0
    settings_before = (run_dir / "train_settings.json").read_text()
    for other in (["--init", str(tiny_bundle)], []):  # another bundle, or none (from scratch)
        assert main(train_argv(small_dsb_root, run_dir, "--epochs", "3", *other)) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("nucleibatch train: error: ")
        assert "other init (default, now " in err[0] and "--overwrite" in err[0]
    assert (run_dir / "train_settings.json").read_text() == settings_before

