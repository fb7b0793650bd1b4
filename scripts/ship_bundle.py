"""Copy a trained bundle into the package as a shipped model, with the licence of its training data.

    python scripts/ship_bundle.py RUN_DIR/bundle NAME --licence CC-BY-NC-SA-4.0 --citation "..."

NAME is the name ``--model`` takes (``nucleibatch/models/NAME``, listed in
``nucleibatch.model.bundle.SHIPPED_BUNDLES``). The weights are copied unchanged (their sha256 is checked);
``config.json`` gains ``name`` and, when given, ``licence`` (what ``train --licence/--citation``
record), and is written in the current format (``nucleibatch.model.config.migrate``). A shipped bundle must stay under 32 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from nucleibatch.model.bundle import (
    CONFIG_NAME,
    SHIPPED_BUNDLES,
    WEIGHTS_NAME,
    load_model,
    read_config,
    sha256_file,
)
from nucleibatch.training.run import licence_record

MAX_BYTES = 32 * 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("name", choices=sorted(SHIPPED_BUNDLES))
    parser.add_argument("--licence", default=None)
    parser.add_argument("--citation", default=None)
    parser.add_argument("--training-data", action="append", default=None, metavar="TEXT", help="what the model was trained on, for the licence record (repeatable) [the run's DATA paths]")
    parser.add_argument("--bundle-name", default=None, help="the config's name [kept]")
    args = parser.parse_args(argv)
    config = read_config(args.bundle / CONFIG_NAME)  # bundles trained before "serves" get it, from their input
    weights = args.bundle / config.weights_file
    if sha256_file(weights) != config.weights_sha256:
        sys.exit(f"{weights}: sha256 differs from the config's: not the bundle that was evaluated")
    if weights.stat().st_size > MAX_BYTES:
        sys.exit(f"{weights}: {weights.stat().st_size:,} bytes, over the 32 MB a shipped bundle may take")
    if args.licence or args.citation:
        config = replace(config, licence=licence_record(args.licence, args.citation, args.training_data or config.training.get("data", [])))
    if args.bundle_name:
        config = replace(config, name=args.bundle_name)
    target = SHIPPED_BUNDLES[args.name]
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, target / WEIGHTS_NAME)
    (target / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    for path in (target / WEIGHTS_NAME, target / CONFIG_NAME):
        path.chmod(0o644)  # readable by every user of an installation
    load_model(args.name)  # it loads as shipped
    print(f"{args.name}: {target} ({weights.stat().st_size / 1e6:.1f} MB, sha256 {config.weights_sha256[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
