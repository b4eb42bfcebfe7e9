"""Fill the sbatch template: {{name}} placeholders; lines whose value is None are left out."""

from __future__ import annotations

import re
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def render(template: str, values: dict) -> str:
    unknown = sorted({m.group(1) for m in PLACEHOLDER.finditer(template)} - set(values))
    if unknown:
        raise KeyError(f"the template uses placeholders that mor submit does not fill: {', '.join(unknown)}")
    lines = []
    for line in template.splitlines():
        names = PLACEHOLDER.findall(line)
        if any(values[n] is None for n in names):
            continue  # an optional #SBATCH setting that was not given
        lines.append(PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), line))
    return "\n".join(lines) + "\n"
