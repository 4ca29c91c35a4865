"""Many ranks simulated on one process: torch's fake process group, one rank after another, with every collective
recorded (name, shapes, dtypes, devices) and its exchange simulated from what the other ranks sent.

The fake group lets ``dist.get_rank()`` / ``get_world_size()`` say what a rank of a W-process job would, but moves
no data. :class:`WorldAudit` patches the ``torch.distributed`` collectives our code calls: each call is recorded
with what this rank contributed, and its result is what the real collective would have given, computed from the
contributions the other ranks made at the same position of their sequence in the previous pass (all-reduce: the
sum or max; broadcast: the source's; (all-)gather: every rank's). Passes repeat until the sequences stop changing
(one more pass per exchange that depends on an earlier one), so rank 0 really receives the other ranks' rows, and a rank whose
sequence differs from the others (a hang or a crash on NCCL) shows as a mismatch in :meth:`WorldAudit.mismatches`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend


@dataclasses.dataclass
class Call:
    name: str
    tensors: tuple  # (shape, dtype, device type) of each tensor argument
    payload: Any  # what this rank sent: a CPU copy of its tensor, or its object


def _sig(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device.type


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN equal to NaN (a diverged rank sends NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (a != a) & (b != b)).all()) if a.is_floating_point() else torch.equal(a, b)


class WorldAudit:
    """Run ``fn(rank)`` as each of ``world`` ranks in turn; see the module docstring."""

    def __init__(self, world: int = 8) -> None:
        self.world = world
        self.calls: list[list[Call]] = []
        self.outcomes: list[Any] = []

    def run(self, fn: Callable[[int], Any], passes: int = 8) -> list[Any]:
        """The outcome of ``fn`` on each rank (its return value, or the exception it raised). Each exchange that
        depends on an earlier one (a size agreed, then buffers of that size) needs one more pass to settle."""
        previous, converged, extra = None, False, 0
        for _ in range(passes):
            calls, outcomes = [], []
            for rank in range(self.world):
                log: list[Call] = []
                dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=self.world)
                try:
                    with self._patched(rank, log, previous):
                        outcomes.append(fn(rank))
                except Exception as e:  # the outcome of this rank: compared with the others'
                    outcomes.append(e)
                finally:
                    dist.destroy_process_group()
                calls.append(log)
            converged = converged or (previous is not None and self._settled(calls, previous))
            previous = calls
            if converged:
                if extra:  # objects (not compared: timings) sent in the settled pass are now received
                    break
                extra = 1
        assert converged, f"the simulated exchanges did not settle in {passes} passes"
        self.calls, self.outcomes = previous, outcomes
        return outcomes

    @classmethod
    def _settled(cls, calls: list[list[Call]], previous: list[list[Call]]) -> bool:
        """Same collectives as the previous pass, and every rank sent the same tensors (objects may differ: they
        hold timings)."""
        if cls._signatures(calls) != cls._signatures(previous):
            return False
        return all(not torch.is_tensor(a.payload) or _same(a.payload, b.payload)
                   for log, old in zip(calls, previous) for a, b in zip(log, old))

    @staticmethod
    def _signatures(calls: list[list[Call]]) -> list[list[tuple]]:
        return [[(c.name, c.tensors) for c in log] for log in calls]

    def sequence(self, rank: int) -> list[tuple]:
        return self._signatures(self.calls)[rank]

    def mismatches(self) -> list[str]:
        """Ranks whose collectives differ from rank 0's (name, shapes, dtypes or count), one line each."""
        sigs = self._signatures(self.calls)
        out = []
        for rank, seq in enumerate(sigs[1:], start=1):
            if seq != sigs[0]:
                at = next((i for i, (a, b) in enumerate(zip(seq, sigs[0])) if a != b), min(len(seq), len(sigs[0])))
                out.append(f"rank {rank}: {len(seq)} collectives vs rank 0's {len(sigs[0])}, first difference at #{at}: "
                           f"{seq[at] if at < len(seq) else 'none'} vs {sigs[0][at] if at < len(sigs[0]) else 'none'}")
        return out

    def devices(self) -> set[str]:
        return {sig[2] for log in self.calls for c in log for sig in c.tensors}

    @contextlib.contextmanager
    def _patched(self, me: int, log: list[Call], previous: list[list[Call]] | None):
        fakes = self._fakes(me, log, previous)
        saved = {name: getattr(dist, name) for name in fakes if hasattr(dist, name)}
        for name in saved:
            setattr(dist, name, fakes[name])
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)

    @staticmethod
    def _recorder(me: int, log: list[Call], previous: list[list[Call]] | None) -> Callable[..., list[Any] | None]:
        def record(name: str, tensors: list[torch.Tensor], payload: Any) -> list[Any] | None:
            """Log the call; every rank's payload at the same position (None: not known or not the same call)."""
            i = len(log)
            log.append(Call(name, tuple(_sig(t) for t in tensors), payload))
            if previous is None or any(i >= len(p) or (p[i].name, p[i].tensors) != (name, log[i].tensors)
                                       for p in previous):
                return None
            return [payload if r == me else p[i].payload for r, p in enumerate(previous)]  # this rank's: as sent now
        return record

    def _fakes(self, me: int, log: list[Call], previous: list[list[Call]] | None) -> dict[str, Callable]:
        """Stand-ins for the torch.distributed collectives: record, then give the simulated result."""
        world, record = self.world, self._recorder(me, log, previous)

        def cpu(t: torch.Tensor) -> torch.Tensor:
            return t.detach().cpu().clone()

        def all_reduce(t, op=dist.ReduceOp.SUM, group=None, async_op=False):
            peers = record("all_reduce", [t], cpu(t))
            if peers is not None:
                stacked = torch.stack(peers)
                t.copy_(stacked.amax(0) if op == dist.ReduceOp.MAX else stacked.sum(0))

        def broadcast(t, src=0, group=None, async_op=False):
            peers = record("broadcast", [t], cpu(t) if me == src else None)  # the others' content is not sent
            if peers is not None and me != src:
                t.copy_(peers[src])

        def all_gather(out, t, group=None, async_op=False):
            peers = record("all_gather", [t], cpu(t))
            for j, o in enumerate(out):
                o.copy_(peers[j] if peers is not None else t)

        def all_gather_into_tensor(out, t, group=None, async_op=False):
            peers = record("all_gather_into_tensor", [t], cpu(t))
            for j, o in enumerate(out.chunk(world)):
                o.copy_(peers[j] if peers is not None else t)

        def gather(t, gather_list=None, dst=0, group=None, async_op=False):
            peers = record("gather", [t], cpu(t))
            for j, o in enumerate(gather_list or []):
                o.copy_(peers[j] if peers is not None else t)

        def barrier(group=None, async_op=False, device_ids=None):
            record("barrier", [], None)

        def all_gather_object(out, obj, group=None):
            peers = record("all_gather_object", [], obj)
            for j in range(len(out)):
                out[j] = peers[j] if peers is not None else obj

        def broadcast_object_list(objs, src=0, group=None, device=None):
            peers = record("broadcast_object_list", [], list(objs))
            if peers is not None and me != src:
                objs[:] = peers[src]

        return {"all_reduce": all_reduce, "broadcast": broadcast, "all_gather": all_gather,
                "all_gather_into_tensor": all_gather_into_tensor, "all_gather_single": all_gather_into_tensor,
                "gather": gather, "barrier": barrier, "all_gather_object": all_gather_object,
                "broadcast_object_list": broadcast_object_list}
