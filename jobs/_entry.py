"""The jobs' shared start: run one `nucleibatch` subcommand, or say in one line that this Python
lacks the package (a Ray job runs the Python of the head's environment)."""

from __future__ import annotations

import sys


def run(subcommand: str) -> int:
    """``nucleibatch SUBCOMMAND ARGS`` with this script's arguments; exit status 2 without the package."""
    try:
        from nucleibatch.cli import main
    except ImportError as error:
        print(
            f"{sys.argv[0]}: this Python ({sys.executable}) cannot import nucleibatch ({error}); "
            "start the Ray head from the environment that has it (source .venv/bin/activate, then ray start --head ...), "
            "or install nucleibatch[ray] on every node (see cluster/README.md)",
            file=sys.stderr,
        )
        return 2
    return main([subcommand, *sys.argv[1:]])
