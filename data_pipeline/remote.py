"""Where a prepared dataset lives: a local directory, or any URL webdataset's gopen opens -- `file:`,
`http(s)://` (through curl), `pipe:COMMAND` (the command's stdout), and the other schemes gopen
knows (gs:, ais:, ...).

A location names the dataset directory. File names are appended with "/" (`http://host/ds` ->
`http://host/ds/manifest.json`), or put where `{}` stands (`pipe:aws s3 cp s3://bucket/ds/{} -`),
which is how a pipe: command names its files.

Only local paths and file: URLs allow seeks; everything else is fetched whole, start to end, with
retries and a growing pause between them, and checked against the manifest's size and sha256.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from mor_dist.data_pipeline.errors import DataError

log = logging.getLogger("mor_dist.data")

PLACEHOLDER = "{}"
# What curl's exit statuses mean (gopen opens http(s) URLs with `curl -f -s -L`).
_CURL_EXITS = {6: "cannot resolve the host", 7: "cannot connect", 22: "HTTP error status (4xx/5xx)",
               28: "timed out", 35: "TLS handshake failed", 56: "connection broken while receiving"}


def scheme(loc: str) -> str:
    """The URL scheme, or "" for a local path (a one-letter scheme is a Windows drive, not a URL)."""
    s = urlparse(loc).scheme
    return s if len(s) > 1 else ""


def local_path(loc: str) -> Path | None:
    """The local path of a local path or file: URL (seekable); None for anything else."""
    s = scheme(loc)
    if s == "":
        return Path(loc).expanduser() if PLACEHOLDER not in loc else None
    if s == "file":
        return Path(unquote(urlparse(loc).path))
    return None


def join(base: str, name: str) -> str:
    """The location of file `name` of the dataset at `base`."""
    if PLACEHOLDER in base:
        return base.replace(PLACEHOLDER, name)
    path = local_path(base)
    if path is not None:
        return str(path / name)
    if scheme(base) == "pipe":
        raise DataError(base, "a pipe: dataset location needs {} where the file name goes, e.g. "
                              "pipe:aws s3 cp s3://bucket/dataset/{} -")
    return base.rstrip("/") + "/" + name


def check_location(loc: str) -> None:
    """Refuses a scheme that gopen has no reader for, before anything is fetched."""
    from webdataset.gopen import gopen_schemes

    s = scheme(loc)
    if s not in ("", "file") and s not in gopen_schemes:
        raise DataError(loc, f"no reader for {s}: URLs; give a local path, file:, http(s):// or a pipe: command, "
                             f"e.g. pipe:aws s3 cp {loc.rstrip('/')}/{{}} -")


def display_name(loc: str) -> str:
    """A short name for a dataset location: its last path component (the `{}` and what follows it
    dropped), for TensorBoard tags and messages."""
    head = loc.split(PLACEHOLDER)[0] if PLACEHOLDER in loc else loc
    head = head.rstrip("/ ")
    name = re.split(r"[/\s:]", head)[-1] if head else ""
    return name or "dataset"


@dataclass(frozen=True)
class FetchPolicy:
    retries: int = 4  # attempts after the first
    backoff_s: float = 1.0  # pause before retry i is backoff_s * 2**i


def _problem(e: Exception, loc: str) -> str:
    text = " ".join(str(e).split())
    m = re.search(r"exit (\d+)", text)
    if m:
        code = int(m.group(1))
        if scheme(loc) in ("http", "https"):
            return f"curl exit status {code} ({_CURL_EXITS.get(code, 'see man curl')})"
        return f"command exit status {code}"
    if isinstance(e, FileNotFoundError):
        return "no such file"
    return text[:200] or type(e).__name__


def fetch(loc: str, policy: FetchPolicy, size: int | None = None, sha256: str | None = None,
          what: str = "file") -> bytes:
    """The whole content of `loc`, read start to end through gopen, checked against `size` and
    `sha256` when given. A failed or damaged transfer is retried (policy); the last failure raises
    DataError naming the location."""
    from webdataset.gopen import gopen

    problem = ""
    for attempt in range(policy.retries + 1):
        if attempt:
            pause = policy.backoff_s * 2 ** (attempt - 1)
            log.warning("%s: %s; retry %d of %d in %.1fs", loc, problem, attempt, policy.retries, pause)
            time.sleep(pause)
        try:
            stream = gopen(loc, "rb")
            try:
                data = stream.read()
            finally:
                stream.close()  # a pipe's exit status is checked here
        except Exception as e:  # noqa: BLE001 - gopen raises OSError, ValueError, ... for one failed read
            problem = _problem(e, loc)
            continue
        if size is not None and len(data) != size:
            problem = f"got {len(data)} bytes, the manifest says {size}"
        elif sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            problem = f"sha256 of the {len(data)} bytes received does not match the manifest's {sha256[:16]}..."
        else:
            return data
    raise DataError(loc, f"{what} fetch failed after {policy.retries + 1} attempts: {problem}; check the URL, "
                         "the command or the network (data.fetch_retries and data.fetch_backoff_s set the retries)")


def read_text(loc: str, policy: FetchPolicy, what: str) -> str:
    """A small text file (manifest, tokenizer) from a local path or URL."""
    path = local_path(loc)
    if path is not None:
        if not path.is_file():
            raise DataError(path, f"{what} is missing")
        return path.read_text(encoding="utf-8")
    data = fetch(loc, policy, what=what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(loc, f"{what} is not UTF-8 text; check the URL") from None
