"""The weights of a TorchScript archive (OpenAI's ``RN50.pt``), read as data.

``torch.jit.load`` runs the archive's own code while it loads (a class's ``__setstate__``
is TorchScript the archive ships), so a crafted file can act on the machine before any
check sees it. Here the archive is read as what it is: a zip file whose ``data.pkl`` is a
pickle of module objects whose attributes are tensors stored in ``data/<key>``. A restricted
unpickler rebuilds the tensors and records every object's attributes; it resolves no name
but the few that describe tensors, so nothing in the file can run (``pickle`` calls only
what ``find_class`` returns). The result is the module tree's state dict, as
``torch.jit.load(path).state_dict()`` gives it, without the deprecated loader.
"""
from __future__ import annotations

import collections
import pickle
import sys
import zipfile
from pathlib import Path

import torch

from utils import RaftError, first_line, printable

# storage classes of TorchScript's pickler -> dtype
STORAGE_DTYPES = {f"{name}Storage": dtype for name, dtype in (
    ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
    ("Byte", torch.uint8), ("Bool", torch.bool))}
# TorchScript's pickler wraps typed lists and tags values with their type: the values are plain
LIST_BUILDERS = {**{name: list for name in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist",
                                            "build_genericlist")},
                 "restore_type_tag": lambda value, type_name=None: value}
MAX_OBJECTS = 1_000_000   # attribute records: a real CLIP has a few thousand


def is_torchscript_archive(path: Path) -> bool:
    """A zip file with TorchScript code in it (what torch.jit.save writes)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in name for name in zf.namelist())


class ScriptObject:
    """Stands for an object of a TorchScript class: it keeps the state it was given and does
    nothing else (the class's own ``__setstate__`` lives in the archive's code and is never run)."""

    def __init__(self, *args):
        self.state = None

    def __setstate__(self, state):
        self.state = state


class ArchiveUnpickler(pickle.Unpickler):
    """Resolves tensor-rebuilding names to local functions and every TorchScript class to
    ``ScriptObject``; any other name is refused."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path
        self.archive_bytes = path.stat().st_size
        self.objects = 0

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in LIST_BUILDERS:   # typed lists and type tags: plain values
            return LIST_BUILDERS[name]
        if module == "__torch__" or module.startswith("__torch__."):
            self.objects += 1
            if self.objects > MAX_OBJECTS:
                raise RaftError(f"{printable(self.path)}: more than {MAX_OBJECTS:,} objects: not a CLIP archive")
            return ScriptObject
        raise pickle.UnpicklingError(f"the archive names {module}.{name}, which is not part of a weights file")

    def persistent_load(self, pid):
        """``('storage', dtype, key, location, numel)`` -> the storage's values as a flat tensor."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unexpected storage reference {pid!r:.80}")
        _, dtype, key, _, numel = pid
        try:
            info = self.archive.getinfo(f"{self.prefix}/data/{key}")
        except KeyError:
            raise pickle.UnpicklingError(f"storage {key} is missing") from None
        size = numel * torch.empty(0, dtype=dtype).element_size()
        if info.file_size > self.archive_bytes:   # torch stores storages uncompressed: no zip bomb
            raise pickle.UnpicklingError(f"storage {key} unpacks to more bytes than the whole archive holds")
        if info.file_size != size:
            raise pickle.UnpicklingError(f"storage {key} holds {info.file_size} bytes, {size} expected")
        data = bytearray(self.archive.read(info))
        return torch.frombuffer(data, dtype=dtype) if size else torch.empty(0, dtype=dtype)


def rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` for a storage given as a flat tensor (bounds checked)."""
    if not (isinstance(offset, int) and all(isinstance(v, int) and v >= 0 for v in (*size, *stride))):
        raise pickle.UnpicklingError("a tensor with a malformed shape")
    if size and all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if offset < 0 or last >= storage.numel():
            raise pickle.UnpicklingError("a tensor that reaches past its storage")
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


def flatten(obj, prefix: str, out: dict, depth: int = 0) -> None:
    """The tensors of a module tree, under their dotted attribute names."""
    if depth > 64:
        raise pickle.UnpicklingError("modules nested deeper than 64 levels")
    state = obj.state if isinstance(obj, ScriptObject) else None
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, ScriptObject):
            flatten(value, f"{prefix}{name}.", out, depth + 1)


def read_torchscript_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the archive's module tree (parameters and buffers), by name."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise RaftError(f"{printable(path)} is not a TorchScript archive (no single data.pkl)")
            prefix = pickles[0].split("/")[0]
            order = archive.read(f"{prefix}/byteorder").strip() if f"{prefix}/byteorder" in archive.namelist() \
                else b"little"
            if order.decode(errors="replace") != sys.byteorder:
                raise RaftError(f"{printable(path)} was written on a {order.decode(errors='replace')}-endian machine")
            with archive.open(pickles[0]) as fh:
                unpickler = ArchiveUnpickler(fh, archive, prefix, path)
                root = unpickler.load()
    except RaftError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError, KeyError,
            AttributeError, IndexError, RuntimeError, RecursionError) as exc:
        raise RaftError(f"cannot read the TorchScript archive {printable(path)} as weights: "
                        f"{first_line(exc, 160)}") from None
    state: dict[str, torch.Tensor] = {}
    flatten(root, "", state)
    if not state:
        raise RaftError(f"{printable(path)} holds no tensors: not a weights archive")
    return state
