"""Tune a bundle's post-processing thresholds on its validation images, here, on the CPU.

    .venv/bin/python benchmarks/retune_bundle.py BUNDLE ../shared/data/dsb2018/stage1_train OUT_BUNDLE

For a bundle trained elsewhere with ``--no-tune`` (the default model came from a lent GPU
machine, trained on grey-packed data): the validation split is recomputed from DATA with the
bundle's seed and fraction, checked against the ids the bundle recorded, and the grid search
of `nucleibatch train` (``nucleibatch.training.tune``) runs on those images in their original
form. The weights are copied unchanged; ``postprocess`` and ``metrics`` are updated.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from nucleibatch.model import load_model, save_bundle
from nucleibatch.training.run import TrainSettings, load_examples
from nucleibatch.training.tune import tune_postprocess


def main(bundle: str, data: str, target: str) -> int:
    model = load_model(bundle)
    training = model.config.training
    settings = TrainSettings(data=[data], run_dir="unused", seed=int(training["seed"]), val_fraction=float(training.get("val_fraction", 0.1)))
    _, val = load_examples(settings, model.config.normalization)
    if [e.image_id for e in val] != training["val_image_ids"]:
        raise SystemExit("the validation split of DATA differs from the one recorded in the bundle: wrong DATA, seed or fraction")
    params, scores = tune_postprocess(model, val, model.config.postprocess_params, search=True)
    metrics = {**model.config.metrics, **{f"val_{k}": round(v, 4) for k, v in scores.items()}, "val_images": len(val)}
    config = replace(model.config, postprocess=params.to_dict(), metrics=metrics)
    save_bundle(model.network.float(), config, Path(target))
    print(json.dumps({"postprocess": config.postprocess, "metrics": config.metrics}, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    sys.exit(main(*sys.argv[1:]))
