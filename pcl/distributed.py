"""Distributed helpers that degrade to a single process.

Every function works with no process group (then world size is 1 and collectives are identities),
so training, feature extraction and clustering take the same code path in CPU tests as on a cluster.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def layout(args: Any) -> tuple[int, int, bool]:
    """(world size, global rank, distributed?) of this process, from the flags and the launcher's environment,
    without changing the flags: torchrun's WORLD_SIZE/RANK with ``--dist-url env://``; with the official launcher
    (``--multiprocessing-distributed``) ``--world-size`` nodes of ``nproc`` processes, this one being
    ``--rank`` * nproc + ``local_rank`` (``launch`` sets nproc and local_rank in the settings it spawns with)."""
    world, rank = args.world_size, args.rank
    if args.dist_url == "env://" and world == -1 and "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
    spawned = bool(getattr(args, "multiprocessing_distributed", False))
    if spawned:
        nproc = getattr(args, "nproc", None) or 1
        world, rank = nproc * max(world, 1), max(rank, 0) * nproc + getattr(args, "local_rank", 0)
    elif args.dist_url == "env://" and rank == -1 and "RANK" in os.environ:
        rank = int(os.environ["RANK"])
    return world, rank, world > 1 or spawned


def spawned_rank(args: Any) -> int | None:
    """The global rank of a worker of the official launcher (None otherwise: torchrun's RANK is read directly)."""
    return layout(args)[1] if getattr(args, "multiprocessing_distributed", False) else None


def init(args: Any) -> torch.device:
    """Join the process group the launcher asked for and return this process's device.

    Single process when neither torchrun's environment nor ``--world-size > 1`` /
    ``--multiprocessing-distributed`` asks for more. nccl on GPU, gloo on CPU.
    """
    world, global_rank, distributed = layout(args)
    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda:
        if getattr(args, "multiprocessing_distributed", False):
            local = getattr(args, "local_rank", 0)
        else:
            local = args.gpu if args.gpu is not None else int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cudnn.benchmark = True  # as official (main_worker)
        if getattr(args, "seed_given", False):
            torch.backends.cudnn.deterministic = True  # as official when --seed is given
    else:
        device = torch.device("cpu")
    if distributed and not is_dist():
        backend = args.dist_backend or ("nccl" if use_cuda else "gloo")
        # a collective waits this long before the run is declared hung: the other ranks wait in one while rank 0
        # clusters (minutes per E-step at ImageNet scale); NCCL's default of 10 minutes would kill the run there
        timeout = datetime.timedelta(minutes=getattr(args, "dist_timeout", 120))
        import logging

        logging.getLogger("pcl").info("rank %d joining %d processes at %s (waits up to --dist-timeout %g min for "
                                      "the others)", global_rank, world, args.dist_url, timeout.total_seconds() / 60)
        dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=world, rank=global_rank,
                                timeout=timeout)
    return device


def per_process(total: int) -> int:
    """One process's share of a total over all processes (e.g. --batch-size), as official: total // world."""
    return max(total // world_size(), 1)


def loader_workers(args: Any) -> int:
    """Loader workers of this process: -j/--workers is per node and shared among the node's processes."""
    return workers_per_process(args.workers, local_processes(args)) if is_dist() else args.workers


def local_processes(args: Any) -> int:
    """Processes sharing this node: torchrun's LOCAL_WORLD_SIZE, --nproc / the GPU count with the official
    spawn launcher, else 1 (one process per node, e.g. SLURM srun with one task per node)."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if getattr(args, "multiprocessing_distributed", False):
        return getattr(args, "nproc", None) or 1  # launch() records how many it spawned
    return 1


def workers_per_process(workers: int, processes: int) -> int:
    """-j/--workers is per node, as official: each of the node's processes gets ceil(workers / processes)."""
    return (workers + processes - 1) // processes


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) from all ranks along dim 0. No gradient."""
    if not is_dist():
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; identity with one process."""
    if is_dist():
        dist.all_reduce(tensor)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src``; identity with one process."""
    if is_dist():
        dist.broadcast(tensor, src)
    return tensor


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (BatchNorm running statistics) in place; identity with one process.

    DistributedDataParallel does this at each forward of the wrapped model; a pass that calls a submodule
    directly (the E-step's key encoder, the kNN monitor's backbone) must do it itself, or each rank encodes
    its shard with the statistics of its own last batches."""
    if is_dist():
        for buf in module.buffers():
            dist.broadcast(buf, src)


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...]; [obj] with one process."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src)
    return holder[0]


@torch.no_grad()
def gather_rows_exact(rows: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Assemble an N x d matrix from per-rank rows and their dataset indices.

    Each rank passes the rows it computed (``rows``: n_local x d) and their sample indices. Ranks may
    hold different counts (an unpadded sharded sampler) or duplicates (a padded one); every index is
    written once, by the value computed for it, so the result equals a single-process pass exactly.
    """
    if not is_dist():
        out = torch.zeros(num_rows, rows.shape[1], dtype=rows.dtype, device=rows.device)
        out[index] = rows
        return out
    counts = all_gather_cat(torch.tensor([rows.shape[0]], device=rows.device))
    size = int(counts.max())
    pad_rows = torch.zeros(size, rows.shape[1], dtype=rows.dtype, device=rows.device)
    pad_idx = torch.full((size,), num_rows, dtype=torch.long, device=rows.device)  # padding -> a spare row
    pad_rows[: rows.shape[0]] = rows
    pad_idx[: rows.shape[0]] = index
    del rows
    world = world_size()
    all_rows = torch.empty(world * size, pad_rows.shape[1], dtype=pad_rows.dtype, device=pad_rows.device)
    dist.all_gather_into_tensor(all_rows, pad_rows)  # one buffer, no list + cat copy
    del pad_rows
    all_idx = torch.empty(world * size, dtype=torch.long, device=pad_idx.device)
    dist.all_gather_into_tensor(all_idx, pad_idx)
    out = torch.zeros(num_rows + 1, all_rows.shape[1], dtype=all_rows.dtype, device=all_rows.device)
    out[all_idx] = all_rows  # padded rows land in the spare last row
    return out[:num_rows]
