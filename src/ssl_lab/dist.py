"""Distributed data-parallel helpers (torchrun / DDP); every one is a no-op in one process.

The recipe (docs/distributed.md has the commands, ssl_lab/train_loop.py the loop):

- `optim.batch_size` stays the GLOBAL batch. Rank r trains on `shard_indices(...)`, its slice of
  the global batch, so every rank knows the global index of every sample.
- Views are made per rank from `seeding.rank_generator_seed(seed, step, rank)` (rank 0 uses
  the single-process seed, so a 1-process run is unchanged).
- BatchNorm is synchronised (`convert_sync_batchnorm`): statistics over the global batch, as in
  one process with the global batch. It works on CPU (gloo), unlike `torch.nn.SyncBatchNorm`.
- The loss is computed on the GLOBAL batch on every rank (`global_loss`): outputs are gathered
  with the autograd-aware `all_gather`, and any randomness in the loss (simclr's `negatives=k`)
  comes from a generator seeded identically on every rank (`seeding.shared_generator_seed`).
  Every rank then holds the same loss value, and the gradients are exactly those of one
  process with the global batch once DDP has averaged them over ranks (`wrap_ddp`; the online
  probes, outside DDP, average theirs with `all_reduce_grads`).

Why the gather's backward sums (and why DDP's averaging is then right): every rank computes the
same global loss L(z_0, …, z_{W-1}) from the gathered shards z_q. The true gradient is
dL/dθ = Σ_q (∂L/∂z_q)(∂z_q/∂θ), and rank q can only form its own term, through its own
forward. Each rank's backward reaches the gather with the same upstream ∂L/∂Z (the loss is
the same on every rank), so all_reduce(SUM) makes it W·∂L/∂Z, whose slice q is W·∂L/∂z_q.
Rank q's parameter gradient is thus W·(∂L/∂z_q)(∂z_q/∂θ), and DDP's average over ranks gives
(1/W)·Σ_q W·(…) = dL/dθ exactly. (Without the sum, the average would be dL/dθ / W.) The same
backward is also right when ranks compute different losses L_q and the objective is their
mean: the sum collects Σ_q ∂L_q/∂z, i.e. W·∂(mean_q L_q)/∂z. SyncBatchNorm's statistics go
through the same gather, so its backward obeys the same rule. tests/test_dist.py checks the
loss and every gradient against one process with the global batch, for every method.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from ssl_lab.errors import UserError

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_GATHERED_OUTPUTS = ("z", "p", "z_target", "logits")  # SSLModel outputs the losses read


# ----------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(timeout_s: float = 1800.0, init_method: str = "env://") -> DistInfo:
    """Join the process group torchrun describes in the environment, or run alone.

    Without WORLD_SIZE > 1 (plain `python -m ssl_lab`) nothing is initialised and the result is
    DistInfo(0, 1, 0, cuda-or-cpu). Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): NCCL on CUDA, each process on GPU LOCAL_RANK; gloo on CPU. `init_method`
    may name a shared file ("file:///shared/path") instead of torchrun's TCP store. Idempotent:
    an already initialised group is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return DistInfo(0, 1, 0, torch.device("cuda" if cuda else "cpu"))
    needed = _TORCHRUN_VARS if init_method == "env://" else ("RANK",)
    missing = [k for k in needed if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with "
                        "torchrun (see docs/distributed.md)")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        # Before init: NCCL binds each process's communicator to its current device.
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, device)


def is_active() -> bool:
    """True when collectives are needed: an initialised group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs, checkpoints and evaluates."""
    return get_rank() == 0


def barrier() -> None:
    if is_active():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- sharding and seeds


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """optim.batch_size is the global batch; each rank takes an equal share of it."""
    if global_batch % world_size:
        raise UserError(f"optim.batch_size={global_batch} is not divisible by the {world_size} "
                        "processes; choose a multiple of the world size")
    return global_batch // world_size


def shard_indices(perm: Tensor, rank: int, world_size: int, batch_per_rank: int,
                  step_in_epoch: int) -> Tensor:
    """Rank `rank`'s slice of global batch `step_in_epoch` of the epoch permutation `perm`.

    The global batch is the world_size·batch_per_rank consecutive entries of `perm` starting at
    step_in_epoch·world_size·batch_per_rank, cut into contiguous per-rank blocks in rank order.
    Gathering per-rank outputs in rank order (all_gather) therefore restores exactly the
    single-process batch perm[start:start + global], and global sample n of a gathered batch
    came from rank n // batch_per_rank.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    start = (step_in_epoch * world_size + rank) * batch_per_rank
    if start + batch_per_rank > len(perm):
        raise ValueError(f"global batch {step_in_epoch} of size {world_size * batch_per_rank} "
                         f"does not fit in a permutation of {len(perm)}")
    return perm[start:start + batch_per_rank]


# ----------------------------------------------------------------------------- autograd collectives


class _AllGather(torch.autograd.Function):
    """cat(all ranks' x) along dim 0; backward: all_reduce(SUM), then this rank's slice.
    The module docstring derives why the sum is right."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return _gather_no_grad(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # all_reduce is in place; never write autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def _gather_no_grad(x: Tensor) -> Tensor:
    x = x.contiguous()  # collectives need dense tensors (channels_last ones are not)
    parts = [torch.empty(x.shape, dtype=x.dtype, device=x.device)
             for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def all_gather(x: Tensor) -> Tensor:
    """Every rank's x concatenated along dim 0 in rank order, differentiable; identity alone.

    Every rank must pass the same shape (shard_indices gives equal shards). Tensors that need no
    gradient (labels, BYOL targets) take the plain collective.
    """
    if not is_active():
        return x
    if x.requires_grad and torch.is_grad_enabled():
        return _AllGather.apply(x)
    return _gather_no_grad(x)


def gather_views(z: Tensor) -> Tensor:
    """(V, N, ...) per rank → (V, W·N, ...): gathered along the SAMPLE dim, so the result is the
    (V, N_global, ...) tensor one process would have produced on the global batch."""
    return all_gather(z.movedim(1, 0)).movedim(0, 1)


def gather_outputs(out: dict[str, Tensor]) -> dict[str, Tensor]:
    """SSLModel outputs with the (V, N, ...) entries the losses read gathered to the global batch.
    "features" (for the online probes, which train on local data) stays local."""
    return {k: gather_views(v) if k in _GATHERED_OUTPUTS else v for k, v in out.items()}


def global_loss(loss_fn: Callable[..., Tensor], out: dict[str, Tensor], labels: Tensor,
                method_cfg: Any, generator: torch.Generator | None) -> Tensor:
    """`method.loss` on the global batch, the same value on every rank.

    `loss_fn` is `Method.loss`; `labels` are this rank's labels; `generator` must be seeded
    identically on every rank (shared_generator_seed). The gathered rows are laid out exactly
    as one process's batch, so e.g. simclr's negatives=k scores the same (M_g, M_g) matrix and
    each global anchor gets the same negatives on every rank and at every world size.
    """
    return loss_fn(gather_outputs(out), all_gather(labels), method_cfg, generator)


@torch.no_grad()
def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Average .grad over ranks in one flat all_reduce (for small modules outside DDP, such as
    the online probes). Assumes every rank has gradients for the same parameters."""
    if not is_active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """torch's DDP around `module` (the module itself when alone): gradients averaged during
    backward, overlapped with it. Buffers are not re-broadcast at every forward: SyncBatchNorm
    already keeps running stats identical on every rank (and the kwarg's name changed in 2.13)."""
    if not info.distributed:
        return module
    params = inspect.signature(DistributedDataParallel).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    ids = [info.local_rank] if info.device.type == "cuda" else None
    # a wrapped user module may hold parameters the loss never reaches; searching for them
    # costs a graph traversal per step, so only then
    unused = any(getattr(m, "leaves_parameters_unused", False) for m in module.modules())
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=unused,
                                   **{no_sync: False})


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable object on every rank (e.g. the run directory rank 0 chose)."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any rank: stop decisions (time budget) must agree,
    or the ranks that carry on wait forever in the next collective."""
    if not is_active():
        return flag
    t = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------- SyncBatchNorm


class SyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics cover every rank's batch; CPU (gloo) and CUDA.

    Alone, or in eval mode with running stats, it IS nn.BatchNorm (the same F.batch_norm call,
    so bit-identical). Distributed in training: each rank computes its
    per-channel (mean, M2 = Σ(x−mean)²), gathers them with the autograd-aware all_gather and
    combines them with the parallel-variance formula (Chan et al.), which stays accurate where
    E[x²]−E[x]² would cancel; every rank must pass the same input shape. The gradient flows
    through the gathered statistics (their backward sums over ranks): no hand-written backward.
    Running stats are updated as BatchNorm does (momentum, or the cumulative average when
    momentum is None; unbiased variance with the global count) and are identical on every rank.
    Accepts (N, C, *) input; SyncBatchNorm1d/2d keep nn.BatchNorm1d/2d's checks and isinstance.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected input of shape (N, C, *), got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        batch_stats = self.training or self.running_mean is None
        if not (batch_stats and is_active()):
            return super().forward(x)
        self._check_input_dim(x)
        mean, var, count = _global_moments(x)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x.to(scale.dtype) * scale.view(shape) + shift.view(shape)).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None \
            else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        unbiased = var * count / (count - 1)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def _global_moments(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance over every rank's (N, *) positions, and their count.

    all_gather needs equal shapes, so every rank holds the same number n of positions per
    channel: the global mean is the mean of the rank means, M2 = Σ_r M2_r + n·Σ_r (mean_r − mean)².
    """
    dims = [0, *range(2, x.dim())]
    n = x.numel() // x.shape[1]
    count = n * get_world_size()
    if count <= 1:
        raise ValueError(f"expected more than 1 value per channel when training, got input of "
                         f"shape {tuple(x.shape)} on each of {get_world_size()} ranks")
    var_l, mean_l = torch.var_mean(x.to(_compute_dtype(x)), dim=dims, correction=0)
    means, m2s = all_gather(torch.stack([mean_l, var_l * n])[None]).unbind(1)  # (W, C) each
    mean = means.mean(0)
    m2 = m2s.sum(0) + n * (means - mean).pow(2).sum(0)
    return mean, m2 / count, count


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 at least: bf16/fp16 activations (autocast) are normalised in float32."""
    return torch.promote_types(x.dtype, torch.float32)


class SyncBatchNorm1d(SyncBatchNorm, nn.BatchNorm1d):
    _check_input_dim = nn.BatchNorm1d._check_input_dim


class SyncBatchNorm2d(SyncBatchNorm, nn.BatchNorm2d):
    _check_input_dim = nn.BatchNorm2d._check_input_dim


_SYNC_CLASS: dict[type, type[SyncBatchNorm]] = {
    nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d,
}


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every nn.BatchNorm1d/2d (exact type: custom subclasses may differ) for the
    SyncBatchNorm of the same kind, sharing its Parameter and buffer objects (so state_dict keys,
    optimizer parameters and the BYOL target's parameter order are unchanged). In place for
    children; returns the module (a new one if `module` itself is a BatchNorm)."""
    sync_cls = _SYNC_CLASS.get(type(module))
    if sync_cls is not None:
        return _to_sync(module, sync_cls)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module


def _to_sync(bn: _BatchNorm, sync_cls: type[SyncBatchNorm]) -> SyncBatchNorm:
    new = sync_cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var = bn.running_mean, bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new
