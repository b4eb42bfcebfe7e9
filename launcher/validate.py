"""Checks of the values `mor submit` writes into the sbatch script, and the one-line user errors.

The script is read twice: by sbatch (its #SBATCH lines) and by bash (everything). A line break in any
value would start a line of its own for both, so no value may hold a control character; values
with a syntax of their own in SLURM (time, partition, account, dependency, options) must match it.
Quoting is render.py's job; these checks make the values worth quoting.
"""

from __future__ import annotations

import re
import sys
import unicodedata

# Control characters (Cc: C0, DEL, C1 such as NEL), Unicode's line and paragraph separators, and
# surrogates (bytes of a non-UTF-8 argv that cannot even be written into the script).
REFUSED_CATEGORIES = ("Cc", "Zl", "Zp", "Cs")

# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (its man page's forms).
TIME_FORMS = [re.compile(p, re.ASCII) for p in (
    r"(?P<m>\d+)", r"(?P<m>\d+):(?P<s>\d+)", r"(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)",
    r"(?P<d>\d+)-(?P<h>\d+)", r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)", r"(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)",
)]
NO_LIMIT = ("UNLIMITED", "INFINITE", "-1")  # sbatch's words (any case) for no time limit
MAX_SIGNAL_LEAD = 65535  # sbatch refuses --signal=...@T above this
# Partition and account names as slurm.conf and sacctmgr spell them; --partition takes a list.
NAME = re.compile(r"[\w.-]+", re.ASCII)
# sbatch --dependency: TYPE:JOBID[:JOBID...] (after also takes JOBID+MINUTES) or singleton;
# a list joined by ',' (all must hold) or '?' (any).
JOB_ID = r"\d+(?:_\d+)?"
DEPENDENCY = re.compile(
    rf"singleton|after:{JOB_ID}(?:\+\d+)?(?::{JOB_ID}(?:\+\d+)?)*"
    rf"|after(?:any|burstbuffer|corr|notok|ok):{JOB_ID}(?::{JOB_ID})*", re.ASCII)
# One sbatch option: --name[=value] or -X[value]; a value may hold spaces (it is quoted), a name not.
SBATCH_OPTION = re.compile(r"--[A-Za-z][\w-]*(?:=.*)?|-[A-Za-z](?:\S.*)?", re.ASCII | re.DOTALL)


class UserError(ValueError):
    """A mistake the user can fix, shown as one line: `<flag or file>: <what is wrong>; <what to do>`."""

    def __init__(self, where: str, problem: str, fix: str):
        super().__init__(f"{where}: {problem}; {fix}")


def one_line(text: str) -> str:
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def report_errors(prog: str, func, args, user_errors: tuple = ()) -> int:
    """Run a subcommand; a user's mistake ends in one line on stderr and exit 2. Anything else is a
    bug and keeps its traceback."""
    try:
        return func(args)
    except (UserError, *user_errors) as e:
        message = str(e)
    except OSError as e:  # the file system said no (missing, read-only, not a folder...): name the file
        where = e.filename if e.filename is not None else "file system"
        message = f"{where}: {e.strerror or e}; check the path and its permissions"
    print(f"{prog}: {one_line(message)}", file=sys.stderr)
    return 2


def one_line_usage_errors(parser) -> None:
    """argparse prints its multi-line usage before a bad flag's error; one line says enough."""
    def error(message: str):
        parser.exit(2, f"mor: {message.removeprefix('argument ')}; see {parser.prog} --help\n")

    parser.error = error


def printable(where: str, value: str) -> str:
    for ch in value:
        if unicodedata.category(ch) in REFUSED_CATEGORIES:
            raise UserError(where, f"{value!r} contains the control character {ch!r}",
                            "use printable characters only")
    return value


def time_limit(value: str) -> int | None:
    """Seconds of an sbatch --time, rounded up to whole minutes as SLURM does; None: no limit."""
    printable("--time", value)
    if value.upper() in NO_LIMIT:
        return None
    for form in TIME_FORMS:
        m = form.fullmatch(value)
        if m:
            p = {k: int(v) for k, v in m.groupdict().items()}
            seconds = ((p.get("d", 0) * 24 + p.get("h", 0)) * 60 + p.get("m", 0)) * 60 + p.get("s", 0)
            return -(-seconds // 60) * 60 or None  # 0 asks for no limit
    raise UserError("--time", f"{value!r} is not a SLURM time",
                    "use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED")


def slurm_names(flag: str, value: str, several: bool) -> str:
    printable(flag, value)
    if not all(NAME.fullmatch(name) for name in (value.split(",") if several else [value])):
        raise UserError(flag, f"{value!r} is not a SLURM name",
                        "use letters, digits, '_', '.' and '-'" + (", names separated by ','" if several else ""))
    return value


def dependency(value: str) -> str:
    printable("--dependency", value)
    if not all(DEPENDENCY.fullmatch(item) for item in value.split("?" if "?" in value else ",")):
        raise UserError("--dependency", f"{value!r} is not a SLURM dependency",
                        "use TYPE:JOBID[:JOBID...] (TYPE after, afterany, afterok, afternotok, aftercorr, "
                        "afterburstbuffer) or singleton, several joined by ',' (all) or '?' (any)")
    return value


def sbatch_option(value: str) -> str:
    printable("--sbatch", value)
    if not SBATCH_OPTION.fullmatch(value):
        raise UserError("--sbatch", f"{value!r} is not one sbatch option",
                        "give one option per --sbatch, starting with '-', e.g. --sbatch=--qos=high "
                        "--sbatch=--exclusive")
    return value


def run_dir(value: str) -> str:
    printable("logging.run_dir", value)
    if "\\" in value:  # SLURM then drops the backslash and stops expanding %j in --output
        raise UserError("logging.run_dir", f"{value!r} contains a backslash, which SLURM's --output cannot take",
                        "choose a run folder path without '\\'")
    return value
