"""pcl.resume: what a checkpoint saved mid-epoch may continue, and the refusals that keep it exact."""

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
