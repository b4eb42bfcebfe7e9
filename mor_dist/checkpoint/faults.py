"""Fault points: named places in the save path where a test can kill the process.

MOR_CHECKPOINT_FAULT=<N> SIGKILLs this process at the N-th fault point it reaches (1-based);
<TEXT>@<N> at the N-th point whose name contains TEXT ("rename latest@2"); `trace` prints each
point as it passes ("fault point 3: rename step_00000004.tmp"), so a test can count them and kill
at each in turn. Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import os
import signal
import sys

_seen: dict[str, int] = {}


def fault_point(what: str) -> None:
    spec = os.environ.get("MOR_CHECKPOINT_FAULT")
    if not spec:
        return
    text, _, n = spec.rpartition("@") if "@" in spec else ("", "", spec)
    if spec == "trace":
        _seen[""] = _seen.get("", 0) + 1
        print(f"fault point {_seen['']}: {what}", file=sys.stderr, flush=True)
        return
    if text not in what:
        return
    _seen[text] = _seen.get(text, 0) + 1
    if _seen[text] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
