"""Time the training loops of one mmsec command, in one process or under torchrun.

    python benchmarks/ddp_scaling.py attack -p uap ...                       # one process
    torchrun --nproc_per_node 2 benchmarks/ddp_scaling.py attack -p uap ...  # two

Runs the CLI command in this process with ``mmsec.train`` wrapped, and prints JSON (rank 0):
each process's CPU seconds and wall seconds inside ``train`` and the steps taken. On a
shared machine the wall time depends on the other jobs; the CPU seconds of the busiest
process give the time N processes would take with a core each, so
``one.cpu / max(two.cpu)`` is the data-parallel speed-up the code allows and
``one.wall / two.wall`` the one measured.
"""

from __future__ import annotations

import json
import sys
import time

import mmsec.training
from mmsec import distributed

_train = mmsec.training.train
_records: list[dict[str, float]] = []


def _timed(*args, **kwargs):
    cpu, wall = time.process_time(), time.perf_counter()
    result = _train(*args, **kwargs)
    _records.append({"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
                     "steps": result.steps})
    return result


mmsec.training.train = _timed  # before any plugin imports it (``from mmsec import train``)


def main() -> None:
    from mmsec.cli import main as cli

    try:
        cli(sys.argv[1:], prog_name="mmsec", standalone_mode=False)
    finally:
        per_rank = distributed.all_objects(_records)
        if distributed.is_main():
            sys.__stdout__.write(json.dumps({
                "world_size": distributed.world_size(),
                "command": " ".join(sys.argv[1:]),
                "train_cpu_s": [round(sum(r["cpu_s"] for r in rs), 3) for rs in per_rank],
                "train_wall_s": [round(sum(r["wall_s"] for r in rs), 3) for rs in per_rank],
                "steps": [int(sum(r["steps"] for r in rs)) for rs in per_rank],
            }) + "\n")


if __name__ == "__main__":
    main()
