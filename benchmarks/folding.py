"""The network as trained against the network as `segment` runs it (batch norms folded into the
convolutions, bf16 weights on the bf16 path), timed in alternating rounds in one process.

    .venv/bin/python benchmarks/folding.py [--model default] [--sides 1024 896] [--rounds 12] [--calls 4]

Per window side (batch 1, random input, ``nucleibatch.model.forward_batch`` as `segment` calls it,
with the model's default precision on this machine): the seconds per call of ``model.network``
(batch norms kept) and ``model.inference_network``, measured in turn ``--rounds`` times
(``--calls`` calls each), and printed as medians, minima and the median of the per-round ratios.
Alternating rounds make the comparison robust to a machine whose speed drifts. Also printed:
the largest difference between the two networks' probabilities on the first input.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

from nucleibatch.runtime.allocator import tune_allocator

tune_allocator()

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--sides", type=int, nargs="+", default=[1024, 896], help="window sides [1024 896]")
    parser.add_argument("--rounds", type=int, default=12, help="alternating rounds [12]")
    parser.add_argument("--calls", type=int, default=4, help="calls per network per round [4]")
    args = parser.parse_args(argv)

    from nucleibatch.model import forward_batch, load_model

    model = load_model(args.model, device="cpu")
    networks = {"batch norms kept": model.network, "folded (segment)": model.inference_network}
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}; precision {'bf16' if model.bf16 else 'float32'}")
    rng = np.random.default_rng(0)
    for side in args.sides:
        batch = rng.random((1, 1, side, side), dtype=np.float32)
        outputs = [forward_batch(network, batch, model.device, False, model.bf16).astype(np.float32) for network in networks.values()]
        for network in networks.values():  # warm-up of the shape
            forward_batch(network, batch, model.device, False, model.bf16)
        seconds: dict[str, list[float]] = {name: [] for name in networks}
        for round_number in range(args.rounds):
            order = list(networks.items()) if round_number % 2 else list(networks.items())[::-1]
            for name, network in order:
                started = time.perf_counter()
                for _ in range(args.calls):
                    forward_batch(network, batch, model.device, False, model.bf16)
                seconds[name].append((time.perf_counter() - started) / args.calls)
        print(f"{side} x {side}: probabilities differ by at most {np.abs(outputs[0] - outputs[1]).max():.3f} (mean {np.abs(outputs[0] - outputs[1]).mean():.4f})")
        for name, values in seconds.items():
            print(f"    {name:<18} median {np.median(values):.3f} s per call, min {min(values):.3f}")
        kept, folded = (np.array(values) for values in seconds.values())
        print(f"    speed-up: medians {np.median(kept) / np.median(folded):.2f}x, minima {kept.min() / folded.min():.2f}x, per round (median) {np.median(kept / folded):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
