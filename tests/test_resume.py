"""pcl.resume: what a checkpoint saved mid-epoch may continue, and the refusals that keep it exact."""

import os

import pytest
import torch

from conftest import tiny_args
from pcl import PCLError
from pcl.config import validate_pretrain_args
from pcl.resume import Session


def _mid_epoch_session(tmp_path, *flags, cluster_result=False):
    cfg = validate_pretrain_args(tiny_args(tmp_path, *flags))
    session = Session(cfg, str(tmp_path / "checkpoint_preempt.pth.tar"), None)
    session.device = torch.device("cpu")
    session.resumed = {"epoch": 1, "step": 3, "resume_states": [{"torch_rng": torch.get_rng_state()}]}
    if cluster_result:
        session.resumed["cluster_result"] = {"im2cluster": [torch.zeros(4, dtype=torch.long)],
                                             "centroids": [torch.eye(2, 4)], "density": [torch.ones(2)]}
    session.start_epoch = 1
    return session


def test_a_mid_epoch_checkpoint_continues_its_epochs_prototypes(tmp_path):
    session = _mid_epoch_session(tmp_path, "--warmup-epoch", "1", cluster_result=True)
    clusters = session.begin(1)
    assert clusters is not None and torch.equal(clusters.centroids[0], torch.eye(2, 4))
    assert session.begin(2) is None  # the next epoch runs its own E-step


def test_a_warm_up_checkpoint_resumed_past_its_warm_up_is_refused(tmp_path):
    """Its first batches trained without prototypes: an E-step on half-trained weights would not be the run's."""
    assert _mid_epoch_session(tmp_path, "--warmup-epoch", "5").begin(1) is None  # still warm-up: fine
    with pytest.raises(PCLError, match=r"saved in the middle of warm-up epoch 1; resume it with a --warmup-epoch "
                                       r"above 1"):
        _mid_epoch_session(tmp_path, "--warmup-epoch", "1").begin(1)


def test_a_mid_epoch_checkpoint_of_more_processes_names_its_file(tmp_path):
    session = _mid_epoch_session(tmp_path, "--warmup-epoch", "5")
    session.resumed["resume_states"] *= 2
    with pytest.raises(PCLError, match=r"checkpoint_preempt.pth.tar was saved mid-epoch by 2 processes"):
        session.begin(1)


def test_the_fp16_loss_scale_is_saved_and_restored(tmp_path):
    from pcl.engine import setup
    from pcl.resume import checkpoint_contents, load_into

    cfg = validate_pretrain_args(tiny_args(tmp_path, "--epochs", "1"))
    device, _, model, optimizer = setup(cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # as if the run had backed off to 256
    path = tmp_path / "c.pth.tar"
    torch.save(checkpoint_contents(model, optimizer, 0, cfg, None, scaler=scaler), path)
    assert torch.load(path, weights_only=True)["scaler"]["scale"] == 256.0
    fresh = torch.amp.GradScaler("cpu")
    load_into(str(path), model, optimizer, device, scaler=fresh)
    assert fresh.get_scale() == 256.0
    torch.save(checkpoint_contents(model, optimizer, 0, cfg, None), path)  # fp32 runs store none
    assert "scaler" not in torch.load(path, weights_only=True)


# A run folder holds one run (issue 41, WO01-WO03): a start continues the run there or clears it, and says which


def _finished_run(src, dst):
    from conftest import copy_run

    copy_run(src, dst)
    return {p.name: p.read_bytes() for p in dst.glob("checkpoint_*")}


def test_resume_from_elsewhere_into_a_finished_runs_folder_is_refused_before_any_work(tmp_path, tiny_run,
                                                                                     tiny_run_1ep):
    """WO03: --resume A's checkpoint with --exp-dir B (another, finished run): B's final checkpoints stay."""
    from pcl.engine import fit

    folder = tmp_path / "b"
    before = _finished_run(tiny_run, folder)
    other = str(tiny_run_1ep / "checkpoint_last.pth.tar")
    with pytest.raises(PCLError, match=r"the folder holds checkpoints that continuing it would replace or mix with "
                                       r"\(checkpoint_0001.pth.tar of another run .*pass --overwrite to remove them"):
        fit(tiny_args(folder, "--resume", other, str(tmp_path / "no_such_data")))  # refused before the data
    assert {p.name: p.read_bytes() for p in folder.glob("checkpoint_*")} == before


def test_overwrite_with_a_resume_from_elsewhere_clears_the_other_run_and_says_so(tmp_path, tiny_run, tiny_run_1ep,
                                                                                capsys):
    from pcl.engine import fit

    folder = tmp_path / "b"
    _finished_run(tiny_run, folder)
    # A is at epoch 1 of --epochs 1: nothing to train, but the folder is B's no more
    assert fit(tiny_args(folder, "--resume", str(tiny_run_1ep / "checkpoint_last.pth.tar"), "--epochs", "1",
                         "--overwrite")) == {}
    assert not list(folder.glob("checkpoint_*")) and not (folder / "log.txt").exists() and not (folder / "tb").exists()
    assert "--overwrite: removed 2 checkpoint files from" in capsys.readouterr().err


def test_overwrite_clears_every_checkpoint_of_the_old_run(tmp_path, tiny_run):
    """WO01: an --overwrite run killed after its first step leaves no checkpoint of the old run for --resume auto."""
    from pcl import checkpoint as ckpt_io
    from pcl.engine import fit

    _finished_run(tiny_run, tmp_path)

    class Killed(Exception):
        pass

    def kill(epoch, step):
        raise Killed

    with pytest.raises(Killed):
        fit(tiny_args(tmp_path, "--overwrite", "--lr", "0.1"), on_step=kill)
    assert ckpt_io.checkpoint_files(str(tmp_path)) == [] and not (tmp_path / "log.txt").exists()
    assert ckpt_io.resolve_resume("auto", str(tmp_path)) == (None, None)  # the restart starts afresh


def test_overwrite_with_resume_auto_is_refused():
    """WO02: --overwrite (start afresh) and --resume auto (continue) contradict each other."""
    with pytest.raises(PCLError, match=r"--overwrite with --resume auto: .*give one of them"):
        validate_pretrain_args(tiny_args("unused", "--overwrite", "--resume", "auto"))


def _ckpt(folder, name, epoch, step=0, run_id="run-a"):
    from pcl import checkpoint as ckpt_io

    path = str(folder / name)
    state = {"module.encoder_q.w": torch.ones(1), "module.encoder_k.w": torch.ones(1), "module.queue": torch.ones(1)}
    ckpt_io.save_checkpoint({"epoch": epoch, "step": step, "run_id": run_id, "state_dict": state}, path, last=None)
    return path


def test_a_resume_behind_the_folders_furthest_checkpoint_is_refused_or_trims_it(tmp_path):
    """The run's own earlier checkpoint: the later ones would win the next --resume auto (or be replaced)."""
    from pcl.resume import claim_exp_dir, clear_files

    from pcl import checkpoint as ckpt_io

    early = _ckpt(tmp_path, "checkpoint_0000.pth.tar", 1)
    late = _ckpt(tmp_path, "checkpoint_0004.pth.tar", 5)
    preempt = _ckpt(tmp_path, "checkpoint_preempt.pth.tar", 1, step=3)  # epoch 1's own stop: passed at its save
    head = ckpt_io.read_header(early)
    with pytest.raises(PCLError, match=r"checkpoint_0004.pth.tar further on \(epoch 5, step 0\)"):
        claim_exp_dir(str(tmp_path), False, early, head)
    claim = claim_exp_dir(str(tmp_path), True, early, head)
    assert claim.remove == [late]
    clear_files(claim)
    assert os.path.exists(early) and os.path.exists(preempt) and not os.path.exists(late)
    assert claim_exp_dir(str(tmp_path), False, early, head).note.startswith("continuing")


def test_resume_auto_takes_no_file_of_another_run_along(tmp_path):
    from pcl import checkpoint as ckpt_io
    from pcl.resume import claim_exp_dir

    _ckpt(tmp_path, "checkpoint_0001.pth.tar", 2, run_id="new")
    _ckpt(tmp_path, "checkpoint_0000.pth.tar", 1, run_id="old")
    path, head = ckpt_io.resolve_resume("auto", str(tmp_path))
    with pytest.raises(PCLError, match=r"checkpoint_0000.pth.tar of another run .*remove them$"):
        claim_exp_dir(str(tmp_path), False, path, head, auto=True)


def test_a_directory_named_like_a_checkpoint_is_refused_by_what_it_is(tmp_path):
    """NS13: not 'another run's checkpoints' (--overwrite could not save over a directory either)."""
    from pcl.resume import claim_exp_dir

    (tmp_path / "checkpoint_last.pth.tar").mkdir()
    with pytest.raises(PCLError, match=r"checkpoint_last.pth.tar is a directory, not a checkpoint; remove or rename"):
        claim_exp_dir(str(tmp_path), True, None, None)





# Issue 38.1 (audit N1, N11): the resume and the data agreed over ranks; --resume auto reads one file


def test_resume_auto_reads_only_headers_and_loads_one_file(tmp_path, monkeypatch):
    from pcl import checkpoint as ckpt_io

    for e in range(8):
        _ckpt(tmp_path, f"checkpoint_{e:04d}.pth.tar", e + 1)
    real, full = torch.load, []
    monkeypatch.setattr(ckpt_io.torch, "load", lambda *a, **k: (full.append(a[0]) if not k.get("mmap") else None)
                        or real(*a, **k))
    path, head = ckpt_io.resolve_resume("auto", str(tmp_path))
    assert path.endswith("checkpoint_0007.pth.tar") and head["epoch"] == 8 and full == []
    ckpt_io.load_checkpoint(path)
    assert full == [path]


def test_ranks_that_list_the_folder_differently_take_rank_0s_checkpoint(tmp_path, monkeypatch):
    """A stale NFS listing on rank 3 misses the furthest checkpoint: every rank still resumes rank 0's."""
    from collectives import WorldAudit
    from pcl import checkpoint as ckpt_io
    from pcl.resume import agree_resume

    paths = [_ckpt(tmp_path, f"checkpoint_{e:04d}.pth.tar", e + 1) for e in range(3)]
    cfg = validate_pretrain_args(tiny_args(tmp_path, "--resume", "auto"))
    real = ckpt_io.checkpoint_files

    def fn(rank):
        monkeypatch.setattr(ckpt_io, "checkpoint_files", (lambda d: real(d)[:-1]) if rank == 3 else real)
        session = Session.prepare(cfg)
        return agree_resume(session.path, session.ckpt)

    assert WorldAudit(4).run(fn) == [(paths[2], (3, 0))] * 4


def test_a_checkpoint_one_rank_cannot_read_is_one_error_on_every_rank(tmp_path, monkeypatch, tiny_run):
    import types

    from collectives import WorldAudit
    from conftest import copy_run
    from pcl import checkpoint as ckpt_io
    from pcl.engine import build_optimizer
    from pcl.model import MoCo

    copy_run(tiny_run, tmp_path)
    cfg = validate_pretrain_args(tiny_args(tmp_path, "--resume", "auto"))
    model = MoCo("resnet18", 128, 256, 0.99, True, 4, "small")
    optimizer = build_optimizer(model, 0.05, 0.9, 1e-4)
    real = ckpt_io.load_checkpoint

    def fn(rank):
        def load(path, map_location="cpu", mmap=False):  # the file is still being copied to rank 2's node
            if rank == 2 and not mmap:
                raise PCLError(f"checkpoint not found: {path}")
            return real(path, map_location, mmap)

        monkeypatch.setattr(ckpt_io, "load_checkpoint", load)
        session = Session.prepare(cfg)
        return session.load(model, optimizer, types.SimpleNamespace(num_samples=1438), torch.device("cpu"))

    audit = WorldAudit(4)
    outcomes = audit.run(fn)
    assert not audit.mismatches()
    for err in outcomes:
        assert isinstance(err, PCLError) and "failed on rank 2 of 4: checkpoint not found" in str(err), err


def test_ranks_that_see_different_training_sets_stop_with_one_error(tmp_path):
    """N and a hash of the sample list are compared after the process group starts (issue 38.1)."""
    import types

    from collectives import WorldAudit
    from conftest import image_folder
    from pcl.data.datasets import image_folder as scan, sample_fingerprint
    from pcl.engine import _check_data

    root = image_folder(tmp_path / "d", ["a", "b"], per_class=3, splits=("train",))
    seen = sample_fingerprint(scan(root, "train"))
    os.remove(os.path.join(root, "train", "b", "2.png"))  # one rank's listing is missing a file
    stale = sample_fingerprint(scan(root, "train"))
    assert seen != stale
    cfg = validate_pretrain_args(tiny_args(tmp_path, root))

    def fn(rank):
        prints = (6, stale) if rank == 1 else (6, seen)  # same N: only the hash tells
        return _check_data(cfg, types.SimpleNamespace(num_samples=prints[0], fingerprint=prints[1],
                                                      train_loader=[1], ))

    outcomes = WorldAudit(4).run(fn)
    for err in outcomes:
        assert isinstance(err, PCLError) and "the training set (images, sample-list hash) differs between the " \
            "processes: rank 0 has (6, '" in str(err) and "rank 1 has" in str(err), err


def test_a_mid_epoch_checkpoint_resumed_with_other_granularities_is_refused(tmp_path):
    """R17: it continued with the checkpoint's k=2,3 prototypes while logging acc_proto_k4/k5 of --num-cluster 4,5."""
    from pcl.resume import _check_mid_epoch

    cfg = validate_pretrain_args(tiny_args(tmp_path, "--num-cluster", "4,5"))
    ckpt = {"step": 3, "args": {"global_batch_size": 64},
            "cluster_result": {"im2cluster": [torch.zeros(6), torch.zeros(6)], "centroids": [torch.eye(2, 4),
                                                                                           torch.eye(3, 4)]}}
    with pytest.raises(PCLError, match=r"saved mid-epoch with --num-cluster 2,3; resume it with those \(now 4,5\)"):
        _check_mid_epoch(ckpt, "mid.pth.tar", cfg, 6)
    _check_mid_epoch(ckpt, "mid.pth.tar", cfg.replace(num_cluster=(2, 3)), 6)


@pytest.mark.parametrize("states, message", [
    (None, r"holds no 'resume_states'"),  # NO06: 'saved mid-epoch by 0 processes ... (0)'
    ([{}], r"holds resume_states\[0\] lacks shuffle_gen, negative_gen, meters, loader, torch_rng"),  # NO07: KeyError
])
def test_a_mid_epoch_checkpoint_without_its_loop_states_is_refused_before_any_work(tmp_path, states, message):
    path = _ckpt(tmp_path, "mid.pth.tar", 2, step=3)
    from pcl import checkpoint as ckpt_io

    ckpt = ckpt_io.load_checkpoint(path)
    if states is not None:
        ckpt["resume_states"] = states
    torch.save(ckpt, path)
    cfg = validate_pretrain_args(tiny_args(tmp_path / "run", "--resume", path, "/no/such/data"))
    with pytest.raises(PCLError, match=r"was saved mid-epoch \(step 3\) but " + message):
        Session.prepare(cfg)


def _listing_worker(rank, port, out_dir):
    from conftest import image_folder
    from pcl.engine import setup

    torch.set_num_threads(1)
    classes = ["a", "b"] if rank == 0 else ["a", "c"]  # rank 1's node lists another class folder: same N
    root = image_folder(os.path.join(out_dir, f"data{rank}"), classes, per_class=4, splits=("train",))
    cfg = validate_pretrain_args(tiny_args(os.path.join(out_dir, "exp"), root, "--dist-url", f"tcp://127.0.0.1:{port}",
                                           "--world-size", "2", "--rank", str(rank), "-b", "4", "--pcl-r", "8",
                                           "--num-cluster", "2", "--image-size", "8"))
    try:
        setup(cfg)
        outcome = "no error"
    except PCLError as e:
        outcome = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    from pcl import distributed as dist_utils

    dist_utils.cleanup()


def test_two_gloo_processes_that_list_different_files_stop_with_one_error_each(tmp_path):
    """Issue 38.1 with real collectives: the ranks' sample lists differ (same N), each stops with the same line."""
    import torch.multiprocessing as mp

    from conftest import free_port

    mp.spawn(_listing_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    same = [line.split(": every process must list")[0] for line in lines]  # then each names its own DIR
    assert same[0] == same[1] and lines[0].startswith("the training set (images, sample-list hash) differs between "
                                                        "the processes: rank 0 has (8, '"), lines
