"""Where training runs: the device, mixed precision, and data-parallel ranks under ``torchrun``.

One :class:`Context` is passed to every stage. With one process it is plain single-device training.
Under ``torchrun --nproc_per_node K`` (``WORLD_SIZE`` > 1) each rank takes a contiguous shard of every
global batch (same shuffled order on every rank: the order's generator is seeded identically), the
trained module is wrapped in ``DistributedDataParallel`` (gloo on CPU, nccl on GPU), and each rank's
loss is scaled so that DDP's gradient average equals the gradient of the *global* batch's mean: a
K-rank run with global batch B computes what one process does with batch B, up to float rounding.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..model import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: the GPU if torch sees one, else the CPU. ``cuda`` without a GPU is a config error."""
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: cuda, but this torch ({torch.__version__}) sees no CUDA GPU; "
                          "use device: auto or cpu, or install a CUDA build of torch")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@dataclass(frozen=True)
class Context:
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world: int = 1
    amp: bool = False  # float16 autocast + gradient scaling; CUDA only

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, bundles and progress bars."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a global batch of ``n`` (sizes differ by at most one)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a (detached) tensor; itself with one process."""
        if self.world == 1:
            return value
        value = value.detach().to(self.device, torch.float64 if self.device.type == "cpu" else torch.float32)
        torch.distributed.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` as DDP will train it (itself with one process)."""
        if self.world == 1 or not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        # broadcast_buffers off: the models have no running statistics, and the fixed sin-cos
        # positions are identical on every rank by construction
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler("cuda") if self.amp and self.device.type == "cuda" else None


LOCAL = Context()


def setup(device: str = "auto", amp: bool = True) -> Context:
    """The context of this process: from ``torchrun``'s environment when ``WORLD_SIZE`` > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Context(dev, rank, world, amp and dev.type == "cuda")


def teardown(ctx: Context) -> None:
    if ctx.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "auto", amp: bool = True) -> Iterator[Context]:
    ctx = setup(device, amp)
    try:
        yield ctx
    finally:
        teardown(ctx)


class StageForward(nn.Module):
    """The differentiable part of one stage's loss as a module whose ``forward`` DDP can wrap
    (the stages call model methods such as ``forward_tokens``, which DDP would not see)."""

    def __init__(self, trained: nn.Module, fn) -> None:
        super().__init__()
        self.trained = trained
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)
