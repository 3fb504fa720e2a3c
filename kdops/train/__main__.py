"""``python -m kdops.train train ...`` / ``python -m kdops.train distill ...``: the CLI without
the console scripts (e.g. ``torchrun --nproc_per_node 2 -m kdops.train distill --recipe cwd``)."""
import os
import sys

from kdops.train.cli import distill_main, train_main

COMMANDS = {"train": train_main, "distill": distill_main}
USAGE = """usage: python -m kdops.train {train,distill} [options]

commands:
  train     train one segmentation model with cross-entropy (= kdops-train)
  distill   distill a student with a recipe, e.g. distill --recipe cwd (= kdops-distill)

python -m kdops.train COMMAND --help shows a command's options."""


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        got = f"unknown command {argv[0]!r}" if argv else "no command"
        print(f"python -m kdops.train: error: {got}; choose train or distill (see python -m kdops.train --help)",
              file=sys.stderr)
        return 2
    launcher = "python"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: the resume hint must say so
        launcher = f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])}"
    return COMMANDS[argv[0]](argv[1:], invocation=f"{launcher} -m kdops.train {argv[0]}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
