"""torchrun: one code path for one process and many (doc/distributed.md).

Under torchrun (WORLD_SIZE > 1 in the environment) every process runs the same program on the
same data and draws the same random numbers; each computes its shard of every global batch and
of every evaluation split, and the collectives of ``World`` put the pieces together so that the
numbers equal a one-process run's. Rank 0 alone writes files. Without torchrun all of it is a
no-op (one process, rank 0). Every collective failure (another process died or hung) is the
documented one line, exit code 3.
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from datetime import timedelta
import torch

from run.config import Config
from run.context import RunFolder
from utils import RaftError, first_line, resolve_device, set_amp_dtype

RENDEZVOUS_TIMEOUT = 60.0  # seconds to reach torchrun's rendezvous before giving up with a clear message


class PeerFailure(RaftError):
    """Another process of the torchrun run died or stopped answering."""
    exit_code = 3


@contextmanager
def collective():
    """Around every collective: another process's death or hang (gloo's RuntimeError, NCCL's
    DistError, a timeout) becomes the documented one line and exit code 3, not a traceback."""
    try:
        yield
    except RaftError:
        raise
    except Exception as exc:
        detail = first_line(exc, 160)
        raise PeerFailure(f"process {os.environ.get('RANK', '?')}: a collective with the other torchrun processes "
                          f"failed ({detail}); run the same command again to resume") from None


class World:
    """This process's place among the run's processes (``WORLD``, set in place by
    ``start_processes``, so that ``from utils import WORLD`` always sees the current one)."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, host_group=None):
        self.set(rank, size, local_rank, host_group)

    def set(self, rank: int = 0, size: int = 1, local_rank: int = 0, host_group=None) -> None:
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.host_group = host_group   # gloo: small host-side flags without touching a GPU stream

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` items: sizes differ by at most one, in rank order,
        every item in exactly one part (a part may be empty when n < size)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def barrier(self) -> None:
        if self.many:
            with collective():
                torch.distributed.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the processes, in place (the gradients, the epoch's tallies)."""
        if self.many:
            with collective():
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the parameters' gradients over the processes, in one collective. Each process's
        loss is its share of the global batch's mean, so the sum is the one-process gradient."""
        if not self.many:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        with collective():
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        start = 0
        for p in params:
            p.grad = flat[start:start + p.numel()].view_as(p).clone()
            start += p.numel()

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.many:
            with collective():
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a stop request, a failed check)."""
        if not self.many:
            return flag
        value = torch.tensor([int(flag)])
        with collective():
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows, concatenated in rank order, on every process (rows may differ
        in number between processes)."""
        if not self.many:
            return tensor
        counts = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(counts) for _ in range(self.size)]
        with collective():
            torch.distributed.all_gather(sizes, counts)
        sizes = [int(s.item()) for s in sizes]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.zeros_like(padded) for _ in range(self.size)]
        with collective():
            torch.distributed.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def gather_objects(self, obj) -> list:
        if not self.many:
            return [obj]
        out = [None] * self.size
        with collective():
            torch.distributed.all_gather_object(out, obj, group=self.host_group)
        return out


WORLD = World()


def wait_for_rendezvous(host: str, port: int, timeout: float = RENDEZVOUS_TIMEOUT) -> None:
    """Fail with one line, within ``timeout``, when the rendezvous address cannot be reached
    (a wrong --master-addr, a node that is not up): instead of a hang."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise RaftError(f"cannot reach the torchrun rendezvous at {host}:{port} within {timeout:.0f}s "
                                f"({exc.strerror or exc}); check --master-addr/--master-port or --rdzv-endpoint, "
                                f"and that the first node is up") from None
            time.sleep(1.0)


def start_processes(device: str, timeout: float) -> World:
    """Join the run's process group when torchrun started this process (NCCL with one GPU per
    process, gloo on CPUs); ``timeout`` bounds every collective. Returns ``WORLD``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or WORLD.many:
        return WORLD
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RaftError(f"device '{device}' requested but CUDA is not available (use --device cpu or auto)")
        if device not in ("auto", "cuda"):
            raise RaftError(f"under torchrun each process uses the GPU of its local rank: set --device cuda "
                            f"(or auto), not {device}")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise RaftError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on "
                            f"this machine but it has {count} GPU(s): use --nproc_per_node={count} or fewer")
        torch.cuda.set_device(local_rank)
    wait_for_rendezvous(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")))
    try:
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout),
                                device_id=torch.device("cuda", local_rank) if use_cuda else None)
    except Exception as exc:  # the store, a peer that never came
        raise RaftError(f"cannot join the torchrun process group: {first_line(exc, 200)}") from None
    host_group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout)) if use_cuda else None
    WORLD.set(rank, size, local_rank, host_group)
    return WORLD


def check_global_batch(cfg: Config, world: World) -> None:
    """Every torchrun process takes a share of each global batch: it needs at least one image."""
    if world.many and cfg.batch_size < world.size:
        raise RaftError(f"batch_size {cfg.batch_size} is smaller than the {world.size} torchrun processes: each "
                        f"process needs images of every global batch (raise batch_size or use fewer processes)")


def choose_device(cfg: Config, folder: RunFolder) -> tuple[torch.device, bool]:
    """This process's device (under torchrun: the GPU of its local rank) and whether it uses amp."""
    world = WORLD
    device = resolve_device(f"cuda:{world.local_rank}" if world.many and cfg.device in ("auto", "cuda")
                            and torch.cuda.is_available() else cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    set_amp_dtype(cfg.amp_dtype)
    if use_amp and cfg.amp_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise RaftError(f"amp_dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic "
                        f"(compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))}; "
                        f"bfloat16 needs 8.0 or later): use amp_dtype float16")
    if device.type == "cuda":  # the frozen trunk sees one input size: let cuDNN pick its fastest kernels
        torch.backends.cudnn.benchmark = True
    folder.log.info(f"run folder {folder.run_dir}  device {device}{f' (amp, {cfg.amp_dtype})' if use_amp else ''}  "
                    f"torch {torch.__version__}" + (f"  {world.size} processes (torchrun)" if world.many else ""))
    return device, use_amp
