"""Segment on a SLURM cluster with Dask: dask-jobqueue submits GPU worker jobs, then nucleibatch
runs its Dask engine on them.

    pip install dask-jobqueue
    python cluster/dask_slurm.py /shared/plates -o /shared/out/plates --jobs 4 --queue gpu --walltime 04:00:00
    python cluster/dask_slurm.py /shared/slides -o /shared/out/slides --jobs 2 --model he --block-size 4096 --retry-failed

Every option that this script does not define itself goes to ``nucleibatch segment`` (INPUT...,
``-o OUT``, ``--model``, ``--block-size``, ``--pixel-size``, ``--json``, ...: see ``nucleibatch
segment --help``); they are checked before any SLURM job is submitted. The script sets
``--engine dask`` and ``--address`` (its scheduler) itself, and ``--device cuda`` unless given.

Run it on a login node (or inside a small CPU job): this process hosts the Dask scheduler and
the run's driver, and stays until the run ends. Each SLURM job (``#SBATCH --gres=gpu:1``) runs
one Dask worker that declares the Dask resource ``GPU=1``; nucleibatch's model units ask for
that resource, so the model runs there, once per worker, while reading and post-processing
go to any worker (post-processing needs about 12-18 CPU cores per GPU, hence ``--cores 16``).
The workers start this same Python (``sys.executable``), so the virtual environment with
nucleibatch and torch (CUDA build) must be on a filesystem the compute nodes mount, as must a
``--model`` bundle folder. INPUT and OUT are paths or ``file://`` URLs on that filesystem, or
object-store URLs (``s3://bucket/plates -o s3://bucket/out``, ``gs://...``) read and written
through fsspec (``pip install "nucleibatch[s3]"``; the workers find the store's credentials in
their environment, e.g. ``AWS_*`` variables exported by a ``--prologue`` line).

Re-running the same command on the same OUT resumes: finished images are skipped.

Alternative without this script: start the scheduler and the workers yourself, then point
``nucleibatch segment`` at the scheduler, e.g.

    dask scheduler --port 8786                                        # on HOST
    srun --gres=gpu:1 dask worker tcp://HOST:8786 --nthreads 16 --resources "GPU=1"   # per GPU
    nucleibatch segment /shared/plates -o /shared/out/plates --engine dask --address tcp://HOST:8786 --device cuda
"""

from __future__ import annotations

import argparse
import sys

# segment options that this script sets itself
OWN_SEGMENT_OPTIONS = ("--engine", "--address")


def build_parser() -> argparse.ArgumentParser:
    """The script's own options (SLURM and waiting); everything else is segment's."""
    p = argparse.ArgumentParser(
        prog="dask_slurm.py",
        usage="%(prog)s INPUT... -o OUT [SLURM options] [segment options]",
        description="Start GPU Dask workers as SLURM jobs (dask-jobqueue) and segment INPUT... into OUT on them "
        "(`nucleibatch segment --engine dask`).",
        epilog="Every other option goes to `nucleibatch segment` (INPUT..., -o OUT, --model, --block-size, --pixel-size, "
        "--retry-failed, --json, ...: see `nucleibatch segment --help`). --engine and --address are set here; "
        "--device is cuda unless given.",
        allow_abbrev=False,  # an abbreviation must not swallow one of segment's options
    )
    p.add_argument("--jobs", type=int, default=2, help="SLURM jobs = GPU workers [2]")
    p.add_argument("--queue", default=None, help="SLURM partition [the cluster's default]")
    p.add_argument("--walltime", default="02:00:00", help="walltime per worker job [02:00:00]")
    p.add_argument("--account", default=None, help="SLURM account to charge")
    p.add_argument("--cores", type=int, default=16, help="CPU cores per job (the worker's threads; post-processing needs about 12-18 per GPU) [16]")
    p.add_argument("--memory", default="64GB", help="memory per job [64GB]")
    p.add_argument("--interface", default=None, help="network interface of the workers and scheduler, e.g. ib0")
    p.add_argument("--prologue", action="append", default=[], metavar="CMD", help="shell line run before the worker starts, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--wait", type=float, default=3600, help="seconds to wait for all workers to join; the run starts with those present if at least one [3600]")
    return p


def parse_arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """Split the command line into this script's options and ``nucleibatch segment``'s, each
    parsed by its own parser (segment's is the real one of the command line, so its values,
    choices and required options are checked here, before SLURM is asked for anything).

    Returns ``(slurm options, segment arguments)``; segment's have ``engine="dask"`` and
    ``device="cuda"`` unless ``--device`` was given. ``address`` is left to the caller (the
    scheduler's, once it runs). A usage error exits with status 2, as the command line does.
    """
    parser = build_parser()
    own, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    for word in rest:
        if word.split("=", 1)[0] in OWN_SEGMENT_OPTIONS:
            parser.error(f"{word.split('=', 1)[0]} is set by this script (the Dask scheduler it starts); leave it out")
    from nucleibatch.cli import build_parser as nucleibatch_parser

    # "--device cuda" first: a --device in rest comes later and wins
    segment = nucleibatch_parser().parse_args(["segment", "--device", "cuda", *rest])
    segment.engine = "dask"
    return own, segment


def main(argv: list[str] | None = None) -> int:
    args, segment_args = parse_arguments(argv)
    from nucleibatch.runtime.allocator import tune_allocator, worker_environment

    tune_allocator()  # first, as the command line does: this process runs the driver (nucleibatch/runtime/allocator.py)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        print("dask_slurm.py: dask-jobqueue is not installed: pip install dask-jobqueue", file=sys.stderr)
        return 2
    from distributed import Client

    from nucleibatch.cli.segment import run as run_segment
    from nucleibatch.errors import NucleibatchError
    from nucleibatch.io.discover import check_inputs_exist

    try:
        check_inputs_exist(segment_args.inputs)  # before SLURM is asked for anything
    except NucleibatchError as error:
        print(f"dask_slurm.py: error: {error}", file=sys.stderr)
        return error.exit_code
    cluster = SLURMCluster(
        queue=args.queue,
        account=args.account,
        cores=args.cores,
        processes=1,  # one worker process per job: it holds the GPU and loads the model once
        memory=args.memory,
        walltime=args.walltime,
        interface=args.interface,
        job_extra_directives=["--gres=gpu:1"],
        worker_extra_args=["--resources", "GPU=1"],
        # the nanny's pre-spawn variables reach the worker process at its start (glibc reads them then): nucleibatch/runtime/allocator.py
        job_script_prologue=[f"export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=\"{worker_environment()!r}\"", *args.prologue],
    )
    client = Client(cluster)
    try:
        print(f"scheduler: {cluster.scheduler_address}   dashboard: {cluster.dashboard_link}", flush=True)
        cluster.scale(jobs=args.jobs)
        try:
            client.wait_for_workers(args.jobs, timeout=args.wait)
        except TimeoutError:
            joined = len(client.scheduler_info()["workers"])
            if not joined:
                print(f"dask_slurm.py: no worker joined within {args.wait:.0f} s (see squeue and the job logs)", file=sys.stderr)
                return 1
            print(f"{joined}/{args.jobs} workers joined within {args.wait:.0f} s; starting with those", flush=True)
        segment_args.address = cluster.scheduler_address
        try:
            return run_segment(segment_args)  # as `nucleibatch segment ...`: runs, prints the summary, returns the exit status
        except NucleibatchError as error:  # a usage error (bad bundle, settings that OUT refuses, ...): one line, as the CLI
            print(f"dask_slurm.py: error: {error}", file=sys.stderr)
            return error.exit_code
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
