"""pcl: Prototypical Contrastive Learning (Li et al., ICLR 2021) in PyTorch."""

__version__ = "0.1.0"


class PCLError(RuntimeError):
    """A problem with the user's input (data, flags, checkpoint): printed as one line, no traceback."""
