"""Fill the sbatch template: {{name}} placeholders; lines whose value is None (or []) are left out.

Each value is quoted for the reader of its line: sbatch reads `#SBATCH` lines (its own quoting),
bash the rest. A list value becomes several words (arguments) on the line.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from mor_dist.launcher.validate import UserError, printable

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
SBATCH_SPECIAL = re.compile(r"[\s\"'\\#]")


def sbatch_quote(word: str) -> str:
    """One argument of an #SBATCH line as sbatch parses it: whitespace separates arguments, an
    unquoted '#' starts a comment, quotes group, and a backslash escapes the next character (also
    inside quotes, unlike bash)."""
    if word and not SBATCH_SPECIAL.search(word):
        return word
    return '"' + re.sub(r'(["\\])', r"\\\1", word) + '"'


def _inside_quotes(line: str, end: int) -> bool:
    """Whether bash reads position `end` of `line` inside '...' or "..." (a value quoted by us and
    then put inside quotes again by a template would be unquoted)."""
    quote, i = None, 0
    while i < end:
        c = line[i]
        if c == "\\" and quote != "'":
            i += 2
            continue
        if quote is None and c in "'\"":
            quote = c
        elif c == quote:
            quote = None
        i += 1
    return quote is not None


def _filled(m: re.Match, values: dict, quote) -> str:
    value = values[m.group(1)]
    words = [str(w) for w in (value if isinstance(value, list) else [value])]
    return " ".join(quote(printable(m.group(0), w)) for w in words)


def render(template: str, values: dict, where: str = "template") -> str:
    unknown = sorted({m.group(1) for m in PLACEHOLDER.finditer(template)} - set(values))
    if unknown:
        raise UserError(where, f"uses placeholders that mor submit does not fill: {', '.join(unknown)}",
                        f"use only {', '.join(values)}")
    lines = []
    for number, line in enumerate(template.splitlines(), 1):
        names = PLACEHOLDER.findall(line)
        if any(values[n] is None or values[n] == [] for n in names):
            continue  # an optional #SBATCH setting that was not given
        stripped = line.lstrip()
        if stripped.startswith("#SBATCH"):
            quote = sbatch_quote
        elif stripped.startswith("#"):
            quote = str  # a comment to both readers: nothing to quote, no line break possible
        else:
            quote = shlex.quote
            for m in PLACEHOLDER.finditer(line):
                if _inside_quotes(line, m.start()):
                    raise UserError(f"{where}:{number}", f"{m.group(0)} stands inside quotes in shell code",
                                    "remove the quotes around it: its value is shell-quoted for you")
        lines.append(PLACEHOLDER.sub(lambda m: _filled(m, values, quote), line))
    return "\n".join(lines) + "\n"
