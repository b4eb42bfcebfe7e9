"""`srun python -m mor_dist.launcher.srun_task -- CMD...`: set this task's rank variables, exec CMD.

exec, not a child process: the training process takes this task's place, so the USR1/TERM that srun
forwards reaches it directly and its exit code is the task's exit code.
"""

from __future__ import annotations

import os
import sys

from mor_dist.launcher.env import task_env


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("usage: python -m mor_dist.launcher.srun_task -- COMMAND [ARGS...]", file=sys.stderr)
        return 64
    try:
        os.environ.update(task_env(os.environ))
    except (RuntimeError, ValueError) as e:
        print(f"srun_task: {e}", file=sys.stderr)
        return 64
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
