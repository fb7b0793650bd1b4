"""`python jobs/segment.py ARGS` = `nucleibatch segment ARGS`, for `ray job submit --working-dir . -- python jobs/segment.py ...`.

Inside a Ray job, RAY_ADDRESS is set, so the run joins the job's cluster (ray.init() with no address).
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("segment"))
