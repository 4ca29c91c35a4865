"""Every entry point's main: parse, run in this process or in one process per GPU, and turn errors into one
line and an exit code (2: bad input, 75: preempted after saving, 130: Ctrl-C).

Three ways to run, one code path: a single process (CPU or one GPU, no distributed flags), torchrun
(``--dist-url env://``: the processes exist already), and the official launcher
(``--multiprocessing-distributed``: this module spawns one process per GPU, or ``--nproc`` on a CPU-only node).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

import torch

from pcl import (ABANDONED_THREAD, EXIT_INPUT, EXIT_PREEMPTED, PCLError, Preempted, RunFailed,
                 distributed as dist_utils, error_line)
from pcl.config import RunConfig, parse_args
from pcl.preemption import StopRequest, preempted_from_marker

logger = logging.getLogger("pcl")


def main(build_parser: Callable[[], argparse.ArgumentParser], fn: Callable[[RunConfig], Any],
         argv: Sequence[str] | None = None, one_process: str | None = None) -> int:
    """Parse with ``build_parser``, then run ``fn`` through :func:`launch`; the exit code. ``one_process``: the
    command's name when it cannot spawn workers (then --multiprocessing-distributed is refused in one line)."""

    def run(args: RunConfig) -> Any:
        if one_process and args.multiprocessing_distributed:
            raise PCLError(f"{one_process} does not spawn workers: drop --multiprocessing-distributed (it runs in one "
                           f"process, or under torchrun --nproc_per_node N ... --dist-url env://)")
        return launch(args, fn)

    return run_cli(build_parser, run, argv)


def run_cli(build_parser: Callable[[], argparse.ArgumentParser], run: Callable[[RunConfig], Any],
            argv: Sequence[str] | None = None) -> int:
    """The entry points' shared main: parse, run, and turn input errors into one line and an exit code
    (2: bad input; 75: preempted after saving; 130: Ctrl-C). ``--debug`` shows the traceback instead."""
    args = None
    tolerant_console()
    try:
        args = parse_args(build_parser(), argv)
        run(args)
    except PCLError as e:
        if args is not None and args.debug:
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        return EXIT_INPUT
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        exit_now(EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def tolerant_console() -> None:
    """stdout and stderr write what their encoding cannot (an ASCII terminal: LANG=C or PYTHONIOENCODING=ascii; a
    file name with non-UTF-8 bytes) as backslash escapes instead of raising UnicodeEncodeError mid-run."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def exit_now(code: int) -> None:
    """Exit with ``code`` at once (no interpreter teardown) when a stop abandoned work in a thread (a faiss k-means
    still running on the GPU, see ``pcl.cluster.interruptible``): tearing CUDA and faiss down under it can crash
    the process and turn exit code 75 (preempted, saved) into a failure. Otherwise return: a normal exit."""
    if any(t.name == ABANDONED_THREAD and t.is_alive() for t in threading.enumerate()):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _worker(local_rank: int, nprocs: int, args: Any, fn: Callable) -> None:
    tolerant_console()
    try:
        fn(args.replace(local_rank=local_rank))
    except Preempted as e:  # saved already; tell the parent by the exit code
        logger.warning("%s", e)
        dist_utils.cleanup()
        exit_now(EXIT_PREEMPTED)
        raise SystemExit(EXIT_PREEMPTED) from None
    except PCLError as e:
        logger.error("error: %s", e)
        raise SystemExit(EXIT_INPUT) from None
    finally:
        dist_utils.cleanup()


def launch(args: RunConfig, fn: Callable[[RunConfig], Any]) -> Any:
    """Run ``fn`` in this process, or, with --multiprocessing-distributed (the official launcher), spawn one
    process per GPU (per --nproc on a CPU-only node); each gets the settings plus its ``local_rank``, and its
    global rank node_rank * nprocs + local_rank follows (``distributed.layout``). SIGTERM/SIGUSR1 to this
    process are forwarded to the workers; a worker's exit code 75 / 2 becomes Preempted / PCLError here."""
    if not args.multiprocessing_distributed:
        try:
            return fn(args)
        finally:
            dist_utils.cleanup()
    if dist_utils.torchrun_variables():  # each of torchrun's processes would spawn one per GPU again
        raise PCLError(f"--multiprocessing-distributed under torchrun ({', '.join(dist_utils.torchrun_variables())} "
                       "set): torchrun starts the processes already; drop --multiprocessing-distributed")
    use_cuda = torch.cuda.is_available() and not args.cpu
    nprocs = args.nproc or (torch.cuda.device_count() if use_cuda else 1)
    args = RunConfig.of(args).replace(nproc=nprocs)  # the workers' ranks, and their share of -j, follow from it
    context = torch.multiprocessing.start_processes(_worker, args=(nprocs, args, fn), nprocs=nprocs, join=False,
                                                    start_method="spawn")

    def forward(signum: int, frame: Any) -> None:  # `kill PID` and many schedulers signal only the launcher
        logger.warning("%s received by the launcher: forwarded to its %d workers", signal.Signals(signum).name,
                       nprocs)
        for proc in context.processes:
            if proc.is_alive():
                os.kill(proc.pid, signum)

    interrupts: list[float] = []

    def interrupted(signum: int, frame: Any) -> None:  # Ctrl-C reaches the workers from the terminal itself
        if interrupts and time.monotonic() - interrupts[0] >= StopRequest.ABORT_AFTER:
            raise KeyboardInterrupt
        if not interrupts:
            interrupts.append(time.monotonic())
            logger.warning("Ctrl-C: the workers save at their next safe point and stop (Ctrl-C again to abort)")

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupted)
    try:  # each worker finishes its step (or feature batch), rank 0 saves, all exit 75
        finished = False
        while not finished:  # join() returns False while workers run (it wakes up for our signal handler)
            finished = context.join()
    except torch.multiprocessing.ProcessExitedException as e:
        if e.exit_code == EXIT_PREEMPTED:
            raise preempted_from_marker(args.exp_dir) from None
        if e.exit_code == EXIT_INPUT:
            raise PCLError(f"a worker stopped on bad input (its message is above); exit code {e.exit_code}") from None
        how = f"killed by {e.signal_name}" if getattr(e, "signal_name", None) else f"exit code {e.exit_code}"
        raise RunFailed(f"worker process {e.error_index} (pid {e.error_pid}) died ({how}); the launcher stopped the "
                        f"other workers. Rerun with --resume auto to continue from the last saved checkpoint") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return None
