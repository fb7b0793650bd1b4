"""The bare network's throughput by precision and memory layout (issue: performance).

    .venv/bin/python benchmarks/bare_model.py [--device cuda] [--batch-sizes 1 8 32] [--seconds 3]
                                              [--variants fp32 bf16 bf16-cl bf16-cl-compile]
                                              [--fold on|off|both]

For the default model on one input tile (the bundle's tile size, halo included: 512 x 512 for
the default model, the windows ``segment`` runs on large images; ``--side`` for others) it
times, per batch size:

* ``network``: the forward pass alone on device-resident random input (what the chip can do);
* ``forward``: ``nucleibatch.model.forward_batch`` as ``segment`` calls it (NumPy in, host-to-device
  copy, network, sigmoid, the tiles' cores cut out without the halo, device-to-host copy (float16
  in bf16), NumPy out).

Variants: ``fp32`` (float32, contiguous), ``bf16`` (bf16 autocast), ``bf16-cl`` (bf16 autocast
and channels-last: what ``segment`` runs on CUDA), ``bf16-cl-compile`` (the same under
``torch.compile``, timed after its compilation; compiled for the largest batch size only).
Each variant runs the network as ``segment`` does, with its batch norms folded into the
convolutions (``nucleibatch.model.fold_batch_norms``); ``--fold off`` keeps them (the network as
trained), ``--fold both`` times the two in turn. Prints tiles/s and MPix/s of tile area (halo
included) for each, and the machine it ran on.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time

from nucleibatch.runtime.allocator import tune_allocator

tune_allocator()  # before any thread: the network runs with segment's allocator settings (NUCLEIBATCH_DEFAULT_MALLOC=1: glibc's)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nucleibatch.model import fold_batch_norms, forward_batch, load_model  # noqa: E402

VARIANTS = ("fp32", "bf16", "bf16-cl", "bf16-cl-compile")


def timed(call, seconds: float, synchronize) -> tuple[float, int]:
    """(seconds, calls) of repeating ``call`` for about ``seconds`` after 3 warm-up calls."""
    for _ in range(3):
        call()
    synchronize()
    calls, started = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        if calls % 5 == 0 or seconds < 1:
            synchronize()
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                return elapsed, calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu", help="cpu | cuda [cpu]")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--side", type=int, default=None, help="tile side in pixels [the bundle's tile_size]")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement [3]")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--fold", choices=("on", "off", "both"), default="on", help="batch norms folded into the convolutions, as segment runs them [on]")
    args = parser.parse_args(argv)

    model = load_model(args.model, device="cpu", precision="float32")  # standard layout: each variant sets its own
    device = torch.device(args.device)
    side = args.side or model.config.tile_size
    halo = model.config.halo
    core = (halo, side - halo, halo, side - halo)  # what segment copies back of each tile
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, device {device} ({name}), torch {torch.__version__}, tile {side} x {side}")
    print(f"{'variant':<16} {'batch':>5} {'network tiles/s':>16} {'MPix/s':>8} {'forward tiles/s':>16} {'MPix/s':>8}")
    rng = np.random.default_rng(0)
    folds = {"on": [True], "off": [False], "both": [False, True]}[args.fold]
    for variant, folded in ((variant, folded) for variant in args.variants for folded in folds):
        channels_last = "-cl" in variant
        bf16 = variant.startswith("bf16")
        network = copy.deepcopy(model.network).float().to(device).eval()
        if folded:
            network = fold_batch_norms(network)
        label = variant + ("" if args.fold == "on" else ("+fold" if folded else "+bn"))
        if channels_last:
            network = network.to(memory_format=torch.channels_last)
        batch_sizes = args.batch_sizes
        if variant.endswith("compile"):
            batch_sizes = [max(args.batch_sizes)]
            started = time.perf_counter()
            network = torch.compile(network)
        for batch_size in batch_sizes:
            host = rng.random((batch_size, 1, side, side), dtype=np.float32)
            x = torch.from_numpy(host).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)

            def network_only(network=network, x=x, bf16=bf16) -> None:
                with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    network(x)

            if variant.endswith("compile"):
                network_only()
                synchronize()
                print(f"    (torch.compile: first call {time.perf_counter() - started:.1f} s)")
            seconds, calls = timed(network_only, args.seconds, synchronize)
            network_rate = calls * batch_size / seconds
            if bf16 and channels_last:
                forward_seconds, forward_calls = timed(lambda network=network, host=host: forward_batch(network, host, device, tta=False, bf16=True, crop=core), args.seconds, synchronize)
            elif not bf16 and not channels_last:
                forward_seconds, forward_calls = timed(lambda network=network, host=host: forward_batch(network, host, device, tta=False, bf16=False, crop=core), args.seconds, synchronize)
            else:
                forward_seconds, forward_calls = 0.0, 0  # forward_batch has no such mode
            forward_rate = forward_calls * batch_size / forward_seconds if forward_calls else float("nan")
            megapixels = side * side / 1e6
            print(f"{label:<16} {batch_size:>5} {network_rate:>16.1f} {network_rate * megapixels:>8.1f} {forward_rate:>16.1f} {forward_rate * megapixels:>8.1f}", flush=True)
        del network
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
