"""torchrun worker for test_fsdp_stages.py: `medsight.train.cli` with every `os.fsync` recorded.

    torchrun --nproc-per-node 2 fsync_worker.py LOG TRAIN_ARGS...

Each rank appends the path of every file it flushes to LOG.rank{RANK}, in order, then runs the training command.
"""

from __future__ import annotations

import os
import runpy
import sys


def main(log_path: str, args: list[str]) -> None:
    fsync = os.fsync
    with open(f"{log_path}.rank{os.environ['RANK']}", "a") as log:

        def recording_fsync(fd: int) -> None:
            log.write(os.readlink(f"/proc/self/fd/{fd}") + "\n")
            log.flush()
            fsync(fd)

        os.fsync = recording_fsync
        sys.argv = ["medsight.train.cli", *args]
        runpy.run_module("medsight.train.cli", run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
