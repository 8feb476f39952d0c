"""Several processes, one code path: torchrun data parallelism (doc/distributed.md).

    torchrun --nproc_per_node=4 main.py --config configs/imagenet.yaml ...

Under torchrun (``WORLD_SIZE`` > 1 in the environment) every process runs the same program on
the same data and draws the same random numbers; each computes its shard of every global batch
and of every evaluation split, and the collectives below put the pieces together so that the
numbers equal a one-process run's. Rank 0 alone writes files. Without torchrun everything here
is a no-op (one process, rank 0), so ``python main.py`` runs exactly as before.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from utils import RaftError

RENDEZVOUS_TIMEOUT = 60.0  # seconds to reach torchrun's rendezvous before giving up with a clear message


class World:
    """This process's place among the run's processes."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, host_group=None):
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
            dist.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the processes, in place (the gradients, the epoch's tallies)."""
        if self.many:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the parameters' gradients over the processes, in one collective. Each process's
        loss is its share of the global batch's mean, so the sum is the one-process gradient."""
        if not self.many:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        start = 0
        for p in params:
            p.grad = flat[start:start + p.numel()].view_as(p).clone()
            start += p.numel()

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.many:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a stop request, a failed check)."""
        if not self.many:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows, concatenated in rank order, on every process (rows may differ
        in number between processes)."""
        if not self.many:
            return tensor
        counts = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(counts) for _ in range(self.size)]
        dist.all_gather(sizes, counts)
        sizes = [int(s.item()) for s in sizes]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.zeros_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def gather_objects(self, obj) -> list:
        if not self.many:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.host_group)
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


def start(device: str, timeout: float) -> World:
    """Join the run's process group when torchrun started this process (NCCL with one GPU per
    process, gloo on CPUs); ``timeout`` bounds every collective. Returns ``WORLD``."""
    global WORLD
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
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout),
                                device_id=torch.device("cuda", local_rank) if use_cuda else None)
    except Exception as exc:  # the store, a peer that never came
        raise RaftError(f"cannot join the torchrun process group: {str(exc).splitlines()[0][:200]}") from None
    host_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout)) if use_cuda else None
    WORLD = World(rank, size, local_rank, host_group)
    return WORLD


def stop() -> None:
    global WORLD
    if WORLD.many and dist.is_initialized():
        dist.destroy_process_group()
    WORLD = World()
