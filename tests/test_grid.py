"""experiments/grid.py beyond its smoke run (tests/test_experiments.py): the statistics of the pre-registered
factorial on hand-made numbers, the validation split, and the guards that keep a study from mixing runs, subsets or
data made under other settings (reliability probe s4: WG01, WG03-WG06, WG09-WG11, WC04).

The grid runs here never train: ``train`` copies a tiny checkpoint into the run folder and writes its log line, so a
test costs the evaluation only.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_clean_error, fake_mnist, image_folder
from test_experiments import driver

TINY = ["--", "--num-cluster", "5,10"]  # k <= the 50 training images of the subsets below


def fake_train(checkpoint, calls):
    """A training call that records its argv and leaves a finished run: the checkpoint and one log line."""
    def train(argv):
        calls.append(argv)
        exp = argv[argv.index("--exp-dir") + 1]
        os.makedirs(exp, exist_ok=True)
        shutil.copy(checkpoint, os.path.join(exp, "checkpoint_last.pth.tar"))
        with open(os.path.join(exp, "log.txt"), "a") as f:
            f.write(json.dumps({"epoch": 0, "seconds": 1.5, "loss": 7.0}) + "\n")
        return {}, {"wall_seconds": 1.5}
    return train


def grid_argv(data, root, *extra):
    return ["--data", data, "--train-per-class", "5", "--val-per-class", "5", "--seeds", "0,1", "--svm-runs", "1",
            "--exp-root", str(root / "exp"), *extra]


# ---------------------------------------------------------------------------------------------- statistics


def test_sign_flip_p_and_t_interval_on_hand_made_numbers():
    """Exact sign-flip p by hand: d = (1, 2, 3) has signed sums 6, 4, 2, 0, 0, -2, -4, -6, two reach |6|: 2/8;
    d = (1, -2, 3, 4) sums to 6 and, of the 16 sums +-1 +-2 +-3 +-4, 10, 8, 6 and their negatives reach 6: 6/16;
    six differences of one sign: 2/64. The t interval of (1, 2, 3): 2 +- t(0.975, 2) x 1 / sqrt(3)."""
    stats = driver("grid_stats")
    assert stats.sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    assert stats.sign_flip_p([1.0, -2.0, 3.0, 4.0]) == 6 / 16
    assert stats.sign_flip_p([0.1, 0.2, 0.1, 0.3, 0.2, 0.4]) == 2 / 64
    assert stats.sign_flip_p([0.0, 0.0]) == 1.0 and stats.sign_flip_p([]) is None
    assert stats.sign_flip_p([0.1] * 17) is None  # beyond the exact enumeration
    d = stats.difference_stats([1.0, 2.0, 3.0], [0, 1, 2])
    half = 4.302652729749464 / math.sqrt(3)
    assert d["mean"] == 2.0 and d["sd"] == 1.0 and d["p_sign_flip"] == 0.25
    assert d["ci95"] == pytest.approx([2 - half, 2 + half], rel=1e-9)


def cells_records(pcl_val_prefers_t05: bool) -> dict:
    """Hand-made runs of the four cells, seeds 0-2 (NMI and ARI on test; validation NMI/ARI that pick moco's
    T = 0.5, and pcl's T = 0.5 or 0.2)."""
    test = {"moco": ([0.50, 0.52, 0.51], [0.40, 0.41, 0.42]), "moco_t05": ([0.55, 0.56, 0.58], [0.45, 0.47, 0.46]),
            "pcl": ([0.52, 0.54, 0.52], [0.41, 0.42, 0.44]), "pcl_t05": ([0.60, 0.61, 0.64], [0.50, 0.52, 0.50])}
    val = {"moco": 0.8, "moco_t05": 0.9, "pcl": 0.8 if pcl_val_prefers_t05 else 1.0, "pcl_t05": 0.9}
    return {v: {s: {"nmi": nmi[s], "ari": ari[s], "val_nmi": val[v] / 2, "val_ari": val[v] / 2} for s in range(3)}
            for v, (nmi, ari) in test.items()}


def test_factorial_contrasts_interaction_and_decision_rule():
    """The factorial of hand-made runs: PCL - MoCo at each T and the interaction per seed, each method's better
    temperature on validation, and the rule's verdict on the contrast between the chosen cells."""
    stats = driver("grid_stats")
    cells = {"moco": {"0.2": "moco", "0.5": "moco_t05"}, "pcl": {"0.2": "pcl", "0.5": "pcl_t05"}}
    res = stats.factorial(cells_records(pcl_val_prefers_t05=False), cells, ("nmi", "ari"))
    c = res["contrasts"]
    assert res["seeds"] == [0, 1, 2]
    assert c["pcl - moco at T = 0.5"]["nmi"]["diffs"] == pytest.approx([0.05, 0.05, 0.06])
    assert c["pcl - moco at T = 0.2"]["ari"]["diffs"] == pytest.approx([0.01, 0.01, 0.02])
    assert c["interaction"]["nmi"]["diffs"] == pytest.approx([0.03, 0.03, 0.05])  # (0.05 - 0.02), ...
    assert c["interaction"]["nmi"]["p_sign_flip"] == 0.25
    assert res["better_temperature"]["moco"]["variant"] == "moco_t05"
    assert res["better_temperature"]["pcl"]["variant"] == "pcl"  # validation, not test, decides
    chosen = c["better T: pcl (T = 0.2) - moco (T = 0.5)"]
    assert chosen["nmi"]["diffs"] == pytest.approx([-0.03, -0.02, -0.06])
    assert res["decision"]["supported"] is False and "includes 0 on NMI and ARI" in res["decision"]["verdict"]

    res = stats.factorial(cells_records(pcl_val_prefers_t05=True), cells, ("nmi", "ari"))
    decision = res["decision"]
    assert decision["contrast"] == "better T: pcl (T = 0.5) - moco (T = 0.5)" and decision["supported"] is True
    assert decision["ci95"]["nmi"][0] > 0 and decision["ci95"]["ari"][0] > 0
    assert "does not confirm" in decision["verdict"]  # 3 seeds: the sign-flip p cannot go below 0.25
    text = stats.factorial_markdown(res, {"nmi": ("NMI", "{:.3f}"), "ari": ("ARI", "{:.3f}")})
    assert "| interaction | 3 | +0.037" in text and "(p 0.250)" in text and "decision rule: PCL improves" in text

    no_val = {v: {s: {k: x for k, x in r.items() if not k.startswith("val_")} for s, r in runs.items()}
              for v, runs in cells_records(True).items()}
    res = stats.factorial(no_val, cells, ("nmi", "ari"))
    assert res["decision"]["supported"] is None and "no validation" in res["decision"]["verdict"]
    assert stats.factorial({**no_val, "pcl_t05": {}}, cells) is None


def test_variants_are_a_table_with_pcl_at_t05():
    grid = driver("grid")
    from pcl.config import build_pretrain_parser, parse_args

    cfg = parse_args(build_pretrain_parser(), ["-c", os.path.join(ROOT, "configs", "fmnist.yaml"), "--epochs", "36"])
    rows = grid.variants(cfg)
    assert rows["pcl_t05"] == ["--temperature", "0.5"] and rows["pcl"] == []
    assert rows["moco_t05"] == ["--warmup-epoch", "36", "--temperature", "0.5"]
    assert rows["k_large"] == ["--num-cluster", "1024,2048,4096"] and set(rows) == set(grid.VARIANTS)
    assert grid.FACTORIAL == {"moco": ("moco", "moco_t05"), "pcl": ("pcl", "pcl_t05")}
    assert rows["propos"] == ["--unique-prototypes", "--temperature", "1.0", "--proto-weight", "0.01",
                              "--warmup-epoch", "2"]  # 5 % of 36 epochs, as ProPos's 50 of 1000
    assert rows["moco_t1"] == ["--warmup-epoch", "36", "--temperature", "1.0"]
    twelve = parse_args(build_pretrain_parser(), ["-c", os.path.join(ROOT, "configs", "fmnist.yaml")])
    assert twelve.epochs == 12 and grid.variants(twelve)["propos"][-1] == "1"


# ---------------------------------------------------------------------------------------------- data


def test_validation_split_is_balanced_disjoint_seeded_and_checked(tmp_path):
    """--val-per-class M: M images of each class from the training images the subset leaves out, seeded; written
    once with its record; a subset folder made from other data (WG11) or without a record is refused."""
    from pcl import PCLError
    from pcl.data import load_mnist_family, read_idx

    ev = driver("grid_eval")
    data = fake_mnist(tmp_path / "fm", n_train=200, n_test=60)
    full = load_mnist_family("fashion-mnist", data)
    train, val = ev.split_rows(full["train_labels"], 5, 6, 0, data)
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.bincount(full["train_labels"][val]).tolist() == [6] * 10
    assert torch.equal(val, ev.split_rows(full["train_labels"], 5, 6, 0, data)[1])
    assert not torch.equal(val, ev.split_rows(full["train_labels"], 5, 6, 1, data)[1])
    assert len(ev.split_rows(full["train_labels"], 5, None, 0, data)[1]) == 150  # default: all 15 that are left
    with pytest.raises(PCLError, match="--val-per-class 16: .* only 15 .* give --val-per-class 15 or less"):
        ev.split_rows(full["train_labels"], 5, 16, 0, data)

    sub = ev.write_subset("fashion-mnist", data, 5, str(tmp_path / "sub"), 6, 0)
    images = read_idx(os.path.join(sub, ev.VAL_FILES[0]))
    assert torch.equal(images, full["train"][val, 0])
    assert json.loads(open(os.path.join(sub, "made_with.json")).read())["val_per_class"] == 6
    other = fake_mnist(tmp_path / "other", n_train=200, n_test=60, seed=1)
    with pytest.raises(PCLError, match="made with other settings or data .*source_fingerprint"):
        ev.write_subset("fashion-mnist", other, 5, sub, 6, 0)
    with pytest.raises(PCLError, match="val_per_class: 6 there, 4 now"):
        ev.write_subset("fashion-mnist", data, 5, sub, 4, 0)
    os.remove(os.path.join(sub, "made_with.json"))  # an older grid's subset, or an interrupted write
    with pytest.raises(PCLError, match="no made_with.json"):
        ev.write_subset("fashion-mnist", data, 5, sub, 6, 0)
    assert not [p for p in os.listdir(tmp_path) if ".partial" in p]


def test_low_shot_svm_matches_small_scale_and_picks_c_on_validation():
    """The grid's SVM scores test and validation from the same SVMs: its test column is small_scale's number (C
    picked on test, as the official script does), and the val-C column uses the cost best on validation."""
    import argparse

    import numpy as np

    gen = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(6)
    x = (torch.eye(10)[y] + 0.8 * torch.randn(60, 10, generator=gen)).numpy()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    opts = argparse.Namespace(seed=3, shots=[1, 4], svm_runs=2, svm_costs=[0.01, 1.0, 100.0])
    ref = driver("small_scale").low_shot_svm(x, y, x[:30], y[:30], opts)
    out = driver("grid_eval").low_shot(x, y, {"test": (x[:30], y[:30]), "val": (x[30:], y[30:])}, opts)
    assert out["svm_map_1shot"] == pytest.approx(ref["1"]) and out["svm_map_4shot"] == pytest.approx(ref["4"])
    assert set(out["svm_cost"]["4"]) == {"test", "val"} and "val_svm_map_4shot" in out
    assert out["svm_map_4shot_val_c"] <= out["svm_map_4shot"]  # the test's own best cost is an upper bound


# ---------------------------------------------------------------------------------------------- the grid


def test_factorial_grid_records_validation_and_writes_outside_the_checkout(tmp_path, tiny_checkpoint):
    """The four cells x 2 seeds: each run's JSON holds test and validation columns and the settings it was made
    with; the summary holds the factorial; by default nothing is written into the checkout's experiments/results
    (WG09): OUT_DIR is EXP_ROOT/results."""
    grid = driver("grid")
    committed = os.path.join(ROOT, "experiments", "results", "grid", "summary.json")
    before = open(committed).read() if os.path.exists(committed) else None
    data = fake_mnist(tmp_path / "fm", n_train=200, n_test=60)
    calls = []
    res = grid.main(grid_argv(data, tmp_path, "--variants", "moco,moco_t05,pcl,pcl_t05", *TINY),
                    train=fake_train(tiny_checkpoint, calls))
    assert len(calls) == 8 and res["ran"][:4] == ["moco_seed0", "moco_t05_seed0", "pcl_seed0", "pcl_t05_seed0"]
    argv = calls[3]
    assert argv[-2:] == ["--temperature", "0.5"] and "--warmup-epoch" not in argv[argv.index("--exp-dir"):]
    out = tmp_path / "exp" / "results"
    run = json.loads((out / "pcl_t05_seed1.json").read_text())
    for key in ("nmi", "ari", "kmeans_acc", "knn_top1", "svm_map_1shot", "svm_map_4shot", "val_nmi", "val_ari",
                "val_kmeans_acc", "val_knn_top1", "val_svm_map_1shot", "val_svm_map_4shot", "svm_map_1shot_val_c"):
        assert isinstance(run[key], float), key
    assert run["settings"]["validation"] == {"per_class": 5, "seed": 0, "images": 50}
    assert run["settings"]["resolved"]["temperature"] == 0.5 and len(run["settings"]["data_fingerprint"]) == 16
    summary = json.loads((out / "summary.json").read_text())
    fact = summary["factorial"]
    assert fact["cells"] == {"moco": {"0.2": "moco", "0.5": "moco_t05"}, "pcl": {"0.2": "pcl", "0.5": "pcl_t05"}}
    assert set(fact["contrasts"]) >= {"pcl - moco at T = 0.5", "interaction"} and fact["decision"]["verdict"]
    assert "p_sign_flip" in summary["paired_vs_moco"]["pcl"]["nmi"] and "decision rule:" in summary["table"]
    assert (open(committed).read() if os.path.exists(committed) else None) == before

    # WG10: a new --out-dir and new overrides on the same --exp-root: the old weights are not filed as the new ones
    with pytest.raises(Exception, match=r"moco_seed0 holds a run made with other settings or data \(resolved.lr: "):
        grid.main(grid_argv(data, tmp_path, "--variants", "moco", "--out-dir", str(tmp_path / "b"), *TINY,
                            "--lr", "0.3"), train=fake_train(tiny_checkpoint, calls))
    assert len(calls) == 8 and not (tmp_path / "b").exists()


def test_grid_refuses_a_run_folder_without_its_record(tmp_path, tiny_checkpoint):
    """A run folder with checkpoints but no made_with.json (an older grid's, another tool's) is not resumed."""
    from pcl import PCLError

    grid = driver("grid")
    data = fake_mnist(tmp_path / "fm", n_train=200, n_test=60)
    (tmp_path / "exp" / "moco_seed0").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, tmp_path / "exp" / "moco_seed0" / "checkpoint_last.pth.tar")
    calls = []
    with pytest.raises(PCLError, match="moco_seed0 holds a run but no made_with.json"):
        grid.main(grid_argv(data, tmp_path, "--variants", "moco", *TINY), train=fake_train(tiny_checkpoint, calls))
    assert not calls
    # a folder whose run stopped before saving anything holds no run: other settings may claim it
    shutil.rmtree(tmp_path / "exp" / "moco_seed0")
    (tmp_path / "exp" / "moco_seed0").mkdir()
    (tmp_path / "exp" / "moco_seed0" / "made_with.json").write_text('{"resolved": {"lr": 9.0}}')
    grid.main(grid_argv(data, tmp_path, "--variants", "moco", "--seeds", "0", *TINY),
              train=fake_train(tiny_checkpoint, calls))
    assert len(calls) == 1
    assert json.loads((tmp_path / "exp" / "moco_seed0" / "made_with.json").read_text())["resolved"]["lr"] == 0.12


def test_grid_checks_every_variant_and_the_dataset_before_any_run(tmp_path):
    """k_large on 50 images (WG06) is refused before the first run, not after it; --train-per-class on an
    ImageFolder config (WG04) and an ImageFolder grid at all are one line at start-up."""
    from pcl import PCLError

    grid = driver("grid")
    data = fake_mnist(tmp_path / "fm", n_train=200, n_test=60)
    calls = []
    with pytest.raises(PCLError, match="variant k_large: --num-cluster 128,256,512: k=512 is larger than the 50"):
        grid.main(grid_argv(data, tmp_path, "--variants", "moco,k_large", *TINY, "-b", "32"),
                  train=lambda argv: calls.append(argv))
    assert not calls
    folder = tmp_path / "folder"
    image_folder(folder, ["a", "b"], per_class=3)
    small = os.path.join(ROOT, "configs", "small_folder.yaml")
    with pytest.raises(PCLError, match="--train-per-class needs an MNIST-family dataset"):
        grid.main(["--config", small, "--data", str(folder), "--train-per-class", "3", "--exp-root",
                   str(tmp_path / "e")], train=lambda argv: calls.append(argv))
    with pytest.raises(PCLError, match="evaluates on a test split held in memory"):
        grid.main(["--config", small, "--data", str(folder), "--exp-root", str(tmp_path / "e")],
                  train=lambda argv: calls.append(argv))
    assert not calls and not (tmp_path / "e").exists()


@pytest.mark.parametrize("args, phrase", [(["--seeds", ""], "--seeds"), (["--epochs", "0"], "--epochs 0"),
                                          (["--data", "/nonexistent/fm"], "not found")])
def test_grid_errors_are_one_line(tmp_path, capsys, args, phrase):
    """WG01, WG03, WG05 (and any PCLError, e.g. WC04's lock): one 'error:' line on stderr and exit 2, no traceback."""
    grid, study = driver("grid"), driver("study")
    with pytest.raises(SystemExit) as exit_:
        study.cli(lambda: grid.main(["--exp-root", str(tmp_path / "e"), *args]))
    assert_clean_error(exit_.value.code, capsys.readouterr().err, phrase)


def test_grid_script_prints_one_line(tmp_path):
    """The script itself: exit 2 and one line (WG03), as a user sees it."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "grid.py"), "--seeds", "",
                           "--exp-root", str(tmp_path / "e")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 2
    assert_clean_error(proc.returncode, proc.stderr, "--seeds")
