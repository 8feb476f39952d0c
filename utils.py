"""Small helpers every module uses: errors, text and names from files, atomic files (JSON,
YAML, torch), logging, seeding and devices, worker counts, a background thread, hashing, and
how an entry point turns errors into one line. The run's configuration is run/config.py, the
torchrun layer run/distributed.py.

torch and numpy are imported where they are used, not here: a command line or a config file
with a mistake is refused before the libraries load (seconds of CPU).
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import logging
import math
import os
import pickle
import queue
import random
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable

import yaml


class RaftError(Exception):
    """An error caused by the user's input: printed as one line, without a traceback."""


# --------------------------------------------------------------------------- text from files and names
TEXT_LIMIT = 256 << 20   # bytes: the largest text file a run reads whole (CuPL's ImageNet prompts are ~10 MB)
PIPE_SECONDS = 30.0       # a pipe (``--config <(...)``) must finish writing within this


def file_status(path: str | Path, what: str) -> os.stat_result:
    """``os.stat`` of a file a run is about to read; a missing file, a NUL byte in the name, a
    folder or an unreadable entry is one line naming it."""
    shown = printable(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise RaftError(f"{what} not found: {shown}") from None
    except ValueError:   # a NUL byte in the name
        raise RaftError(f"{what} {shown!r} is not a valid path (it holds a NUL byte)") from None
    except OSError as exc:
        raise RaftError(f"{what} {shown} cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise RaftError(f"{what} {shown} is a folder, not a file")
    return info


def read_bounded(path: str | Path, what: str = "file", limit: int = TEXT_LIMIT, pipe: bool = False) -> bytes:
    """The bytes of a file read whole, after checking it is one: a regular file of at most
    ``limit`` bytes (a folder, a FIFO, a device such as /dev/zero, or a larger file is one line).
    ``pipe``: a pipe is read too (process substitution), up to ``limit`` bytes and
    ``PIPE_SECONDS``, never blocking on a FIFO nobody writes to."""
    path = Path(path)
    shown = printable(path)
    info = file_status(path, what)
    if stat.S_ISREG(info.st_mode):
        if info.st_size > limit:
            raise RaftError(f"{what} {shown} is {info.st_size:,} bytes, more than the {limit:,} such a file may "
                            f"have")
        return path.read_bytes()
    kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode) or \
        stat.S_ISBLK(info.st_mode) else "not a regular file"
    if not (pipe and stat.S_ISFIFO(info.st_mode)):
        raise RaftError(f"{what} {shown} is {kind}, not a regular file: give a file")
    import select
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    chunks, size, deadline = [], 0, time.monotonic() + PIPE_SECONDS
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RaftError(f"{what} {shown} (a pipe) was not written to its end within {PIPE_SECONDS:.0f}s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise RaftError(f"{what} {shown} (a pipe) holds more than the {limit:,} bytes such a file may have")
            chunks.append(chunk)
    finally:
        os.close(fd)


def read_text(path: str | Path, what: str = "file", limit: int = TEXT_LIMIT, pipe: bool = False) -> str:
    """A text file a user or a third party brings (``read_bounded``): UTF-8, a byte-order mark
    dropped, CRLF and CR line ends read as LF. Anything else (Latin-1, UTF-16, a binary file)
    is refused in one line naming the file, the line and the byte, never guessed at."""
    data = read_bounded(path, what, limit, pipe)
    path = Path(path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RaftError(f"{what} {printable(path)} is not UTF-8 text: line {line} holds the byte "
                        f"0x{data[exc.start]:02x} (at byte {exc.start}; save it as UTF-8)") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise RaftError(f"{what} {printable(path)} is a binary file, not text (a NUL byte on line {line})")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_json(text: str, what: str) -> Any:
    """JSON text; malformed or absurdly nested JSON is one line naming where it came from."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RaftError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise RaftError(f"{what} is nested too deeply to be a JSON file this project writes or reads") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    """A JSON file through ``read_text``; malformed JSON is one line naming the file and line."""
    return parse_json(read_text(path, what), f"{what} {printable(path)}")


def printable(value: Any) -> str:
    """A path or name as text that any terminal, log or JSON file takes: names that are not
    valid UTF-8 (Python keeps their bytes as lone surrogates) show those bytes as \\xNN escapes."""
    return str(value).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def one_line(text: str) -> str:
    """A message on one line, whatever it quotes (a multi-line value, a library's error)."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message, shortened at a word boundary; its type's name
    when the message is empty (a bare ``OSError()``)."""
    lines = str(exc).splitlines()
    text = lines[0] if lines and lines[0].strip() else type(exc).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return text


def unreachable(url: str, timeout: float) -> str | None:
    """Why ``url``'s server cannot be reached within ``timeout`` seconds (no network, a refused
    connection, a proxy, a malformed address), or None when it answers: any HTTP status counts
    as an answer. One HEAD request, so that a tool fails in seconds instead of after a download
    library's minute of retries."""
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as exc:   # URLError, timeouts, refused connections, a bad address
        reason = getattr(exc, "reason", exc)
        return first_line(reason) if isinstance(reason, BaseException) else str(reason)
    return None


NAME_BYTES = 255   # the longest file name common file systems hold


def check_component(name: str, what: str, allow_empty: bool = False) -> str:
    """A name that becomes one folder or file name (a run's tag, a dataset's name, an output's
    stem) stays one: no separator, no '.' or '..', no NUL, at most 255 bytes; else one line."""
    if name == "" and allow_empty:
        return name
    problem = ("is empty" if name == "" else "holds a NUL byte" if "\x00" in name
               else "holds a path separator" if "/" in name or os.sep in name or (os.altsep and os.altsep in name)
               else "is '.' or '..'" if name in (".", "..")
               else f"is longer than the {NAME_BYTES} bytes a file name may have" if len(name_bytes(name)) > NAME_BYTES
               else None)
    if problem:
        raise RaftError(f"{what} {printable(repr(name))[:80]} {problem}: it names a folder inside its root, so it "
                        f"must be a plain name")
    return name


def check_template(template: str, what: str) -> None:
    """A sentence template holds exactly one plain ``{}`` where the name goes: another field
    (``{0}``, ``{name}``), a format spec (``{:>300000000}``, any size of string) or only escaped
    braces (``{{}}``: every class the same sentence) is refused, naming the template."""
    import string
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:   # a lone '{' or '}'
        raise RaftError(f"{what}: template {printable(repr(template))[:80]} is not a template ({exc})") from None
    if fields != [("", "", None)] or "{{" in template or "}}" in template:
        raise RaftError(f"{what}: template {printable(repr(template))[:80]} must hold exactly one plain '{{}}' "
                        f"(where the name goes) and no other braces")


def name_bytes(text: str) -> bytes:
    """A string as the bytes it stands for (a file name that is not UTF-8 included): what hashes read."""
    return text.encode("utf-8", "surrogatepass")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default in its help line, once: not where the
    help already says its default, nor for a flag or an option without one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class ToolParser(argparse.ArgumentParser):
    """argparse whose usage errors are ``RaftError``s: one line, exit code 2, like every other
    error of the tools (argparse itself prints the usage and its own message); --help shows
    every option's default."""

    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise RaftError(f"{message} (see {self.prog} --help)")


def bounded(kind: type, low: float, high: float) -> Callable[[str], Any]:
    """An argparse ``type`` for a number in [low, high] (the tools' numeric options)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {kind.__name__}, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


# --------------------------------------------------------------------------- entry points
def log_to_run_files(message: str) -> None:
    """The line that ended a run, into the run's log.txt too (an overnight sweep's log would
    otherwise stop without saying why); the console has it already."""
    for handler in logging.getLogger("raft").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logging.LogRecord("raft", logging.ERROR, __file__, 0, message, None, None))
            handler.flush()


class Signalled(KeyboardInterrupt):
    """SIGTERM (a scheduler's pre-emption, ``kill``) outside the training loop, which saves and
    stops on its own: raised where the program is, so every phase stops as Ctrl-C stops it."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def raise_signalled(signum, frame) -> None:
    raise Signalled(signal.Signals(signum).name)


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run an entry point: user errors become one line on stderr and exit code 2; SIGINT and
    SIGTERM in any phase one line and exit code 130 (what is finished -- caches, saved training
    states -- is kept: the same command goes on from there)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_signalled) if in_main_thread else None
    try:
        return _run_main(main, argv)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    for stream in (sys.stdout, sys.stderr):   # a file name that is not UTF-8 prints as \xNN, never fails
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    for handler in list(logging.getLogger("raft").handlers):   # an earlier run's log file (one process, many runs)
        if isinstance(handler, logging.FileHandler):
            logging.getLogger("raft").removeHandler(handler)
            handler.close()
    try:
        code = main(argv)
    except RaftError as exc:
        if debug:
            raise
        print(f"error: {one_line(printable(exc))}", file=sys.stderr)
        log_to_run_files(f"error: {one_line(printable(exc))}")
        return getattr(exc, "exit_code", 2)
    except OSError as exc:  # the environment: a full disk, permissions, a vanished mount
        if debug:
            raise
        what = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {what}{printable(where)}; nothing was left half-written", file=sys.stderr)
        log_to_run_files(f"error: {what}{printable(where)}")
        return 2
    except KeyboardInterrupt as exc:
        if debug:
            raise
        name = getattr(exc, "name", "SIGINT")
        message = f"error: stopped by {name}; run the same command to go on (finished caches and saved states are kept)"
        print(message, file=sys.stderr)
        log_to_run_files(message)
        return 130
    return code if isinstance(code, int) else 0


# --------------------------------------------------------------------------- reproducibility
def set_seed(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def nvidia_driver_present() -> bool:
    """An NVIDIA kernel driver is loaded (whatever torch was built for)."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def resolve_device(name: str):
    """The device to run on, made current when it is a GPU (so that every CUDA context,
    pinned-memory threads' included, opens on it and not on GPU 0)."""
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RaftError(f"device '{name}' is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available() and torch.version.cuda is None and nvidia_driver_present():
            raise RaftError(f"device '{name}' requested: this machine has an NVIDIA driver but torch {torch.__version__} "
                            f"is a CPU build; install a CUDA build (pip install torch torchvision --index-url "
                            f"https://download.pytorch.org/whl/cu124), or use --device cpu")
        if not torch.cuda.is_available():
            raise RaftError(f"device '{name}' requested but CUDA is not available (use --device cpu or auto)")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise RaftError(f"device '{name}' does not exist: this machine has {count} CUDA device(s) "
                            f"(cuda:0 ... cuda:{count - 1})")
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    return device


AMP_DTYPES = ("float16", "bfloat16")
_amp_dtype = "float16"   # the run's `amp_dtype`, set once by its setup (set_amp_dtype)


def set_amp_dtype(name: str) -> None:
    if name not in AMP_DTYPES:
        raise RaftError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)}, got {printable(repr(name))}")
    global _amp_dtype
    _amp_dtype = name


def amp_dtype() -> str:
    return _amp_dtype


def amp_identity(device, enabled: bool) -> str | bool:
    """What mixed precision makes of a computation, for cache keys: the autocast dtype on
    CUDA, False where none is used (CPU runs in float32)."""
    return _amp_dtype if enabled and device.type == "cuda" else False


def autocast(device, enabled: bool):
    """Autocast to the run's ``amp_dtype`` (float16 or bfloat16) on CUDA only (mixed precision);
    CPU runs in float32."""
    import torch
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, _amp_dtype))
    return nullcontext()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM allocation), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


SMALL_JOB = 256  # images: 'auto' decodes fewer in the main process (starting workers costs more)


def resolve_workers(value: int | str, images: int | None = None) -> int:
    """``num_workers``: an integer, or 'auto' = the CPUs available to this process shared among
    the processes torchrun started on this machine (at most 16 each, at least 1), and none for
    a job of fewer than ``SMALL_JOB`` images."""
    if value != "auto":
        return int(value)
    if images is not None and images < SMALL_JOB:
        return 0
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(16, available_cpus() // max(1, processes)))


class background:
    """Iterate ``iterable`` in a daemon thread, ``depth`` items ahead: the next batches are
    read or prepared while the current one is used. Exceptions reach the consumer; leaving
    the loop early (break, an error) stops the thread."""

    _DONE = object()

    def __init__(self, iterable, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(iterable),), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterator) -> None:
        try:
            for item in iterator:
                if not self._put((True, item)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((False, exc))
            return
        self._put((True, self._DONE))

    def __iter__(self):
        try:
            while True:
                ok, item = self._queue.get()
                if not ok:
                    raise item
                if item is self._DONE:
                    return
                yield item
        finally:
            self._stop.set()
            self._thread.join()


def sha256_text(*parts: Any) -> str:
    """Stable hash of JSON-serialisable parts (used as cache keys); names that are not valid
    UTF-8 hash as their bytes."""
    blob = name_bytes(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str))
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- what each phase costs
class PhaseClock:
    """Wall-clock, user and system CPU seconds (this process and the workers it reaped) and
    peak resident memory of named phases of a run (``results.json`` → ``phases``;
    bench/bench_scale.py reads them). Sections nest: each section's peak is the largest
    resident memory between its start and its end, an inner section's included. Where Linux
    lets a process reset its high-water mark, every section start resets it (after crediting
    the peak so far to the sections still open), so that each peak is its own; elsewhere it is
    the process's peak so far."""

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self._open: list[dict] = []   # the peaks seen so far by the sections now open, innermost last

    @staticmethod
    def _usage() -> tuple[float, float]:
        import resource
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + kids.ru_utime, own.ru_stime + kids.ru_stime

    @staticmethod
    def _reset_peak() -> None:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass

    @staticmethod
    def _peak_mb() -> float | None:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        try:
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        except (ImportError, OSError):
            return None

    def _credit(self) -> None:
        """The high-water mark since the last reset, to every open section."""
        peak = self._peak_mb() or 0.0
        for seen in self._open:
            seen["peak"] = max(seen["peak"], peak)

    @contextmanager
    def section(self, name: str):
        self._credit()   # what the enclosing sections reached before this one resets the mark
        self._reset_peak()
        seen = {"peak": 0.0}
        self._open.append(seen)
        wall, (user, system) = time.perf_counter(), self._usage()
        try:
            yield
        finally:
            self._credit()
            del self._open[next(i for i, open_ in enumerate(self._open) if open_ is seen)]
            now_user, now_system = self._usage()
            entry = self.phases.setdefault(name, {"wall": 0.0, "user": 0.0, "sys": 0.0, "peak_mb": 0.0})
            entry["wall"] += time.perf_counter() - wall
            entry["user"] += now_user - user
            entry["sys"] += now_system - system
            entry["peak_mb"] = max(entry["peak_mb"], seen["peak"])

    def measure(self, name: str, fn: Callable, *args, **kwargs):
        with self.section(name):
            return fn(*args, **kwargs)


# --------------------------------------------------------------------------- atomic writes
def _file_mode() -> int:
    """What open() would give a new file under this process's umask (mkstemp uses 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through ``write(fileobj)`` into a temporary sibling, fsync, then rename over ``path``.

    A crash at any moment leaves either the old complete file or the new complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)  # readable by whoever could read a normally written file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_temporaries(folder: str | Path) -> None:
    """Delete the temporary files ``atomic_write`` leaves when its process is killed mid-write."""
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def json_bytes(obj: Any) -> bytes:
    """JSON as UTF-8; a name that is not valid UTF-8 is written as \\udcNN escapes, which read
    back as the same name (``json.loads``)."""
    return json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8", "backslashreplace")


def write_json(path: str | Path, obj: Any) -> None:
    data = json_bytes(obj)
    atomic_write(path, lambda fh: fh.write(data))


def write_yaml(path: str | Path, obj: Any) -> None:
    data = yaml.safe_dump(obj, sort_keys=False, allow_unicode=True).encode("utf-8", "backslashreplace")
    atomic_write(path, lambda fh: fh.write(data))


def torch_save(path: str | Path, obj: Any) -> None:
    """Serialise in memory first: torch's zip writer reports a full disk as an opaque
    RuntimeError, a plain file write reports it as ENOSPC."""
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


TORCH_LIMIT = 64 << 30   # bytes: the most a torch file may declare (ViT-bigG's weights are ~10 GB)


def numpy_safe_globals() -> list:
    """What open_clip checkpoints written with numpy scalars in them hold (MetaCLIP's releases;
    mlfoundations/open_clip#966): numpy's scalar reconstructor and its dtypes, under the names of
    numpy 1 and numpy 2. Data, never code: they rebuild a number of a given dtype."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            np.dtype, *dtypes]


def check_torch_archive(path: Path, what: str) -> None:
    """A torch file's entries declare their sizes before anything is read: a few megabytes that
    declare gigabytes (a compressed entry) are refused before torch inflates them. torch writes
    its archives uncompressed, so what an entry holds is never more than the file's size."""
    shown = printable(path)
    size = read_size(path, what)
    if not zipfile.is_zipfile(path):
        return   # torch's legacy format (before 1.6) or not a torch file: torch says which
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
            packed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError):
        return
    if declared > TORCH_LIMIT or (packed and declared > 2 * size + (1 << 20)):
        raise RaftError(f"refusing to load {what} {shown}: its {size:,} bytes declare {declared:,} bytes of "
                        f"tensors{' in compressed entries (' + packed[0] + ', …)' if packed else ''}; a torch file "
                        f"holds its tensors uncompressed")


def read_size(path: Path, what: str) -> int:
    """The size of a regular file that is read whole; anything else is one line."""
    info = file_status(path, what)
    if not stat.S_ISREG(info.st_mode):
        raise RaftError(f"{what} {printable(path)} is not a regular file (a FIFO or a device): give a file")
    return info.st_size


def torch_load(path: str | Path, what: str = "file") -> Any:
    """Load tensors/plain containers only (``weights_only=True``; numpy's scalars and dtypes
    too, see ``numpy_safe_globals``): no pickled code runs. A file that names Python code to
    run while loading is refused as such, naming what it asks for, whatever words torch uses."""
    import torch
    path = Path(path)
    check_torch_archive(path, what)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(numpy_safe_globals()):
            warnings.simplefilter("ignore")   # torch warns about pickle protocols before refusing
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RaftError(f"{what} not found: {printable(path)}") from None
    except IsADirectoryError:
        raise RaftError(f"{what} {printable(path)} is a folder, not a file") from None
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights only" in text.lower() or "unsupported global" in text.lower():
            import re
            named = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global:? ([\w.]+)", text)
            asks = f" ({named.group(1)})" if named else ""
            raise RaftError(f"refusing to load {what} {printable(path)}: it needs pickled Python code to load"
                            f"{asks}; only tensors, plain containers and numpy scalars are accepted") from None
        raise RaftError(f"cannot read {what} {printable(path)}: not a torch file or corrupt") from None
    except RaftError:
        raise
    except Exception as exc:  # truncated, corrupt, or some other format
        detail = first_line(exc, 160) if str(exc).strip() else ""
        raise RaftError(f"cannot read {what} {printable(path)}: truncated, corrupt or not a torch file "
                        f"({type(exc).__name__}{': ' + detail if detail else ''})") from None


# --------------------------------------------------------------------------- logging
def setup_logging(log_file: str | Path | None = None) -> logging.Logger:
    """Log to stdout and (optionally) a file; re-callable for a new run folder."""
    logging.raiseExceptions = False  # a full disk must not turn every log line into a traceback
    logger = logging.getLogger("raft")
    # under torchrun only rank 0 logs (and writes the log file); the others say warnings and errors
    rank = int(os.environ.get("RANK", "0"))
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if rank != 0:
        log_file = None
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, mode="a", encoding="utf-8", errors="backslashreplace")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def harmonic_mean(a: float, b: float) -> float:
    """Base-to-new's summary of two accuracies (0 when both are 0)."""
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)
