"""Data-parallel plumbing for torchrun: environment, process group, DDP wrap, reductions.

Launch: `torchrun --nproc_per_node N -m fastserve train ...` (or `python -m torch.distributed.run`).
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; they are read once, here.
Without them the run is a single process and every helper below is a no-op. Backend: gloo on CPU,
nccl on CUDA. Knows nothing about models, data or files: rank 0 doing the writing is the
trainer's rule, this module only says who rank 0 is.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastserve.errors import ConfigError


@dataclass(frozen=True)
class DistributedEnv:
    rank: int = 0  # global process index, 0..world_size-1
    world_size: int = 1  # number of processes in the job
    local_rank: int = 0  # process index on this machine (picks the GPU)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs, prints and writes files."""
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> DistributedEnv:
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            return cls(
                rank=int(env["RANK"]),
                world_size=int(env["WORLD_SIZE"]),
                local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            )
        except (KeyError, ValueError) as e:
            raise ConfigError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}.") from e

    def device_for(self, device: str) -> str:
        """Each process of a CUDA job owns GPU `local_rank`; CPU jobs share the CPU."""
        if device.startswith("cuda") and self.enabled:
            return f"cuda:{self.local_rank}"
        return device


def init_distributed(device: str, env: DistributedEnv | None = None) -> DistributedEnv:
    """Join the process group when launched by torchrun (idempotent); return the environment."""
    env = env or DistributedEnv.from_env()
    if not env.enabled or dist.is_initialized():
        return env
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(
        backend=backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=30),
    )
    return env


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, env: DistributedEnv, device: str) -> nn.Module:
    """DistributedDataParallel over `model` when distributed; `model` itself otherwise.

    DDP broadcasts rank 0's parameters at construction, so every rank starts from the same weights.
    """
    if not env.enabled:
        return model
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def maybe_no_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on accumulation micro-steps (sync=False); the last
    micro-step of an optimizer step must sync. A no-op for a plain module. Sees through
    torch.compile's wrapper (`_orig_mod`) to the DDP module inside."""
    model = getattr(model, "_orig_mod", model)
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        yield
    else:
        with model.no_sync():
            yield


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (a new tensor; `t` itself when not distributed)."""
    if not dist.is_initialized():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def any_rank(flag: bool, device: str) -> bool:
    """True on every rank when `flag` is true on any rank: ranks must agree on when to stop,
    or the ones still stepping would wait forever on a collective."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
