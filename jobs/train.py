"""`python jobs/train.py ARGS` = `nucleibatch train ARGS`, for `ray job submit --working-dir . -- python jobs/train.py ...`.

Inside a Ray job, RAY_ADDRESS is set, so the run joins the job's cluster (ray.init() with no address).
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("train"))
