"""Segment on a SLURM cluster with Dask: dask-jobqueue submits GPU worker jobs, then nucleibatch
runs its Dask engine on them.

    pip install dask-jobqueue
    python cluster/dask_slurm.py /shared/plates -o /shared/out/plates --jobs 4 --queue gpu --walltime 04:00:00

Run it on a login node (or inside a small CPU job): this process hosts the Dask scheduler and
the run's driver, and stays until the run ends. Each SLURM job (``#SBATCH --gres=gpu:1``) runs
one Dask worker that declares the Dask resource ``GPU=1``; nucleibatch's model units ask for
that resource, so the model runs there, once per worker, while reading and post-processing
go to any worker. The workers start this same Python (``sys.executable``), so the virtual
environment with nucleibatch and torch (CUDA build) must be on a filesystem the compute nodes
mount, like INPUT and OUT (and a ``--model`` bundle folder). Object-store URLs (s3://, ...)
are not supported yet; ``file://`` URLs are.

Re-running the same command on the same OUT resumes: finished images are skipped.

Alternative without this script: start the scheduler and the workers yourself, then point
``nucleibatch segment`` at the scheduler, e.g.

    dask scheduler --port 8786                                        # on HOST
    srun --gres=gpu:1 dask worker tcp://HOST:8786 --nthreads 4 --resources "GPU=1"   # per GPU
    nucleibatch segment /shared/plates -o /shared/out/plates --engine dask --address tcp://HOST:8786 --device cuda
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dask_slurm.py",
        description="Start GPU Dask workers as SLURM jobs (dask-jobqueue) and segment INPUT... into OUT on them.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, zarr stores or manifests (on a shared filesystem)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (on a shared filesystem)")
    p.add_argument("--jobs", type=int, default=2, help="SLURM jobs = GPU workers [2]")
    p.add_argument("--queue", default=None, help="SLURM partition [the cluster's default]")
    p.add_argument("--walltime", default="02:00:00", help="walltime per worker job [02:00:00]")
    p.add_argument("--account", default=None, help="SLURM account to charge")
    p.add_argument("--cores", type=int, default=8, help="CPU cores per job (the worker's threads) [8]")
    p.add_argument("--memory", default="64GB", help="memory per job [64GB]")
    p.add_argument("--interface", default=None, help="network interface of the workers and scheduler, e.g. ib0")
    p.add_argument("--prologue", action="append", default=[], metavar="CMD", help="shell line run before the worker starts, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--model", default="default", help="'default' (shipped) or a bundle folder on the shared filesystem [default]")
    p.add_argument("--wait", type=float, default=3600, help="seconds to wait for all workers to join; the run starts with those present if at least one [3600]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        print("dask_slurm.py: dask-jobqueue is not installed: pip install dask-jobqueue", file=sys.stderr)
        return 2
    from distributed import Client

    from nucleibatch.allocator import worker_environment
    from nucleibatch.errors import NucleibatchError
    from nucleibatch.segment import closing_summary, run_segment_job

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
        # the nanny's pre-spawn variables reach the worker process at its start (glibc reads them then): nucleibatch/allocator.py
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
        try:
            summary = run_segment_job(args.inputs, args.output, model=args.model, engine="dask", address=cluster.scheduler_address, device="cuda")
        except NucleibatchError as error:  # a usage error (missing input, bad bundle, ...): one line, as the CLI
            print(f"dask_slurm.py: error: {error}", file=sys.stderr)
            return error.exit_code
        print(closing_summary(summary))
        return summary.exit_code
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
