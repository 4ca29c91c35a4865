import contextlib
import io
import logging
import os
import sys

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (PCL_TEST_DEVICE=cpu runs them on the CPU: "
                                       "scripts/gpu_check.sh --smoke)")


@pytest.fixture
def accel():
    """The accelerator the cuda-marked tests run on: CUDA when present; the CPU when PCL_TEST_DEVICE=cpu (the
    GPU check's CPU fallback, so these tests cannot rot on machines without a GPU); otherwise skipped."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("PCL_TEST_DEVICE") == "cpu":
        return torch.device("cpu")
    pytest.skip("no CUDA device (PCL_TEST_DEVICE=cpu runs the cuda-marked tests on the CPU)")


def tiny_args(exp_dir, *extra):
    """Parsed flags for a seconds-long CPU run on the demo set (16 px, ResNet-18 at width 4)."""
    from pcl.config import build_pretrain_parser, parse_args

    return parse_args(build_pretrain_parser(), tiny_argv(exp_dir, *extra))


def tiny_argv(exp_dir, *extra):
    """The command line behind :func:`tiny_args` (for runs in a subprocess)."""
    return ["--dataset", "demo", "--demo-renders", "1", "--image-size", "16", "-a", "resnet18",
            "--width", "4", "--stem", "small", "--epochs", "2", "--warmup-epoch", "1", "-b", "64",
            "--pcl-r", "256", "--num-cluster", "10,20", "--kmeans-nredo", "1", "--kmeans-niter", "5",
            "--lr", "0.05", "--cos", "--mlp", "--exp-dir", str(exp_dir), "--workers", "0", "--no-progress",
            "--moco-m", "0.99", *extra]


def _digest(folder):
    """{relative path: sha256} of every file under ``folder`` (a shared run must come out of the session as it went in)."""
    import hashlib

    out = {}
    for top, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(top, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _shared_run(tmp_path_factory, name, *extra):
    """Train ``tiny_args(DIR, *extra)`` once for the session; yield DIR (a pathlib.Path), then check that no test
    wrote into it. As each test sets it (the autouse ``_threads``): two threads; the 'pcl' logger is given back as
    it was, so that later log lines do not go to this run's train.log."""
    from pcl.engine import fit

    exp = tmp_path_factory.mktemp(name)
    log = logging.getLogger("pcl")
    saved, threads = (log.handlers[:], log.level, log.propagate), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fit(tiny_args(exp, *extra))
    finally:
        torch.set_num_threads(threads)
        for handler in log.handlers:
            if handler not in saved[0]:
                handler.close()
        log.handlers[:], log.level, log.propagate = saved
    before = _digest(exp)
    yield exp
    after = _digest(exp)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test wrote into the shared run {exp} (copy it with copy_run first): {changed}"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The exp dir of one finished run of :func:`tiny_args` as it is (2 epochs, warm-up 1: the E-step in epoch 1,
    checkpoint_0001 and checkpoint_last), trained once per session. Read it; to write, :func:`copy_run` it."""
    yield from _shared_run(tmp_path_factory, "tiny_run")


@pytest.fixture(scope="session")
def tiny_run_1ep(tmp_path_factory):
    """The exp dir of ``tiny_args(DIR, "--epochs", "1")`` (one warm-up epoch: checkpoint_0000 and checkpoint_last),
    trained once per session. Read it; to write, :func:`copy_run` it."""
    yield from _shared_run(tmp_path_factory, "tiny_run_1ep", "--epochs", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run):
    """The last checkpoint of :func:`tiny_run` (a str path, 2 epochs with one E-step: it holds a cluster_result)."""
    return str(tiny_run / "checkpoint_last.pth.tar")


def copy_run(src, dst):
    """A shared run's files copied into ``dst`` (made or existing, e.g. tmp_path), mtimes kept; returns ``dst``."""
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def official_checkpoint(path, arch="resnet18", mlp=False, seed=0):
    """A checkpoint as the official main_pcl.py writes it: DDP-prefixed encoder_q/encoder_k keys of a torchvision
    ResNet with a 128-d head (v1 Linear or v2 MLP) and a queue. Returns the query encoder (head kept)."""
    import torchvision

    torch.manual_seed(seed)
    enc = torchvision.models.__dict__[arch](num_classes=128)
    if mlp:
        dim = enc.fc.weight.shape[1]
        enc.fc = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), enc.fc)
    state = {}
    for prefix in ("module.encoder_q.", "module.encoder_k."):
        state.update({prefix + k: v.clone() for k, v in enc.state_dict().items()})
    state["module.queue"] = torch.randn(128, 16)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 200, "arch": arch, "state_dict": state, "optimizer": {}}, path)
    return enc


def fake_mnist(root, n_train=96, n_test=40, gz=True, layout="flat", name="FashionMNIST", size=28, seed=0):
    """Write the four idx files of a tiny MNIST-family set: class c is a bright square at a class-specific
    place plus noise, so a model can learn it. layout 'flat': in root (the original distribution, Debian's
    package); 'torchvision': in root/<name>/raw. Returns the folder the files are in."""
    from pcl.data import write_idx

    folder = os.path.join(str(root), name, "raw") if layout == "torchvision" else str(root)
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 60, (n, size, size), generator=gen)
        for i, c in enumerate(labels.tolist()):
            r, col = 2 + (c // 5) * 12, 2 + (c % 5) * 5
            images[i, r:r + 10, col:col + 4] = 230
        ext = ".gz" if gz else ""
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte{ext}"), images)
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte{ext}"), labels)
    return folder


def fake_cifar(root, name="cifar10", n_train=40, n_test=20, seed=0):
    """torchvision's CIFAR-10/100 python layout with tiny random batches (its md5 check must be patched off)."""
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    folder = os.path.join(str(root), "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    classes = 10 if name == "cifar10" else 100
    key = "labels" if name == "cifar10" else "fine_labels"
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if name == "cifar10" else ["train", "test"]
    for f in files:
        n = n_test if "test" in f else (n_train // 5 if name == "cifar10" else n_train)
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), key: list(np.arange(n) % classes)}
        with open(os.path.join(folder, f), "wb") as out:
            pickle.dump(batch, out)
    meta = {"label_names": [f"c{i}" for i in range(10)]} if name == "cifar10" else \
        {"fine_label_names": [f"c{i}" for i in range(100)]}
    with open(os.path.join(folder, "batches.meta" if name == "cifar10" else "meta"), "wb") as out:
        pickle.dump(meta, out)


def fake_stl10(root, n_unlabeled=40, n_train=20, n_test=20, size=96, seed=0):
    """torchvision's STL-10 binary layout (stl10_binary/) with tiny random splits (md5 check must be patched off)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder = os.path.join(str(root), "stl10_binary")
    os.makedirs(folder, exist_ok=True)
    for split, n in (("unlabeled", n_unlabeled), ("train", n_train), ("test", n_test)):
        rng.integers(0, 255, (n, 3, size, size), dtype=np.uint8).tofile(os.path.join(folder, f"{split}_X.bin"))
        if split != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(os.path.join(folder, f"{split}_y.bin"))
    with open(os.path.join(folder, "class_names.txt"), "w") as f:
        f.write("\n".join(f"c{i}" for i in range(10)) + "\n")
    with open(os.path.join(folder, "fold_indices.txt"), "w") as f:
        f.write(" ".join(str(i) for i in range(n_train)) + "\n")


def image_folder(root, classes, per_class=2, splits=("train", "val"), size=12, seed=0):
    """DIR/{split}/{class}/{i}.png with random pixels; returns the root."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    for split in splits:
        for c in classes:
            folder = os.path.join(str(root), split, c)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                pixels = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return str(root)


def run_e_step(model, data, cfg, device, stop=None):
    """The E-step's prototypes for a resolved pretraining ``cfg`` (what fit's loop computes)."""
    from pcl.estep import e_step
    from pcl.settings import EStepSettings

    return e_step(model, data.eval_loader, data.num_samples, EStepSettings.of(cfg), device, stop).clusters


def run_epoch(model, loader, optimizer, epoch, cfg, device, clusters, on_step=None, stop=None, start_step=0,
              restore=None):
    """One M-step epoch as fit's loop runs it (the loss, a fresh or restored loop state, the step options)."""
    from pcl.engine import build_loss, train_one_epoch
    from pcl.model import channels_last
    from pcl.resume import EpochState
    from pcl.settings import StepSettings

    criterion = build_loss(cfg)
    state = EpochState.start(cfg.seed, epoch, device, criterion.meters, stop, restore, start_step)
    return train_one_epoch(model, loader, optimizer, criterion, clusters, state,
                           StepSettings.of(cfg, channels_last(cfg.channels_last, device)), on_step=on_step)


def free_port():
    """A TCP port nobody listens on now (for a rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# main_pcl.py's command line in this process, and what a clean error looks like

TINY = ["-a", "resnet18", "--width", "4", "--stem", "small", "--image-size", "16", "-b", "4", "--pcl-r", "8",
        "--workers", "0", "--epochs", "1", "--warmup-epoch", "0", "--num-cluster", "2,3", "--no-progress",
        "--bn-splits", "2"]


def run_main(*argv):
    """main_pcl.py's main in this process (the script is one line around it; --help below runs the script)."""
    from pcl.config import build_pretrain_parser
    from pcl.engine import fit
    from pcl.launch import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(build_pretrain_parser, fit, list(argv))
    return code, err.getvalue()


def two_class_folder(root, n=12):
    """An ImageFolder root of n 20 x 20 PNGs in two classes (train/ only)."""
    for i in range(n):
        d = os.path.join(root, "train", f"class{i % 2}")
        os.makedirs(d, exist_ok=True)
        Image.new("RGB", (20, 20), (i * 20, 0, 255 - i * 20)).save(os.path.join(d, f"{i}.png"))
    return str(root)


def assert_clean_error(code, err, *phrases):
    assert code != 0
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for phrase in phrases:
        assert phrase in lines[0], err


class HostSyncRecorder(TorchFunctionMode):
    """Records the tensor methods that copy a value to the host: on CUDA each one is a device-to-host sync that
    stalls the CPU until the GPU catches up, so a CPU test can still prove a code path makes none.

    All of these pass through ``__torch_function__`` in torch 2.14 (checked: ``int(t)``, ``bool(t)``,
    ``float(t)``, ``range(t)``, ``lst[t]`` and slicing with a tensor are all seen).
    """

    SYNCS = {torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__bool__,
             torch.Tensor.__float__, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def pcl_warnings():
    """The WARNING lines logged to the 'pcl' logger (it does not propagate to caplog's root handler)."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                lines.append(record.getMessage())

    keep = Keep()
    logging.getLogger("pcl").addHandler(keep)
    yield lines
    logging.getLogger("pcl").removeHandler(keep)


@pytest.fixture
def pcl_lines():
    """Every line (INFO and up) logged to the 'pcl' logger, whatever level earlier tests left it at."""
    lines, logger = [], logging.getLogger("pcl")

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    keep, level = Keep(), logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(keep)
    logger.setLevel(level)
