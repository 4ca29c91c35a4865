"""Issue 27: inputs that used to run silently wrong, hang or end in a traceback are one line (PCLError or warning).

Every process-group test can only wait seconds: --dist-timeout 0.05 min, and the refusals come before any wait.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, free_port, tiny_args, tiny_argv
from pcl import PCLError
from pcl import distributed as dist_utils
from pcl.config import parse_num_cluster, validate_pretrain_args
from pcl.log import process_rank, setup_logging

SHORT = ("--dist-timeout", "0.05")  # 3 s: an init that would wait for the others gives up at once


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    yield
    dist_utils.cleanup()


# 1. a stray RANK


def test_stray_rank_without_world_size_is_ignored_with_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "3")
    assert process_rank() == 0
    logger = setup_logging(str(tmp_path / "exp"))
    logger.info("visible")
    assert (tmp_path / "exp" / "train.log").is_file()  # rank 0: its log file (and, in fit, the lock)
    err = capsys.readouterr().err
    assert "visible" in err and "[rank 0]" in err
    warned = [ln for ln in err.splitlines() if "RANK=3" in ln]
    assert len(warned) == 1 and "WORLD_SIZE" in warned[0] and "ignored" in warned[0], err
    args = tiny_args(tmp_path / "exp")
    assert dist_utils.layout(args) == (-1, -1, False)  # one process, not rank 3 of nothing
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun sets both: trusted as before
    assert process_rank() == 3 and dist_utils.layout(args) == (4, 3, True)
    assert process_rank(1) == 1  # the spawn launcher's rank wins: it ignores the environment too


def test_stray_rank_run_logs_and_writes_train_log(tmp_path):
    """The command itself: before, RANK=3 alone gave a run with no console output, no train.log and no lock."""
    argv = [a for a in tiny_argv(tmp_path / "exp") if a != "--cos"]
    argv[argv.index("--epochs") + 1] = "1"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "main_pcl.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(env, RANK="3", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[rank 0] RANK=3 is set but WORLD_SIZE is not" in proc.stderr and "epoch 0:" in proc.stderr
    assert "epoch 0:" in (tmp_path / "exp" / "train.log").read_text()


# 2. process-group set-up


@pytest.mark.parametrize("flags", [("--world-size", "2", "--rank", "2"),
                                   ("--multiprocessing-distributed", "--nproc", "2", "--world-size", "1",
                                    "--rank", "1")])
def test_rank_not_below_world_size_is_refused_before_init(tmp_path, flags):
    args = tiny_args(tmp_path / "exp", "--dist-url", f"tcp://127.0.0.1:{free_port()}", *SHORT, *flags)
    with pytest.raises(PCLError, match=r"--rank \d is not below --world-size \d"):
        dist_utils.init(args)
    assert not dist_utils.is_dist()


def test_missing_rank_is_refused_before_init(tmp_path):
    args = tiny_args(tmp_path / "exp", "--dist-url", f"tcp://127.0.0.1:{free_port()}", "--world-size", "2", *SHORT)
    with pytest.raises(PCLError, match="needs this process's rank: give --rank"):
        dist_utils.init(args)


@pytest.mark.parametrize("url", ["localhost:10001", "http://localhost:10001", "tcp:/localhost:10001"])
def test_unknown_dist_url_scheme_is_refused(tmp_path, url):
    args = tiny_args(tmp_path / "exp", "--dist-url", url, "--world-size", "2", "--rank", "0", *SHORT)
    with pytest.raises(PCLError, match=rf"--dist-url {url}: unknown scheme; use tcp://HOST:PORT, env://"):
        dist_utils.init(args)


@pytest.mark.parametrize("flag", ["--cpu", None])
def test_nccl_without_cuda_is_refused(tmp_path, flag, monkeypatch):
    if flag is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = tiny_args(tmp_path / "exp", "--dist-url", f"tcp://127.0.0.1:{free_port()}", "--world-size", "2",
                     "--rank", "0", "--dist-backend", "nccl", *SHORT, *([flag] if flag else []))
    why = "--cpu is given" if flag else "CUDA is not available"
    with pytest.raises(PCLError, match=f"--dist-backend nccl needs CUDA GPUs but {why}: use --dist-backend gloo"):
        dist_utils.init(args)


def test_port_in_use_for_rank_0_is_one_line(tmp_path):
    """Two runs on the README's tcp://localhost:10001: torch raises DistNetworkError (EADDRINUSE) at once."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = tiny_args(tmp_path / "exp", "--dist-url", f"tcp://localhost:{port}", "--world-size", "2",
                         "--rank", "0", "--cpu", *SHORT)
        with pytest.raises(PCLError) as caught:
            dist_utils.init(args)
    assert str(caught.value).startswith(f"port {port} on localhost is in use (another run?): choose another "
                                        f"--dist-url port")
    assert not dist_utils.is_dist()


def test_multiprocessing_distributed_under_torchrun_is_refused_before_spawning(tmp_path, monkeypatch):
    """Each of torchrun's processes would spawn one per GPU again (8 x 8 workers with overlapping ranks)."""
    from pcl.launch import launch

    spawned = []
    monkeypatch.setattr(torch.multiprocessing, "start_processes", lambda *a, **k: spawned.append(a))
    args = tiny_args(tmp_path / "exp", "--multiprocessing-distributed", "--nproc", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1234")
    with pytest.raises(PCLError, match="--multiprocessing-distributed under torchrun .*TORCHELASTIC_RUN_ID.*drop "
                                       "--multiprocessing-distributed"):
        launch(args, lambda a: None)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")  # torch.distributed.launch sets these two
    with pytest.raises(PCLError, match="LOCAL_RANK, WORLD_SIZE set"):
        launch(args, lambda a: None)
    assert spawned == []


@pytest.mark.parametrize("cuda", [True, False])
def test_the_process_group_is_bound_to_the_gpu_on_cuda(tmp_path, monkeypatch, cuda):
    """init_process_group(device_id=cuda:LOCAL_RANK): NCCL's communicator is set up on this GPU at once."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # init sets both: restored after the test
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setenv("LOCAL_RANK", "3")
    args = tiny_args(tmp_path / "exp", "--dist-url", "env://", "--world-size", "8", "--rank", "5", *SHORT)
    device = dist_utils.init(args)
    assert len(calls) == 1 and calls[0]["world_size"] == 8 and calls[0]["rank"] == 5
    if cuda:
        assert device == torch.device("cuda", 3) and calls[0]["device_id"] == device
        assert calls[0]["backend"] == "nccl"
    else:
        assert device == torch.device("cpu") and "device_id" not in calls[0] and calls[0]["backend"] == "gloo"


# 3. --num-cluster


def test_repeated_num_cluster_is_refused(tmp_path):
    assert parse_num_cluster("10,20") == (10, 20)
    with pytest.raises(PCLError, match=r"--num-cluster '100,100' repeats k=100: give each granularity once"):
        parse_num_cluster("100,100")
    with pytest.raises(PCLError, match=r"repeats k=10:"):
        validate_pretrain_args(tiny_args(tmp_path / "exp", "--num-cluster", "10,20,10"))


# 4. flags without effect


def test_nproc_without_multiprocessing_distributed_warns_once(tmp_path, pcl_warnings):
    validate_pretrain_args(tiny_args(tmp_path / "exp", "--nproc", "2"))
    assert len(pcl_warnings) == 1, pcl_warnings
    assert pcl_warnings[0].startswith("--nproc 2 has no effect without --multiprocessing-distributed")
    validate_pretrain_args(tiny_args(tmp_path / "exp", "--nproc", "2", "--multiprocessing-distributed"))
    validate_pretrain_args(tiny_args(tmp_path / "exp"))
    assert len(pcl_warnings) == 1


def test_class_list_with_a_builtin_dataset_warns_once(tmp_path, pcl_warnings):
    classes = tmp_path / "classes.txt"
    classes.write_text("n01\nn02\n")
    validate_pretrain_args(tiny_args(tmp_path / "exp", "--class-list", str(classes)))  # --dataset demo
    assert len(pcl_warnings) == 1, pcl_warnings
    assert pcl_warnings[0].startswith(f"--class-list {classes} has no effect with --dataset demo")
    validate_pretrain_args(tiny_args(tmp_path / "exp", "--class-list", str(classes), str(tmp_path)))  # ImageFolder
    assert len(pcl_warnings) == 1


def test_device_augment_and_decode_with_an_in_memory_set_warn_once(tmp_path, pcl_warnings):
    """WA11: ignored without a word with --dataset demo."""
    validate_pretrain_args(tiny_args(tmp_path / "exp", "--augment", "device", "--decode", "device"))
    assert len(pcl_warnings) == 1, pcl_warnings
    assert pcl_warnings[0].startswith("--augment device / --decode device: no effect with --dataset demo")
    validate_pretrain_args(tiny_args(tmp_path / "exp", "--augment", "device", str(tmp_path)))  # ImageFolder
    assert len(pcl_warnings) == 1


def test_a_seed_beyond_64_bits_is_refused_at_parse_time():
    from pcl import PCLError
    from pcl.config import build_pretrain_parser, parse_args

    with pytest.raises(PCLError, match=r"--seed 1180591620717411303424: must be >= 0 and below 2\*\*63"):
        parse_args(build_pretrain_parser(), ["--seed", str(2 ** 70)])


@pytest.mark.parametrize("cost", ["inf", "nan", "0.5,inf"])
def test_an_infinite_svm_cost_is_refused_before_any_work(tmp_path, cost):
    from pcl import PCLError
    from pcl.config import build_svm_parser, parse_args
    from pcl.evaluation.svm import run_svm

    args = parse_args(build_svm_parser(), ["--dataset", "demo", "--cost", cost, "--exp-dir", str(tmp_path)])
    with pytest.raises(PCLError, match=r"--cost .* every value must be a finite number > 0"):
        run_svm(args)


def test_knn_flags_without_a_val_split_warn_and_name_the_folder(tmp_path, pcl_warnings):
    from conftest import image_folder
    from pcl.data import build_pretrain_data, data_settings

    image_folder(tmp_path / "data", ["a", "b"], splits=("train",))
    args = validate_pretrain_args(tiny_args(tmp_path / "exp", str(tmp_path / "data"), "--knn-eval", "-j", "0"))
    assert build_pretrain_data(data_settings(args), knn_wanted=args.knn_eval).knn is None
    assert pcl_warnings == [f"--knn-eval / --knn-every have no effect: the kNN monitor needs a labelled test "
                               f"split and {tmp_path / 'data' / 'val'} does not exist"]
    image_folder(tmp_path / "data", ["a", "b"], splits=("val",))
    assert build_pretrain_data(data_settings(args), knn_wanted=args.knn_eval).knn is not None  # with val/ the monitor runs, and nothing is said
    assert len(pcl_warnings) == 1


# 5. a blocked read


class _Stuck(torch.utils.data.Dataset):
    """Item 0 is read at once; every other read blocks far longer than the loader's timeout."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i:
            import time
            time.sleep(60)
        return torch.zeros(1), i


def test_a_worker_blocked_on_a_read_stops_at_loader_timeout_with_one_line():
    from pcl.data.loaders import FileLoader

    loader = FileLoader(_Stuck(), 1, 1, 0, train=False, timeout_min=0.02)  # 1.2 s
    it = iter(loader)
    next(it)
    with pytest.raises(PCLError, match=r"rank 0: no batch came from the loader workers for --loader-timeout 0.02 "
                                       r"min \(batch 2 of 4\); a worker is blocked"):
        next(it)


def test_loader_timeout_is_off_without_workers_and_on_by_default(tmp_path):
    from pcl.data.loaders import FileLoader

    assert FileLoader(_Stuck(), 1, 0, 0, train=False, timeout_min=5).loader.timeout == 0  # torch refuses it then
    assert FileLoader(_Stuck(), 1, 2, 0, train=False, timeout_min=5).loader.timeout == 300
    assert validate_pretrain_args(tiny_args(tmp_path / "exp")).loader_timeout == 30


# 5. the run folder, DIR and the console (reliability probe s4)


def test_an_ascii_console_prints_every_line(monkeypatch):
    """NV11: eval_svm's table (mean ± std) on an ASCII stdout was a UnicodeEncodeError after the files were written."""
    import io
    import sys

    from pcl.config import build_svm_parser
    from pcl.launch import run_cli

    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    err = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert run_cli(build_svm_parser, lambda args: print("| k=1 | 50.00 \u00b1 1.00 | caf\udce9 |"), []) == 0
    out.flush()
    assert out.buffer.getvalue() == b"| k=1 | 50.00 \\xb1 1.00 | caf\\udce9 |\n"


def test_exp_dir_names_the_logs_cannot_hold_are_one_line(tmp_path):
    """F39 (non-UTF-8 bytes: a traceback in TensorBoard's writer), NS02/NS03 (a dangling or looping symlink: 'not
    writable (File exists)'), NS12 (.lock a directory: 'not writable (Is a directory)')."""
    from pcl.checkpoint import ExpDirLock
    from pcl.log import setup_logging

    with pytest.raises(PCLError, match=r"f39_\\xff: its name has bytes that are not UTF-8 text"):
        setup_logging(str(tmp_path / "f39_\udcff"))
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    os.symlink("loop", tmp_path / "loop")
    for name, target in (("dangling", str(tmp_path / "gone")), ("loop", "loop")):
        with pytest.raises(PCLError, match=rf"{name} is a symbolic link to {target}, which does not exist \(or the "
                                           rf"link loops\)"):
            setup_logging(str(tmp_path / name))
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    with pytest.raises(PCLError, match=r"run: .lock is a directory, not the run's lock file; remove it"):
        ExpDirLock(str(tmp_path / "run")).__enter__()


def test_dir_of_the_wrong_kind_is_named_as_such(tmp_path):
    """D02 (a file as DIR) and NF03 (--dataset imagefolder without DIR) both said 'data folder not found'."""
    from pcl.data import build_pretrain_data, data_settings

    (tmp_path / "afile.txt").write_text("x")
    for data, message in ((str(tmp_path / "afile.txt"), r"DIR .*afile.txt is a file, not a folder: --dataset "
                                                         r"imagefolder needs an ImageFolder root"),
                          (None, r"^--dataset imagefolder needs an ImageFolder root .* as DIR$")):
        cfg = validate_pretrain_args(tiny_args(tmp_path / "exp", *([data] if data else []), "--dataset", "imagefolder"))
        with pytest.raises(PCLError, match=message):
            build_pretrain_data(data_settings(cfg))


# 6. divergence blamed on its cause


def test_weight_decay_that_diverges_by_itself_is_refused_before_any_work(tmp_path):
    """NN05: --wd 1e10 ended in 'non-finite loss ... lower --lr'."""
    with pytest.raises(PCLError, match=r"--wd 1e\+10 with --lr 0.05: the weight decay alone makes every SGD step "
                                       r"diverge \(lr x wd = 5e\+08 >= 2 \(1 \+ --momentum\) = 3.8\)"):
        validate_pretrain_args(tiny_args(tmp_path, "--wd", "1e10"))
    validate_pretrain_args(tiny_args(tmp_path, "--wd", "1e-3"))


def test_a_finite_protonce_term_overflowed_by_its_weight_names_proto_weight():
    """WF04: --proto-weight 1e30 was blamed on --lr, with '(last checkpoint kept)' where none existed."""
    from pcl.log import FiniteGuard

    guard = FiniteGuard(torch.device("cpu"))
    guard.watch(1, torch.tensor(float("inf")), torch.tensor(5.2), torch.tensor(4.1), 0.03)
    with pytest.raises(PCLError, match=r"step 1: loss_inst=5.2 loss_proto=4.1 lr=0.03; lower --proto-weight "
                                       r"\(nothing of this epoch is saved\)$"):
        guard.check(0, 1, True)
    guard = FiniteGuard(torch.device("cpu"))
    guard.watch(2, torch.tensor(float("nan")), torch.tensor(float("nan")), torch.tensor(4.1), 0.03)
    with pytest.raises(PCLError, match=r"lower --lr \(nothing of this epoch is saved\)$"):
        guard.check(0, 2, True)


def test_a_dist_timeout_that_overflows_torchs_sockets_is_refused_at_parse_time():
    """ND17: --dist-timeout 1e12 gave a C++ frame dump, then 'the others did not join' (it never waited)."""
    from pcl.config import build_pretrain_parser, parse_args

    with pytest.raises(PCLError, match=r"--dist-timeout 1000000000000.0: must be a number of minutes > 0 and at most 1e6"):
        parse_args(build_pretrain_parser(), ["--dist-timeout", "1e12"])
    assert parse_args(build_pretrain_parser(), ["--dist-timeout", "1e6"]).dist_timeout == 1e6


def test_a_worker_killed_by_a_signal_is_one_line_from_the_launcher(tmp_path, monkeypatch, capsys):
    """NG10: kill -9 of one worker gave the launcher a ProcessExitedException traceback."""
    import types

    import torch.multiprocessing as tmp

    from pcl.config import build_pretrain_parser
    from pcl.launch import main

    def dead(*args, **kwargs):
        def join():
            raise tmp.ProcessExitedException("process 1 terminated with signal SIGKILL", error_index=1,
                                             error_pid=4242, exit_code=-9, signal_name="SIGKILL")
        return types.SimpleNamespace(join=join, processes=[])

    monkeypatch.setattr(tmp, "start_processes", dead)
    code = main(build_pretrain_parser, lambda args: None, tiny_argv(tmp_path, "--multiprocessing-distributed",
                                                                    "--nproc", "2"))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip() == ("error: worker process 1 (pid 4242) died (killed by SIGKILL); the launcher stopped the other "
                           "workers. Rerun with --resume auto to continue from the last saved checkpoint")
