"""PyTorch distributed, as `torchrun` (or Slurm/Kubernetes launching torchrun) sets it up.

`synthfactory train RUN_DIR` under `torchrun --nproc_per_node=N [--nnodes ...]` reads RANK,
WORLD_SIZE and LOCAL_RANK from the environment and joins the process group: NCCL on CUDA, gloo
on the CPU. Without those variables everything runs in one process, unchanged.

How DP-SGD is split (train.py, privacy.py): every rank draws the same Poisson batch over the
whole data set from one shared, secret generator, and computes the clipped per-example
gradients of its contiguous share of that batch; Opacus' DistributedDPOptimizer adds the noise
on rank 0 only, all-reduces the sums and divides by the expected logical batch size. So a step
on N ranks is the single-process step (same batch, same noise, same accountant), only its
per-example work is split. Only rank 0 writes checkpoints and reports.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """This rank's (or `rank`'s) contiguous share [a, b) of n items (the first ranks get one
        more)."""
        r = self.rank if rank is None else rank
        base, extra = divmod(n, self.world)
        a = r * base + min(r, extra)
        return a, a + base + (1 if r < extra else 0)


def launched() -> Dist:
    """This process's place in a torchrun job from its environment alone, without joining the
    process group: for code that runs before the group exists or never needs it (run.json
    writes, printing). `Dist.main` is the one notion of rank 0 either way."""
    return Dist(
        rank=int(os.environ.get("RANK", "0")),
        world=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def from_env(device_type: str = "cpu") -> Dist:
    """Join the process group torchrun describes (if any). Idempotent."""
    env = launched()
    if not env.enabled:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        # Leave the group before the interpreter tears down: a rank that exits with the group
        # alive can abort in the backend's threads ("terminate called without an active
        # exception", seen once in CI with gloo) and fail the whole torchrun job.
        atexit.register(_leave)
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=env.local_rank)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _scalar(value, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor where the backend can send it (NCCL: on the GPU)."""
    t = torch.tensor([value], dtype=dtype)
    return t.cuda() if dist.get_backend() == "nccl" else t


def broadcast_int(value: int, d: Dist) -> int:
    """Rank 0's value on every rank (e.g. the secret DP seed)."""
    if not d.enabled:
        return value
    t = _scalar(value, torch.int64)
    dist.broadcast(t, src=0)
    return int(t.item())


def broadcast_object(obj, d: Dist):
    """Rank 0's picklable object on every rank (e.g. the training state it read from disk)."""
    if not d.enabled:
        return obj
    box = [obj if d.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_over_ranks(flag: bool, d: Dist) -> bool:
    """True on every rank when `flag` is true on any rank (so that all ranks stop together)."""
    if not d.enabled:
        return flag
    t = _scalar(int(flag), torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_parameters(model: torch.nn.Module, d: Dist) -> None:
    """Every rank starts from rank 0's weights (what DPDDP does at wrap time)."""
    if d.enabled:
        for p in model.parameters():
            dist.broadcast(p.data, src=0)


def sum_over_ranks(value: float, d: Dist) -> float:
    if not d.enabled:
        return value
    t = _scalar(value, torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def max_parameter_spread(model: torch.nn.Module, d: Dist) -> float:
    """Largest |parameter − rank 0's parameter| over all ranks and parameters (0 in one process)."""
    if not d.enabled:
        return 0.0
    worst = torch.zeros(1, dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        ref = p.data.clone()
        dist.broadcast(ref, src=0)
        worst = torch.maximum(worst, (p.data - ref).abs().max().double().reshape(1))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst.item())


def all_gather_array(x: np.ndarray, d: Dist) -> np.ndarray:
    """Every rank's `x` (the same shape on every rank), stacked in rank order: [world, *x.shape]."""
    if not d.enabled:
        return x[None]
    t = torch.from_numpy(np.ascontiguousarray(x))
    if dist.get_backend() == "nccl":
        t = t.cuda()
    parts = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(parts, t)
    return torch.stack(parts).cpu().numpy()


def best_over_ranks(
    idx: np.ndarray, score: np.ndarray, d: Dist, higher_is_closer: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the best (reference index, score) over what each rank found in its shard of the
    references: the lowest score (or the highest). Ties go to the lowest rank, and ranks hold
    increasing index ranges, so to the lowest index, as in one process. A rank with an empty
    shard passes ±inf."""
    if not d.enabled:
        return idx, score
    pair = np.stack([np.asarray(score, np.float64), np.asarray(idx, np.float64)])  # exact below 2^53
    gathered = all_gather_array(pair, d)  # [world, 2, M]
    key = -gathered[:, 0] if higher_is_closer else gathered[:, 0]
    winner = key.argmin(0)  # the first rank holding the best score
    cols = np.arange(pair.shape[1])
    return gathered[winner, 1, cols].astype(np.int64), gathered[winner, 0, cols]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
