"""Distributed helpers that degrade to a single process.

Every function works with no process group (then world size is 1 and collectives are identities),
so training, feature extraction and clustering take the same code path in CPU tests as on a cluster.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import urllib.parse
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist

from pcl import PCLError

if TYPE_CHECKING:  # the flags it reads; any object with these attributes does
    from pcl.settings import DistSettings


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


def layout(args: DistSettings) -> tuple[int, int, bool]:
    """(world size, global rank, distributed?) of this process, from the flags and the launcher's environment,
    without changing the flags: torchrun's WORLD_SIZE/RANK with ``--dist-url env://`` (RANK only together with
    WORLD_SIZE, as torchrun sets them: a stray RANK alone is ignored, see :func:`stray_rank`); with the official
    launcher (``--multiprocessing-distributed``) ``--world-size`` nodes of ``nproc`` processes, this one being
    ``--rank`` * nproc + ``local_rank`` (``launch`` sets nproc and local_rank in the settings it spawns with)."""
    world, rank = args.world_size, args.rank
    env = args.dist_url == "env://" and "WORLD_SIZE" in os.environ and stray_rank() is None
    if env and world == -1:
        world = int(os.environ["WORLD_SIZE"])
    spawned = args.multiprocessing_distributed
    if spawned:
        nproc = args.nproc or 1
        world, rank = nproc * max(world, 1), max(rank, 0) * nproc + args.local_rank
    elif env and rank == -1 and "RANK" in os.environ:
        rank = int(os.environ["RANK"])
    return world, rank, world > 1 or spawned


def stray_rank() -> str | None:
    """Why the environment's RANK is not to be trusted (None when it is, or there is none): torchrun sets RANK
    and WORLD_SIZE together, so a RANK without WORLD_SIZE (or not an integer) is left over from elsewhere."""
    value = os.environ.get("RANK")
    if value is None:
        return None
    if "WORLD_SIZE" not in os.environ:
        return f"RANK={value} is set but WORLD_SIZE is not (torchrun sets both)"
    if not value.strip().isdigit() or not os.environ["WORLD_SIZE"].strip().isdigit():
        return f"RANK={value} / WORLD_SIZE={os.environ['WORLD_SIZE']} are not integers"
    return None


def torchrun_variables() -> list[str]:
    """The variables of this process's environment that say a launcher (torchrun, torch.distributed.launch)
    already started one process per GPU: TORCHELASTIC_RUN_ID, or LOCAL_RANK with WORLD_SIZE."""
    names = [v for v in ("TORCHELASTIC_RUN_ID",) if v in os.environ]
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        names += ["LOCAL_RANK", "WORLD_SIZE"]
    return names


def spawned_rank(args: DistSettings) -> int | None:
    """The global rank of a worker of the official launcher (None otherwise: torchrun's RANK is read directly)."""
    return layout(args)[1] if args.multiprocessing_distributed else None


def init(args: DistSettings) -> torch.device:
    """Join the process group the launcher asked for and return this process's device.

    Single process when neither torchrun's environment nor ``--world-size > 1`` /
    ``--multiprocessing-distributed`` asks for more. nccl on GPU, gloo on CPU. Inconsistent flags and a port
    already in use are one :class:`~pcl.PCLError` line, before anyone waits for the others.
    """
    world, global_rank, distributed = layout(args)
    use_cuda = torch.cuda.is_available() and not args.cpu
    _check_group_flags(args, world, global_rank, distributed, use_cuda)
    if use_cuda:
        if args.multiprocessing_distributed:
            local = args.local_rank
        else:
            local = args.gpu if args.gpu is not None else int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cudnn.benchmark = True  # as official (main_worker)
        if args.seed_given:
            torch.backends.cudnn.deterministic = True  # as official when --seed is given
    else:
        device = torch.device("cpu")
    if distributed and not is_dist():
        backend = args.dist_backend or ("nccl" if use_cuda else "gloo")
        # a collective waits this long before the run is declared hung: the other ranks wait in one while rank 0
        # clusters (minutes per E-step at ImageNet scale); NCCL's default of 10 minutes would kill the run there
        timeout = datetime.timedelta(minutes=args.dist_timeout)
        logging.getLogger("pcl").info("rank %d joining %d processes at %s (waits up to --dist-timeout %g min for "
                                      "the others)", global_rank, world, args.dist_url, timeout.total_seconds() / 60)
        bound = {"device_id": device} if use_cuda else {}  # NCCL's communicator on this GPU, set up at once
        try:
            dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=world, rank=global_rank,
                                    timeout=timeout, **bound)
        except RuntimeError as e:  # DistNetworkError (a RuntimeError) when rank 0 cannot listen on the port
            if global_rank == 0 and ("EADDRINUSE" in str(e) or "address already in use" in str(e).lower()):
                raise PCLError(_port_in_use(args.dist_url)) from None
            if "timed out" in str(e).lower():  # the rendezvous: the other processes never came
                joined = re.search(r"(\d+)/(\d+) clients joined", str(e))
                raise PCLError(f"rank {global_rank} waited --dist-timeout {timeout.total_seconds() / 60:g} min at "
                               f"{args.dist_url}, but " + (f"only {joined.group(1)} of {joined.group(2)} processes "
                               f"joined" if joined else "the others did not join") + ": start every process with "
                               "the same --dist-url and --world-size (each its own --rank), or check the "
                               "address") from None
            raise
    return device


DIST_SCHEMES = ("tcp://", "env://", "file://")


def _check_group_flags(args: DistSettings, world: int, global_rank: int, distributed: bool, use_cuda: bool) -> None:
    """Refuse, in one line naming the flags, what would fail inside init_process_group (a traceback) or wait
    there for a process that never comes (--dist-timeout, 2 h by default)."""
    url, spawned = args.dist_url, args.multiprocessing_distributed
    if not str(url).startswith(DIST_SCHEMES):
        raise PCLError(f"--dist-url {url}: unknown scheme; use tcp://HOST:PORT, env:// (torchrun) or file://PATH")
    if args.rank >= 0 and args.world_size >= 1 and args.rank >= args.world_size:
        raise PCLError(f"--rank {args.rank} is not below --world-size {args.world_size}: ranks are 0 to "
                       f"{args.world_size - 1} ({'nodes' if spawned else 'processes'})")
    if not distributed:
        return
    if global_rank < 0:
        raise PCLError(f"--dist-url {url} with {world} processes needs this process's rank: give --rank (0 to "
                       f"{world - 1}), or start under torchrun with --dist-url env:// (it sets RANK and WORLD_SIZE)")
    if global_rank >= world:
        raise PCLError(f"rank {global_rank} (--rank or torchrun's RANK) is not below the world size {world} "
                       f"(--world-size or WORLD_SIZE): ranks are 0 to {world - 1}")
    if args.dist_backend == "nccl" and not use_cuda:
        why = "--cpu is given" if args.cpu else "CUDA is not available"
        raise PCLError(f"--dist-backend nccl needs CUDA GPUs but {why}: use --dist-backend gloo (or leave it unset)")


def _port_in_use(url: str) -> str:
    """The one line for a rendezvous port another process holds (two runs on the README's tcp://localhost:10001)."""
    if url.startswith("tcp://"):
        where = urllib.parse.urlsplit(url)
        return (f"port {where.port} on {where.hostname} is in use (another run?): choose another --dist-url port "
                f"(e.g. tcp://{where.hostname}:{(where.port or 10000) + 1})")
    port, host = os.environ.get("MASTER_PORT", "?"), os.environ.get("MASTER_ADDR", "?")
    return f"port {port} on {host} is in use (another run?): choose another MASTER_PORT (torchrun --master_port)"


def per_process(total: int) -> int:
    """One process's share of a total over all processes (e.g. --batch-size), as official: total // world."""
    return max(total // world_size(), 1)


def loader_workers(workers: int, args: DistSettings) -> int:
    """Loader workers of this process: -j/--workers is per node and shared among the node's processes."""
    return workers_per_process(workers, local_processes(args)) if is_dist() else workers


def local_processes(args: DistSettings) -> int:
    """Processes sharing this node: torchrun's LOCAL_WORLD_SIZE, --nproc / the GPU count with the official
    spawn launcher, else 1 (one process per node, e.g. SLURM srun with one task per node)."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if args.multiprocessing_distributed:
        return args.nproc or 1  # launch() records how many it spawned
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


def _all_gather_into(out: torch.Tensor, tensor: torch.Tensor) -> None:
    """``out`` (world * n x ...) <- every rank's ``tensor`` (n x ...) in rank order, in one buffer (no list + cat
    copy); ``all_gather_single`` where torch has it (``all_gather_into_tensor`` warns there)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor.contiguous())


@torch.no_grad()
def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` of any rank (one all_reduce; ``value`` with one process). For loops that issue a
    collective per iteration: every rank runs that many iterations, whatever its own share."""
    if not is_dist():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@torch.no_grad()
def gather_rows_exact(rows: torch.Tensor, index: torch.Tensor, num_rows: int,
                      dst: int | None = None) -> torch.Tensor | None:
    """Assemble an N x d matrix from per-rank rows and their dataset indices.

    Each rank passes the rows it computed (``rows``: n_local x d) and their sample indices. Ranks may
    hold different counts (an unpadded sharded sampler) or duplicates (a padded one); every index is
    written once, by the value computed for it, so the result equals a single-process pass exactly.
    ``dst`` None: the matrix on every rank (all-gather; world x the shard in transit and N x d on each rank);
    ``dst`` = r: on rank r only (gather), None on the others, which then hold no N x d buffer.
    Collectives: one all_gather of the shapes, then two (all-)gathers of equal-sized padded buffers, the
    same on every rank whatever its count (an empty shard passes a 0 x 0 tensor).
    """
    if not is_dist():
        out = torch.zeros(num_rows, rows.shape[1], dtype=rows.dtype, device=rows.device)
        out[index] = rows
        return out
    shapes = all_gather_cat(torch.tensor([list(rows.shape)], device=rows.device))  # world x 2: (rows, d)
    size, dim = int(shapes[:, 0].max()), int(shapes[:, 1].max())
    if rows.shape[1] != dim:  # an empty shard (fewer samples than ranks) does not know d
        rows = rows.new_zeros(0, dim)
    pad_rows = torch.zeros(size, rows.shape[1], dtype=rows.dtype, device=rows.device)
    pad_idx = torch.full((size,), num_rows, dtype=torch.long, device=rows.device)  # padding -> a spare row
    pad_rows[: rows.shape[0]] = rows
    pad_idx[: rows.shape[0]] = index
    del rows
    world = world_size()
    here = dst is None or rank() == dst
    all_rows = torch.empty(world * size if here else 0, pad_rows.shape[1], dtype=pad_rows.dtype,
                           device=pad_rows.device)
    all_idx = torch.empty(world * size if here else 0, dtype=torch.long, device=pad_idx.device)
    if dst is None:
        _all_gather_into(all_rows, pad_rows)
        _all_gather_into(all_idx, pad_idx)
    else:
        dist.gather(pad_rows, list(all_rows.chunk(world)) if here else None, dst=dst)
        dist.gather(pad_idx, list(all_idx.chunk(world)) if here else None, dst=dst)
    del pad_rows
    if not here:
        return None
    out = torch.zeros(num_rows + 1, all_rows.shape[1], dtype=all_rows.dtype, device=all_rows.device)
    out[all_idx] = all_rows  # padded rows land in the spare last row
    return out[:num_rows]


def on_every_rank(fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on every rank and agree on how it went: its result, or one :class:`PCLError` on every rank naming
    the ranks it failed on and the first one's message (a PCLError on some ranks only leaves the others waiting in
    their next collective until --dist-timeout). Other exceptions pass through as they are."""
    from pcl import error_line

    result, failure = None, None
    try:
        result = fn()
    except PCLError as e:
        if not is_dist():
            raise
        failure = error_line(e)
    failures = all_gather_object(failure)
    bad = [r for r, f in enumerate(failures) if f is not None]
    if bad:
        raise PCLError(f"{what} failed on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of "
                       f"{world_size()}: {failures[bad[0]]}")
    return result


def require_same(value: Any, what: str, fix: str) -> None:
    """One PCLError on every rank when ``value`` (a small, comparable object) is not the same on every rank: it
    names the first rank that differs from rank 0 and both values."""
    values = all_gather_object(value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        more = f" (and {len(differ) - 1} more ranks)" if len(differ) > 1 else ""
        raise PCLError(f"{what} differs between the processes: rank 0 has {values[0]}, rank {differ[0]} has "
                       f"{values[differ[0]]}{more}: {fix}")


def main_only(fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on rank 0 alone and tell every rank how it went: its result on rank 0 (None elsewhere), or an
    error on every rank when it failed there: the same :class:`PCLError` for bad input (exit code 2), otherwise
    the original exception on rank 0 and a RuntimeError naming it on the others. Without this, an error raised on
    rank 0 alone (a full disk at a save, collapsed features in k-means) leaves the other ranks waiting in their
    next collective until --dist-timeout (2 h on NCCL) instead of stopping with its message."""
    from pcl import PCLError, error_line

    result, failure, original = None, None, None
    if is_main():
        try:
            result = fn()
        except PCLError as e:
            failure = ("input", error_line(e))
        except Exception as e:
            if not is_dist():
                raise
            original = e
            failure = ("error", f"{what} failed on rank 0: {type(e).__name__}: {e} (traceback in rank 0's output)")
    failure = broadcast_object(failure)
    if failure is None:
        return result
    if original is not None:
        raise original
    raise PCLError(failure[1]) if failure[0] == "input" else RuntimeError(failure[1])
