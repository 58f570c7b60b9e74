"""``python -m tests.helpers.train_stop N ARGS...``: ``movekd train ARGS`` preempted after step N.

The run is built exactly as ``jobs.train`` builds it (same argument parser, ``resolve_config``,
``build_training``) and stops after optimizer step N with a checkpoint, as a job killed right
after a checkpoint would. Its config, hence its schedule and fingerprint, is the full run's, so a
later ``movekd train ARGS --resume`` must continue it exactly. (Stopping by ``--max-steps N``
instead would change ``max_steps``, which the checkpoint fingerprint rightly refuses on resume:
the cosine schedule depends on it.)
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str]) -> int:
    from jobs.train import Dist, add_arguments, build_training, resolve_config

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stop_after, rest = int(argv[0]), argv[1:]
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.train_stop")
    add_arguments(parser)
    args = parser.parse_args(rest)
    trainer, _ = build_training(resolve_config(args), Dist(), args.online_teachers)
    state = trainer.train(resume=args.resume, stop_after=stop_after)
    print(f"stopped after step {state.step}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
