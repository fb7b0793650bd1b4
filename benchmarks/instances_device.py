"""Instance labels on the network's device (torch) against the NumPy / scikit-image ones.

    .venv/bin/python benchmarks/instances_device.py [--levels 8 16 32] [--device cpu|cuda]
        [--data ../shared/data/dsb2018/stage1_train] [--model default] [--limit 0]

On the default model's validation images (the bundle's ``val_image_ids``), the network's
probabilities are computed once (as ``evaluate`` does); then each image's labels come from
:func:`nucleibatch.instances.probabilities_to_labels` (CPU) and from
:func:`nucleibatch.instances_torch.instance_labels_torch` with each ``--levels`` (then the same
``min_size`` and renumbering). Printed: the validation mAP@[.5:.95] of each against the ground
truth, the mAP of the device labels scored against the CPU labels (1.0: the same nuclei), and
the seconds each took on ``--device``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from nucleibatch.runtime.allocator import tune_allocator

tune_allocator()

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "dsb2018" / "stage1_train")
    parser.add_argument("--model", default="default")
    parser.add_argument("--limit", type=int, default=0, help="only the first N validation images (0: all)")
    args = parser.parse_args(argv)

    import torch

    from nucleibatch.annotated import discover_annotated, iter_annotated
    from nucleibatch.instances import probabilities_to_labels, relabel_sequential, remove_small
    from nucleibatch.instances_torch import instance_labels_torch
    from nucleibatch.metrics import image_scores, mean_scores
    from nucleibatch.model import load_model
    from nucleibatch.normalize import normalise_pixels, stats_for_bundle

    model = load_model(args.model, device="cpu")
    params = model.postprocess
    wanted = set(model.config.training.get("val_image_ids") or [])
    sources = [s for s in discover_annotated([str(args.data)]) if s.image_id in wanted]
    if args.limit:
        sources = sources[: args.limit]
    device = torch.device(args.device)
    truths, probabilities = [], []
    for annotated in iter_annotated(sources):
        stats = stats_for_bundle(annotated.image, model.config.normalization)
        probabilities.append(model.predict(normalise_pixels(annotated.image, stats)))
        truths.append(annotated.labels)
    megapixels = sum(p.shape[1] * p.shape[2] for p in probabilities) / 1e6
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, device {device}; {len(truths)} validation images, {megapixels:.1f} MPix")

    started = time.perf_counter()
    cpu_labels = [probabilities_to_labels(p, params) for p in probabilities]
    seconds = time.perf_counter() - started
    print(f"numpy / scikit-image: mAP {mean_scores([image_scores(t, c) for t, c in zip(truths, cpu_labels, strict=True)])['map']:.4f}, {seconds:.2f} s")
    for levels in args.levels:
        labels = []
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            for p in probabilities:
                on_device = instance_labels_torch(torch.from_numpy(p).to(device), params, levels)
                labels.append(on_device.cpu().numpy())
        seconds = time.perf_counter() - started
        labels = [relabel_sequential(remove_small(raw, params.min_size)) for raw in labels]
        truth_map = mean_scores([image_scores(t, ours) for t, ours in zip(truths, labels, strict=True)])["map"]
        agreement = mean_scores([image_scores(c, ours) for c, ours in zip(cpu_labels, labels, strict=True)])["map"]
        print(f"torch, {levels} levels: mAP {truth_map:.4f}, against the numpy labels {agreement:.4f}, {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
