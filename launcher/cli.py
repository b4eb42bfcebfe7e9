"""`mor submit` and `mor status`: the SLURM side of the command line. Neither module imports torch
(`mor status` answers at once); submit loads the config only when it runs."""

from __future__ import annotations

from mor_dist.launcher.status import add_status_parser
from mor_dist.launcher.submit import add_submit_parser


def add_slurm_parsers(sub) -> None:
    add_submit_parser(sub)
    add_status_parser(sub)
