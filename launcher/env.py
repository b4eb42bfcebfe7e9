"""SLURM task environment -> the torch.distributed variables `mor train` reads.

srun starts one task per GPU (or per CPU rank); each task knows its global rank (SLURM_PROCID), the
task count (SLURM_NTASKS), its rank on the node (SLURM_LOCALID) and the node list. The batch script
normally exports MASTER_ADDR/MASTER_PORT once; when it did not, they are derived here the same way.
"""

from __future__ import annotations

import re
import subprocess

PORT_BASE, PORT_SPAN = 20000, 20000


def master_port(job_id: int | str) -> int:
    """One port per job: concurrent jobs sharing a node do not collide; a requeued job keeps it."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def tasks_per_node(spec: str, node_index: int) -> int:
    """Tasks on node `node_index` from SLURM's compressed form, e.g. "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"unexpected SLURM tasks-per-node value {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_index]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("node[1-2]" -> "node1"), expanded by scontrol itself."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def task_env(environ: dict) -> dict:
    """The variables to set for one srun task (does not modify `environ`)."""
    try:
        rank, world, local = environ["SLURM_PROCID"], environ["SLURM_NTASKS"], environ["SLURM_LOCALID"]
    except KeyError as e:
        raise RuntimeError(f"{e.args[0]} is not set: run this under srun inside a SLURM job") from None
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    local_world = tasks_per_node(spec, int(environ.get("SLURM_NODEID", 0))) if spec else 1
    out = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": local, "LOCAL_WORLD_SIZE": str(local_world)}
    if not environ.get("MASTER_ADDR"):
        out["MASTER_ADDR"] = first_host(environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"])
    if not environ.get("MASTER_PORT"):
        out["MASTER_PORT"] = str(master_port(environ["SLURM_JOB_ID"]))
    return out
