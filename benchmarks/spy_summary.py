"""Where a profiled run's time went: py-spy's raw output summarised per process and thread.

    python benchmarks/spy_summary.py PROFILE.txt [--top 25]

PROFILE.txt is ``py-spy record --subprocesses --threads --idle --format raw`` (what ``benchmarks/gpu.sh
profile`` writes): one collapsed stack per line with its sample count. Printed: samples per
process and thread, the share of them idle (waiting on a lock, a queue, a pipe or sleeping),
and per thread the busiest functions of this package (or the leaf function outside it).
"""

from __future__ import annotations

import argparse
import collections
import re

PROCESSES = re.compile(r'(?:process \d+:"[^"]*"(?:;|$))+')
PROCESS = re.compile(r'process (\d+):"([^"]*)"')
# leaf frames of a thread that waits: for work (a pool's queue), a lock, a pipe, a child, a timer
IDLE_LEAVES = (
    "_worker (concurrent/futures/thread.py",
    "SemLock.__enter__",
    "wait (threading.py",
    "_wait_for_tstate_lock",
    "get (queue.py",
    "get (multiprocessing/queues.py",
    "_recv",
    "_poll",
    "poll (",
    "select (",
    "sleep",
    "acquire",
    "main (multiprocessing/resource_tracker.py",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    per_thread: collections.Counter = collections.Counter()
    idle: collections.Counter = collections.Counter()
    functions: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in open(args.profile):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        # --subprocesses: a stack starts with 'process PID:"command"' for the parent and each child
        # down to the sampled one (a command may hold ';'); --threads: then 'thread (TID): name'
        chain = PROCESSES.match(stack)
        pids = PROCESS.findall(chain.group(0)) if chain else []
        process = f"{pids[-1][0]} {pids[-1][1][:50]}" if pids else "-"
        frames = stack[chain.end() if chain else 0 :].split(";")
        thread = frames[0][:32] if frames[0].startswith("thread ") else "-"
        key = f"{process} | {thread}"
        samples = int(count)
        per_thread[key] += samples
        leaf = frames[-1]
        if any(marker in leaf for marker in IDLE_LEAVES):
            idle[key] += samples
            continue
        if len(frames) == 1 and thread != "-":
            functions[key]["(no Python frame)"] += samples
            continue
        ours = [f for f in frames if "nucleibatch/" in f]
        functions[key][(ours[-1] if ours else leaf).split(" (")[0] + (" > " + leaf.split(" (")[0] if ours and ours[-1] != leaf else "")] += samples
    total = sum(per_thread.values())
    print(f"{total} samples")
    for key, samples in per_thread.most_common():
        print(f"{samples:8d}  idle {100 * idle[key] / samples:5.1f} %  {key}")
    for key, _ in per_thread.most_common(args.top):
        busy = functions[key]
        if not busy:
            continue
        print(f"\n{key}")
        for name, samples in busy.most_common(8):
            print(f"    {samples:8d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
