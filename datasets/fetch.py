"""Fetch the published split and description files, each verified against its pinned git blob
id before it is moved into place (``scripts/get_files.py``, doc/datasets.md).

A download goes to a temporary sibling of its target, is verified (SHA-1 over
``blob <size>\\0`` + content, the id git gives the file), and only then renamed over the target:
a mismatch, a broken connection or a full disk leaves nothing behind. A file already in place
that verifies is skipped; one that differs is reported and kept unless ``force``.
"""
from __future__ import annotations

import errno
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from utils import RaftError, atomic_write, printable, unreachable

from .published import RAW_URL, PublishedFile, file_blob_id, git_blob_id

TIMEOUT = 10.0          # seconds without an answer before a server counts as unreachable
MIN_RATE = 16 << 10     # bytes per second: a download slower than this on the whole stops (a trickling server)
UNPINNED_LIMIT = 64 << 20   # bytes: a file whose size is not pinned
CHUNK = 1 << 16
PROGRESS_BYTES = 1 << 20   # files larger than this show a progress bar


@dataclass
class Outcome:
    file: PublishedFile
    target: Path
    status: str          # "downloaded", "present" (verified), "differs" (kept), "failed"
    detail: str = ""


def reach(base_url: str, timeout: float = TIMEOUT) -> None:
    """Fail in seconds, with one line, when the server cannot be reached (no network, a proxy
    that refuses, a wrong --base-url); any HTTP answer counts as reachable."""
    reason = unreachable(base_url.rstrip("/") + "/", timeout)
    if reason is not None:
        raise RaftError(f"cannot reach {base_url} ({reason}): offline, or behind a proxy that needs HTTPS_PROXY? "
                        f"datasets/published.py lists the files, their paths in the published repository and their "
                        f"git blob ids, for a download by hand")


def download(url: str, target: Path, expected: PublishedFile, timeout: float = TIMEOUT) -> None:
    """``url`` into ``target``, atomically (``utils.atomic_write``), if and only if its content has
    the pinned blob id: a mismatch raises inside the write, which leaves nothing behind."""
    start = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(target.parent, os.W_OK):
        raise RaftError(f"cannot write into {printable(target.parent)} (read-only): choose another --data_root")

    # the pinned size bounds what is read, and the whole download's time (the timeout is per read:
    # a server sending a byte every few seconds would never trigger it)
    size = expected.size or UNPINNED_LIMIT
    deadline = time.monotonic() + 3 * timeout + size / MIN_RATE

    def write(out) -> None:
        data = bytearray()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as answer:
                bar = tqdm(total=size, unit="B", unit_scale=True, desc=target.name, leave=False,
                           disable=None if size > PROGRESS_BYTES else True)
                with bar:
                    while block := answer.read1(min(CHUNK, size + 1 - len(data))):   # what has come: the clock is read
                        data += block
                        if len(data) > size:
                            raise RaftError(f"{url}: the answer is longer than the {size:,} bytes pinned for it: "
                                            f"refused, nothing written")
                        if time.monotonic() > deadline:
                            raise RaftError(f"{url}: {len(data):,} of {size:,} bytes after "
                                            f"{deadline - start:.0f}s (slower than {MIN_RATE >> 10} KiB/s): stopped, "
                                            f"nothing written")
                        out.write(block)
                        bar.update(len(block))
        except urllib.error.HTTPError as exc:
            raise RaftError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
            raise RaftError(f"{url}: {getattr(exc, 'reason', exc)}") from None
        got = git_blob_id(bytes(data))
        if got != expected.git_blob:
            got_size = f"{len(data)} bytes" + (f", {expected.size} expected" if expected.size else "")
            raise RaftError(f"{url}: the content's git blob id is {got}, the pinned one {expected.git_blob} "
                            f"({got_size}): refused, nothing written")

    try:
        atomic_write(target, write)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise RaftError(f"no space left on device while writing {printable(target)}: nothing was written") from None
        raise


def fetch(files: list[tuple[PublishedFile, Path]], base_url: str = RAW_URL, force: bool = False,
          timeout: float = TIMEOUT) -> list[Outcome]:
    """Each (file, target): skipped when the target verifies, reported when it differs (replaced
    only with ``force``), downloaded otherwise. A failure is recorded and the rest go on."""
    outcomes = []
    if any(not target.is_file() or force for _, target in files):
        reach(base_url, timeout)
    for published, target in files:
        if target.is_file() and not force:
            blob = file_blob_id(target)
            if blob == published.git_blob:
                outcomes.append(Outcome(published, target, "present"))
            else:
                outcomes.append(Outcome(published, target, "differs", f"its blob id is {blob}, the published file's "
                                                                      f"{published.git_blob}; kept (--force replaces)"))
            continue
        try:
            download(f"{base_url.rstrip('/')}/{published.path}", target, published, timeout)
            outcomes.append(Outcome(published, target, "downloaded"))
        except RaftError as exc:
            outcomes.append(Outcome(published, target, "failed", str(exc)))
    return outcomes
