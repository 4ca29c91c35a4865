"""The evaluations' own inputs (reliability probe s4): eval_linear.py --resume files and flags, NaN validation
scores, the kNN vote at extreme settings. Each case ID is named in its test."""

import pytest
import torch

from pcl import PCLError
from pcl.evaluation.linear import fit_linear
from test_eval_safety import linear_args, pretrained, trained_head  # noqa: F401  (fixtures)


@pytest.mark.parametrize("extra", [[], ["--evaluate"]], ids=["E04/WE11", "NE19"])
def test_a_pretraining_checkpoint_given_to_resume_is_named_as_one(tmp_path, pretrained, extra):  # noqa: F811
    with pytest.raises(PCLError, match=r"--resume .*p.pth.tar is a pretraining checkpoint .*give it to --pretrained"):
        fit_linear(linear_args(tmp_path, "--pretrained", pretrained, "--resume", pretrained, *extra))


@pytest.mark.parametrize("case, edit, message", [
    ("NE07", lambda c: c.pop("epoch"), r"its 'epoch' is None, not an epoch number"),
    ("NE09", lambda c: c.pop("state_dict"), r"has no 'state_dict'"),
    ("NE08", lambda c: c.update(optimizer={"state": {}, "param_groups": [{"params": [0, 1, 2], "lr": 1.0}]}),
     r"its optimizer state does not fit this head's SGD"),
])
def test_a_broken_linear_checkpoint_is_one_line(tmp_path, pretrained, trained_head, case, edit, message):  # noqa: F811
    ckpt = torch.load(trained_head[1], weights_only=True)
    edit(ckpt)
    torch.save(ckpt, tmp_path / "bad.pth.tar")
    with pytest.raises(PCLError, match=message):
        fit_linear(linear_args(tmp_path, "--pretrained", pretrained, "--epochs", "2", "--resume",
                               str(tmp_path / "bad.pth.tar")))


def test_a_head_of_another_class_count_is_named_as_such(tmp_path, pretrained, trained_head):  # noqa: F811
    """NE04: was blamed on arch/--width/--stem/--mlp/--low-dim/--pcl-r."""
    with pytest.raises(PCLError, match=r"is a head of 10 classes on 512-d features; the probe here has 12 classes"):
        fit_linear(linear_args(tmp_path, "--pretrained", pretrained, "--epochs", "2", "--num-classes", "12",
                               "--resume", trained_head[1]))


def test_resuming_a_finished_head_says_nothing_to_train(tmp_path, pretrained, trained_head):  # noqa: F811
    with pytest.raises(PCLError, match=r"nothing to train: --resume .* is at epoch 1 of --epochs 1; raise --epochs"):
        fit_linear(linear_args(tmp_path, "--pretrained", pretrained, "--resume", trained_head[1]))


@pytest.mark.parametrize("extra", [[], ["--cached-features"]], ids=["NE06", "NE05"])
def test_start_epoch_at_or_past_epochs_is_refused(tmp_path, extra):
    """NE06 printed 'linear probe done: top1 0.00' and exited 0; NE05 was a ValueError."""
    with pytest.raises(PCLError, match=r"--start-epoch 5 is not below --epochs 1: nothing to train"):
        fit_linear(linear_args(tmp_path, "/no/such/data", "--start-epoch", "5", *extra))


def test_num_classes_below_the_labels_is_refused(tmp_path):
    """NE03: an IndexError at the first step."""
    with pytest.raises(PCLError, match=r"--num-classes 2 is below the 10 classes of the training labels \(0-9\)"):
        fit_linear(linear_args(tmp_path, "--num-classes", "2", "-a", "resnet18", "--width", "4"))


def test_a_nan_validation_is_not_reported_as_an_accuracy():
    """NN06: semisup --lr 1e6 printed 'top-1 50.00' from NaN outputs (the training loss stayed finite)."""
    from pcl.evaluation.linear import validate

    class Broken(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3), float("nan"))

    loader = [(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]), torch.arange(4))]
    with pytest.raises(PCLError, match=r"the validation loss is nan: the model's outputs are not finite .*; lower "
                                       r"--lr / --lr-last-layer"):
        validate(Broken(), loader, torch.device("cpu"), hint="lower --lr / --lr-last-layer")


def test_knn_votes_stay_finite_at_a_tiny_temperature():
    """NN07: exp(s / 1e-9) overflowed to NaN votes (40 % where the nearest neighbour gives 100 %)."""
    from pcl.features import knn_accuracy

    gen = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen), dim=1)
    labels = torch.arange(40) % 4
    test = torch.nn.functional.normalize(train + 0.01 * torch.randn(40, 8, generator=gen), dim=1)
    assert knn_accuracy(train, labels, test, labels, k=5, temperature=1e-9) == pytest.approx(100.0)
    from pcl.features import knn_predict

    sim = test @ train.t()
    top, idx = sim.topk(5, dim=1)  # the official vote, unshifted, where it is finite: the same arg-max
    official = (torch.nn.functional.one_hot(labels[idx], 4) * (top / 0.07).exp()[..., None]).sum(1)
    assert torch.equal(knn_predict(train, labels, test, 5, 0.07).argmax(1), official.argmax(1))


def test_knn_k_above_the_training_set_is_reported_as_what_ran(tmp_path, monkeypatch, capsys):
    """NK14: --knn-k 200 with 20 training images printed '| 200 | 60.00% |'."""
    from pcl.config import parse_args
    from pcl.evaluation import knn

    gen = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(20, 8, generator=gen), dim=1)
    labels = torch.arange(20) % 2
    monkeypatch.setattr(knn, "labelled_features", lambda cfg: (feats, labels, feats, labels))
    args = parse_args(knn.build_parser(), ["--dataset", "demo", "--knn-k", "3,200", "--exp-dir", str(tmp_path)])
    knn.run(args)
    out = capsys.readouterr()
    assert "| 200 (all 20) |" in out.out and "--knn-k 200: k above the 20 training samples votes with all 20" in out.err
    import json

    assert json.loads((tmp_path / "knn.json").read_text())["k_used"] == {"3": 3, "200": 20}


def test_svm_map_is_over_the_classes_that_have_test_positives(pcl_warnings):
    """NI15: an idx set with 2 of 10 classes present averaged in 8 APs of 0 (mAP 10.47) without a word."""
    import numpy as np

    from pcl.evaluation.svm import _warn_missing_classes, score_report

    test_y = -np.ones((4, 10))
    test_y[[0, 1], 0], test_y[[2, 3], 1] = 1, 1
    scores = np.zeros((4, 10))
    scores[[0, 1], 0], scores[[2, 3], 1] = 1.0, 1.0
    assert score_report(scores, test_y, single_label=False)["mAP"] == pytest.approx(100.0)
    _warn_missing_classes(test_y, test_y, [])
    assert pcl_warnings == ["8 of the 10 classes have no positive in the test split: the mAP is over the other 2",
                            "8 of the 10 classes have no positive in the training split: their SVM cannot be trained, "
                            "they are never predicted"]


def test_a_class_without_training_positives_is_never_predicted():
    """S06: Places205 classes with no training positive scored 0, above every trained class's negative score."""
    import numpy as np

    from pcl.evaluation.svm import score_report, svm_scores

    gen = np.random.default_rng(0)
    x = gen.normal(size=(30, 4)).astype(np.float32)
    labels = np.arange(30) % 3  # class 3 has no image
    y = -np.ones((30, 4))
    y[np.arange(30), labels] = 1
    scores = svm_scores(x, y, x, 0.5, n_jobs=1)
    assert np.isneginf(scores[:, 3]).all() and (scores.argmax(1) != 3).all()
    assert score_report(scores, y, single_label=True)["top1"] > 0


def test_low_shot_k_above_a_class_positives_is_said(pcl_warnings):
    """NV07: --shots 100 with fewer positives ran and was reported as k=100 without a word."""
    import numpy as np

    from pcl.evaluation.svm import _warn_missing_classes

    y = -np.ones((12, 3))
    y[np.arange(12), np.arange(12) % 3] = 1  # 4 positives each
    _warn_missing_classes(y, y, [1, 4, 100])
    assert pcl_warnings == ["--shots 100: 3 classes have fewer positives (the fewest: 4); they train on all they have"]
