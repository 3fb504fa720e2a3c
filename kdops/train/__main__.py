"""``python -m kdops.train train ...`` / ``python -m kdops.train distill ...``: the CLI without
the console scripts (e.g. ``torchrun --nproc_per_node 2 -m kdops.train distill --recipe cwd``)."""
import sys

from kdops.train.cli import distill_main, train_main

COMMANDS = {"train": train_main, "distill": distill_main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print("usage: python -m kdops.train {train,distill} [options]", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
