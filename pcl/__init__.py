"""pcl: Prototypical Contrastive Learning (Li et al., ICLR 2021) in PyTorch."""

__version__ = "0.1.0"

EXIT_INPUT = 2  # bad input: one line on stderr
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving; rerun with --resume auto


class PCLError(RuntimeError):
    """A problem with the user's input (data, flags, checkpoint): printed as one line, no traceback."""


class RunFailed(RuntimeError):
    """The run stopped for a reason that is not its input (a worker process killed): one line, exit code 1."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after finishing a step and saving ``path``."""

    def __init__(self, path: str, epoch: int, step: int, signal_name: str) -> None:
        super().__init__(f"{signal_name} received: stopped after epoch {epoch} step {step} and saved {path}; "
                         f"rerun the same command with --resume auto to continue")
        self.path, self.epoch, self.step = path, epoch, step


ABANDONED_THREAD = "pcl-abandoned"  # the name of a worker thread left running after a stop (see launch.exit_now)


def error_line(err: BaseException) -> str:
    """One line for a PCLError, also when a DataLoader worker re-raised it with the worker's traceback."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = text.split("PCLError: ", 1)[-1]
    return text
