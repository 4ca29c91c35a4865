"""Every study driver in experiments/ runs end to end at toy size, in this process, so none can rot unnoticed.

Each run asserts what its JSON must hold (measured numbers, not just "it ran"). small_scale.py runs in
test_mnist_family.py (it needs the fake Fashion-MNIST idx files built there). The drivers reach the library only
through its public entry points (pretraining's parser + ``fit``, the protocols' own functions): a static check
below fails when one imports a private name of ``pcl`` or builds an argument namespace by hand, and the last test
fails when a driver is added to experiments/ without a smoke run anywhere.
"""

import argparse
import ast
import importlib
import json
import os
import sys
from types import ModuleType

import pytest
import torch

from conftest import ROOT, fake_mnist, image_folder, tiny_argv

EXPERIMENTS = os.path.join(ROOT, "experiments")
SHARED = {"study.py", "grid_eval.py", "grid_stats.py"}  # what the drivers share, not drivers
SMOKED_ELSEWHERE = {"small_scale.py"}
TINY_PRETRAIN = ["--demo-renders", "1", "--image-size", "16", "-a", "resnet18", "--width", "4", "--stem", "small",
                 "-b", "64", "--pcl-r", "256", "--num-cluster", "10,20", "--kmeans-nredo", "1", "--kmeans-niter", "5",
                 "--workers", "0", "--no-progress"]


def driver(name: str) -> ModuleType:
    """Import experiments/<name>.py as its own module (the folder on sys.path, as when it runs as a script)."""
    if EXPERIMENTS not in sys.path:
        sys.path.insert(0, EXPERIMENTS)
    return importlib.import_module(name)


def read(path) -> dict:
    return json.loads(open(path).read())


def drivers() -> list[str]:
    return sorted(f for f in os.listdir(EXPERIMENTS) if f.endswith(".py") and f not in SHARED)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    from pcl.config import build_pretrain_parser, parse_args
    from pcl.engine import fit

    exp = tmp_path_factory.mktemp("study_ckpt")
    fit(parse_args(build_pretrain_parser(), tiny_argv(exp, "--epochs", "1", "--warmup-epoch", "0")))
    return str(exp / "checkpoint_last.pth.tar")


def test_demo_diagnosis(tmp_path, tiny_checkpoint):
    out = tmp_path / "d.json"
    res = driver("demo_diagnosis").main([tiny_checkpoint, "--num-cluster", "10", "--image-size", "16",
                                         "--demo-renders", "1", "--out", str(out)])
    assert out.exists() and set(res[0]["cluster_ami"][10]) >= {"digit"} and 0 <= res[0]["knn_top1"]["digit"] <= 100


def test_demo_imagefolder(tmp_path):
    data = fake_mnist(tmp_path / "fm", n_train=60, n_test=20)
    out = tmp_path / "f.json"
    res = driver("demo_imagefolder").main(["--idx-dir", data, "--out-dir", str(tmp_path / "run"), "--train-per-class",
                                           "4", "--val-per-class", "2", "--json", str(out), "--",
                                           "--epochs", "1", "--warmup-epoch", "0", *TINY_PRETRAIN, "-b", "16",
                                           "--pcl-r", "32", "--num-cluster", "3,4", "--bn-splits", "2"])
    assert out.exists() and set(res["knn"]) == {"learned", "random_init", "raw_pixels"}
    assert res["epochs"] == 1 and res["loss_inst_last"] > 0 and res["train_seconds"] > 0
    assert res["nmi_with_labels"]["k"] == 3 and 0 <= res["nmi_with_labels"]["last_estep"] <= 100  # coarsest k
    log = tmp_path / "run" / "run" / "log.txt"
    first = log.read_text().splitlines()[0]
    log.write_text(f'{{"epoch": 0, "seconds": 5.0, "loss_inst": 9.0}}\n{first}\n{first}\n')  # an old run, a resume
    summary = driver("demo_imagefolder").run_summary(str(tmp_path / "run" / "run"))
    assert summary["epochs"] == 1 and summary["train_seconds"] == round(json.loads(first)["seconds"], 1)
    assert driver("demo_imagefolder").run_summary(str(tmp_path / "absent")) == {}


def test_demo_imagefolder_renders_handwritten_digits_its_own_way(tmp_path):
    """--source digits: scikit-learn's digits on paper, train and val from disjoint source digits, then a run."""
    out = tmp_path / "d.json"
    res = driver("demo_imagefolder").main(["--source", "digits", "--out-dir", str(tmp_path / "run"), "--train-images",
                                           "40", "--val-images", "20", "--json", str(out), "--",
                                           "--epochs", "1", "--warmup-epoch", "0", *TINY_PRETRAIN, "-b", "16",
                                           "--pcl-r", "32", "--num-cluster", "3,4", "--bn-splits", "2"])
    data = tmp_path / "run" / "data"
    assert sorted(p.name for p in (data / "train").iterdir()) == [f"class_{c}" for c in range(10)]
    assert sum(1 for _ in (data / "val").rglob("*.png")) == 20
    assert out.exists() and res["source"] == "digits" and set(res["knn"]) == {"learned", "random_init", "raw_pixels"}


def test_paper_renderer_keeps_the_digit_and_varies_the_clutter():
    paper = driver("demo_imagefolder").render_on_paper
    glyphs = torch.zeros(6, 8, 8)
    glyphs[:, 2:6, 3:5] = 1.0  # a bar
    a = paper(glyphs, 32, torch.Generator().manual_seed(0))
    b = paper(glyphs, 32, torch.Generator().manual_seed(0), clutter=False)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, paper(glyphs, 32, torch.Generator().manual_seed(0)))  # seeded
    ink = a.float().mean(1).flatten(1)
    assert (ink.min(1).values < ink.median(1).values - 60).all()  # dark ink on light paper in every image
    assert not torch.equal(a, b)  # clutter=False draws the same digits on flat paper


def test_feature_rank(tmp_path, tiny_checkpoint):
    image_folder(tmp_path / "data", ["a", "b"], per_class=4, splits=("val",))
    out = tmp_path / "r.json"
    res = driver("feature_rank").main([str(tmp_path / "data" / "val"), "random", tiny_checkpoint, "--out", str(out)])
    assert out.exists() and list(res["rows"]) == ["random", tiny_checkpoint] and res["images"] == 8
    for row in res["rows"].values():
        assert 1 <= row["head_rank"] <= 8 and -1 <= row["head_mean_cos"] <= 1 and row["backbone_rank"] >= 1
    rank = driver("feature_rank").effective_rank
    assert rank(torch.eye(4)) == pytest.approx(3.0)  # centred identity: three equal singular values
    assert rank(torch.arange(8.0)[:, None] * torch.ones(1, 5)) == pytest.approx(1.0)  # one line


def test_learning_demo(tmp_path):
    out = tmp_path / "l.json"
    res = driver("learning_demo").main(["--epochs", "2", "--warmup-epoch", "1", "--knn-every", "1", "--out", str(out),
                                        "--exp-root", str(tmp_path / "exp"), "--", *TINY_PRETRAIN])
    assert [r["name"] for r in res["results"]] == ["PCL", "MoCo only"]
    assert all(len(r["curve"]) == 2 and 0 <= r["final"]["learned"] <= 100 for r in res["results"])


def test_linear_demo(tmp_path, tiny_checkpoint):
    out = tmp_path / "lin.json"
    res = driver("linear_demo").main(["--pretrained", tiny_checkpoint, "--views", "1", "--out", str(out),
                                      "--exp-root", str(tmp_path / "exp"), "--", "--epochs", "1", "--image-size", "16",
                                      "--demo-renders", "1", "--workers", "0"])
    assert len(res["results"]) == 3 and all(0 <= r["top1"] <= 100 and r["seconds"] > 0 for r in res["results"])


def test_pauc_ablation(tmp_path):
    out = tmp_path / "p.json"
    res = driver("pauc_ablation").main(["--epochs", "2", "--warmup-epoch", "1", "--rows", "PCL,PAUC (all three)",
                                        "--out", str(out), "--exp-root", str(tmp_path / "exp"), "--", *TINY_PRETRAIN])
    assert [r["name"] for r in res["rows"]] == ["PCL", "PAUC (all three)"]
    assert all(set(r["spread"]) == {10, 20} or "failed" in r for r in res["rows"])


def test_bank_views(tmp_path):
    from pcl.config import build_pretrain_parser, parse_args
    from pcl.engine import fit

    exp = tmp_path / "run"
    fit(parse_args(build_pretrain_parser(), tiny_argv(exp, "--epochs", "2", "--warmup-epoch", "1",
                                                      "--estep-features", "bank")))
    out = driver("bank_views").main([str(exp / "checkpoint_last.pth.tar"), "--ks", "5", "--nredo", "1",
                                     "--out", str(tmp_path / "views.json")])
    rows = out["rows"]
    assert set(rows) >= {"pass", "saved bank", "1 aug view", "key + query of another view", "mean of 3 views"}
    assert abs(rows["pass"]["cosine_to_pass"] - 1) < 1e-5 and all(0 <= r["nmi_k5"] <= 100 for r in rows.values())


def test_estep_rows(tmp_path):
    """Rows of E-step variants paired by seed with a baseline in another folder: the differences, their interval,
    the E-step cost read from the runs' log.txt, the goals a lower bound misses."""
    def row(folder, variant, seed, nmi, svm, estep):
        run = tmp_path / "runs" / f"{variant}_{seed}"
        run.mkdir(parents=True)
        with open(run / "log.txt", "w") as f:
            for epoch, seconds in enumerate((10.0, 12.0, 11.0)):
                entry = {"epoch": epoch, "seconds": seconds + (estep if epoch else 0)}
                f.write(json.dumps({**entry, "estep_seconds": estep} if epoch else entry) + "\n")
        rec = {"variant": variant, "seed": seed, "exp_dir": str(run.relative_to(tmp_path)), "commit": "abc1234",
               "nmi": nmi, "ari": 0.4, "kmeans_acc": 0.6, "knn_top1": 80.0, "svm_map_1shot": svm, "svm_map_4shot": 60}
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / f"{variant}_seed{seed}.json").write_text(json.dumps(rec))

    for seed, (nmi, svm) in enumerate([(0.60, 50.0), (0.61, 52.0), (0.62, 51.0)]):
        row("base", "pcl", seed, nmi, svm, 20.0)
        row("cheap", "bank", seed, nmi - 0.02 - 0.001 * seed, svm - 0.5, 2.0)
    out = driver("estep_rows").main(["--baseline-dir", str(tmp_path / "base"), "--dir", str(tmp_path / "cheap"),
                                     "--runs-root", str(tmp_path), "--out", str(tmp_path / "rows.json")])
    bank = out["variants"]["bank (cheap)"]
    assert bank["seeds"] == [0, 1, 2] and abs(bank["diffs"]["nmi"]["mean"] + 0.021) < 1e-12
    assert bank["missed_goals"] == ["nmi"] and bank["commits"] == ["abc1234"]
    assert bank["estep"]["estep_seconds"] == 2.0 and out["baseline_estep"]["estep_seconds"] == 20.0
    assert "| bank (cheap) | 0,1,2 | -21.0 [" in out["markdown"] and read(tmp_path / "rows.json")["goals"]


def test_grid(tmp_path):
    """The grid at toy size (pcl and moco x seeds 0, 1, 2 epochs on fake Fashion-MNIST): a JSON per run with the
    columns, a summary with mean/sd and the paired difference to moco; a rerun trains nothing and rewrites no run's
    JSON; deleting a JSON reruns only that run, resuming from its newest checkpoint; other settings are refused."""
    import glob

    grid = driver("grid")
    study = driver("study")
    data = fake_mnist(tmp_path / "fm", n_train=200, n_test=60)
    out, exp = tmp_path / "out", tmp_path / "exp"
    fits: list[list[str]] = []

    def counting(argv):
        fits.append(argv)
        return study.fit_with_curve(argv)

    argv = ["--data", data, "--epochs", "2", "--variants", "pcl,moco", "--seeds", "0,1", "--shots", "1,4",
            "--svm-runs", "1", "--out-dir", str(out), "--exp-root", str(exp), "--",
            "--width", "4", "--batch-size", "32", "--pcl-r", "64", "--num-cluster", "10,20", "--kmeans-nredo", "1",
            "--kmeans-niter", "5", "--image-size", "16", "--warmup-epoch", "0", "--expect-images", "0"]
    res = grid.main(argv, train=counting)
    names = ["pcl_seed0", "moco_seed0", "pcl_seed1", "moco_seed1"]  # seed by seed: pairs complete early
    assert res["ran"] == names and len(fits) == 4 and not res["skipped"]
    cols = {"nmi", "ami", "ari", "kmeans_acc", "knn_top1", "svm_map_1shot", "svm_map_4shot", "train_seconds"}
    runs = {n: read(out / f"{n}.json") for n in names}
    for n, r in runs.items():
        assert cols <= set(r) and 0 <= r["nmi"] <= 1 and -1 <= r["ari"] <= 1 and 0 <= r["knn_top1"] <= 100
        assert r["train_seconds"] > 0 and "--resume" in r["settings"]["argv"]
    # ProtoNCE on from epoch 0: two E-steps, so a drift; the MoCo rows have none (and their own warm-up)
    assert all(0 <= runs[f"pcl_seed{s}"]["drift_nmi_k20"] <= 100 and runs[f"pcl_seed{s}"]["drift_epoch"] == 1
               for s in (0, 1))
    assert "drift_nmi_k10" not in runs["moco_seed0"] and runs["moco_seed0"]["final_loss"] != runs["pcl_seed0"]["final_loss"]
    summary = read(out / "summary.json")
    assert set(summary["per_variant"]) == {"pcl", "moco"} and summary["per_variant"]["pcl"]["nmi"]["n"] == 2
    diff = summary["paired_vs_moco"]["pcl"]["nmi"]
    assert diff["seeds"] == [0, 1] and diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    pairs = [runs[f"pcl_seed{s}"]["nmi"] - runs[f"moco_seed{s}"]["nmi"] for s in (0, 1)]
    assert diff["mean"] == pytest.approx(sum(pairs) / 2)
    half = 12.706 * abs(pairs[0] - pairs[1]) / 2 ** 0.5 / 2 ** 0.5  # t(0.975, 1) * sd / sqrt(2)
    assert diff["ci95"][1] - diff["mean"] == pytest.approx(half, rel=1e-3, abs=1e-9)
    assert "Paired difference to moco" in summary["table"] and "| pcl | 2 |" in summary["table"]

    mtimes = {n: os.path.getmtime(out / f"{n}.json") for n in names}
    res = grid.main(argv, train=counting)  # all finished: nothing trains, no data is loaded
    assert res["ran"] == [] and res["skipped"] == names and len(fits) == 4
    assert {n: os.path.getmtime(out / f"{n}.json") for n in names} == mtimes

    # one JSON lost after its run finished, one run interrupted after its first epoch (only checkpoint_0000 left)
    os.remove(out / "pcl_seed1.json")
    os.remove(out / "moco_seed0.json")
    for path in glob.glob(str(exp / "moco_seed0" / "checkpoint_*")):
        if not path.endswith("checkpoint_0000.pth.tar"):
            os.remove(path)
    res = grid.main(argv, train=counting)
    assert res["ran"] == ["moco_seed0", "pcl_seed1"] and len(fits) == 6
    assert all(os.path.getmtime(out / f"{n}.json") == mtimes[n] for n in ("pcl_seed0", "moco_seed1"))
    resumed = read(out / "moco_seed0.json")
    assert resumed["resumed_from"] and resumed["resumed_from"][0].endswith("checkpoint_0000.pth.tar")
    assert resumed["epochs_logged"] == 2
    assert read(out / "pcl_seed1.json")["nmi"] == pytest.approx(runs["pcl_seed1"]["nmi"])  # same weights re-read

    with pytest.raises(SystemExit, match="other settings"):  # a stale JSON is not averaged with new runs
        grid.main([a if a != "1" or i != argv.index("--svm-runs") + 1 else "2" for i, a in enumerate(argv)],
                  train=counting)
    assert len(fits) == 6


def test_grid_t_fallback_matches_scipy():
    """The grid's t table (used only without scipy) and its large-dof expansion agree with scipy's t quantile."""
    from scipy.stats import t

    grid = driver("grid")
    assert all(abs(v - t.ppf(0.975, dof)) < 1e-3 for dof, v in enumerate(grid.T975, 1))
    z = 1.959964
    assert abs(z + (z ** 3 + z) / (4 * 40) - t.ppf(0.975, 40)) / t.ppf(0.975, 40) < 1e-3
    assert grid.t_quantile(1) == pytest.approx(12.706, abs=1e-3)


def test_small_scale_linear_probe_is_the_protocols():
    """small_scale's linear column is the linear protocol's probe, its flags through the protocol's parser:
    separable features are classified perfectly, and shuffling the test labels costs what it must."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(50)
    feats = torch.eye(4)[labels] * 3 + 0.1 * torch.randn(200, 4, generator=gen)
    opts = argparse.Namespace(seed=0, linear_epochs=5, linear_lr=5.0)  # small_scale's own options, not a protocol's
    probe = driver("small_scale").linear_probe
    assert probe(feats, labels, feats, labels, opts) == 100.0
    assert probe(feats, labels, feats, labels.roll(50), opts) == 0.0


def test_drivers_use_only_public_entry_points():
    """No driver imports a private name of pcl (``_x``) or reaches one by attribute, nor hand-builds the
    arguments of a protocol (``argparse.Namespace(...)`` / ``SimpleNamespace(...)``)."""
    for name in drivers() + sorted(SHARED):
        tree = ast.parse(open(os.path.join(EXPERIMENTS, name)).read(), name)
        pcl_names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pcl":
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{name} imports private {private} from {node.module}"
                pcl_names |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                pcl_names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("pcl")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                assert not (isinstance(root, ast.Name) and root.id in pcl_names), \
                    f"{name}:{node.lineno} reaches the private {node.attr} of pcl"
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                assert called not in ("Namespace", "SimpleNamespace"), \
                    f"{name}:{node.lineno} builds arguments by hand: use the protocol's parser (pcl.config)"


def test_drivers_print_errors_as_one_line_and_never_default_to_the_committed_results():
    """Every driver's ``__main__`` is ``study.cli(main)`` (a PCLError is one line and exit 2, not a traceback:
    WG01, WG03, WG05, WC04, WI01, WI03, WI04), and none names the checkout's experiments/results (``study.RESULTS``)
    as a default output: a driver run without --out writes under exp/results (WG09, WI02)."""
    for name in drivers():
        tree = ast.parse(open(os.path.join(EXPERIMENTS, name)).read(), name)
        blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        assert blocks and ast.unparse(blocks[0].body[0]) == "cli(main)", f"{name}: __main__ must be cli(main)"
        assert "RESULTS" not in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}, \
            f"{name} writes into experiments/results by default: use study.default_out"
    assert driver("study").default_out("x.json") == os.path.join("exp", "results", "x.json")


def test_study_cli_turns_errors_into_one_line(capsys):
    from pcl import PCLError

    study = driver("study")

    def fails():
        raise PCLError("--exp-dir X is in use by another run (pid 1): give another --exp-dir")

    with pytest.raises(SystemExit) as exit_:
        study.cli(fails)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err == "error: --exp-dir X is in use by another run (pid 1): give another " \
                                            "--exp-dir\n"


def test_every_study_driver_has_a_smoke_run():
    tested = {name[len("test_"):] + ".py" for name in globals() if name.startswith("test_")} | SMOKED_ELSEWHERE
    missing = sorted(set(drivers()) - tested)
    assert drivers() and not missing, f"no smoke run for {missing}: add one to tests/test_experiments.py"


def test_grid_train_per_class_writes_a_balanced_subset_and_trains_on_it(tmp_path):
    """--train-per-class N: the first N training images of each class (in the official order) with the whole test
    split as idx files under EXP_ROOT, written once; every run of the grid trains on that folder and expects
    N x classes images."""
    from pcl.data import load_mnist_family

    grid = driver("grid")
    data = fake_mnist(tmp_path / "fm", n_train=200, n_test=60)
    full = load_mnist_family("fashion-mnist", data)
    sub = grid.write_subset("fashion-mnist", data, 5, str(tmp_path / "sub"))
    part = load_mnist_family("fashion-mnist", sub)
    labels = full["train_labels"]
    keep = sorted(int(i) for c in range(10) for i in torch.nonzero(labels == c).flatten()[:5])
    assert torch.equal(part["train"], full["train"][keep]) and torch.equal(part["train_labels"], labels[keep])
    assert torch.equal(part["test"], full["test"]) and torch.equal(part["test_labels"], full["test_labels"])
    stamp = os.path.getmtime(os.path.join(sub, "train-images-idx3-ubyte"))
    assert grid.write_subset("fashion-mnist", data, 5, sub) == sub  # already there: kept as it is
    assert os.path.getmtime(os.path.join(sub, "train-images-idx3-ubyte")) == stamp
    with pytest.raises(SystemExit, match="fewer training images"):
        grid.write_subset("fashion-mnist", data, 10_000, str(tmp_path / "too_many"))

    seen: list[list[str]] = []

    class Trained(Exception):
        """Raised by the fake training call once it has recorded the argv the grid built."""

    def train(argv):
        seen.append(argv)
        raise Trained

    with pytest.raises(Trained):
        grid.main(["--data", data, "--train-per-class", "5", "--variants", "pcl", "--seeds", "0",
                   "--exp-root", str(tmp_path / "exp"), "--out-dir", str(tmp_path / "out"), "--epochs", "2",
                   "--", "--num-cluster", "5,10"],  # k <= the 50 images: a larger k is refused before any run
                  train=train)
    argv = seen[0]
    folder = str(tmp_path / "exp" / "data_5_per_class")
    assert folder in argv and data not in argv and argv[argv.index("--expect-images") + 1] == "50"


def test_grid_drift_curves_and_plot(tmp_path):
    """drift_curves reads each E-step epoch's mean drift over k and the coarsest k's NMI with the labels (a repeated
    epoch: the last entry wins); plot_drift draws the runs that have E-steps and skips MoCo-only ones."""
    pytest.importorskip("matplotlib")
    grid = driver("grid")
    pcl_dir, moco_dir = tmp_path / "pcl", tmp_path / "moco"
    for d, lines in ((pcl_dir, [{"epoch": 0, "loss": 7.0},
                                {"epoch": 1, "nmi_k20": 40.0, "nmi_k10": 30.0},
                                {"epoch": 2, "nmi_k10": 33.0, "drift_nmi_k10": 50.0, "drift_nmi_k20": 70.0},
                                {"epoch": 2, "nmi_k10": 35.0, "drift_nmi_k10": 60.0, "drift_nmi_k20": 80.0}]),
                     (moco_dir, [{"epoch": 0, "loss": 7.0}, {"epoch": 1, "loss": 6.5}])):
        d.mkdir()
        (d / "log.txt").write_text("".join(json.dumps(x) + "\n" for x in lines))
    curves = grid.drift_curves(str(pcl_dir))
    assert curves == {"drift": {2: 70.0}, "labels": {1: 30.0, 2: 35.0}}
    assert grid.drift_curves(str(moco_dir)) == {"drift": {}, "labels": {}}
    out = tmp_path / "drift.png"
    records = {"pcl": {0: {"exp_dir": str(pcl_dir)}}, "moco": {0: {"exp_dir": str(moco_dir)}}}
    assert grid.plot_drift(records, str(out)) == str(out) and out.stat().st_size > 1000
    assert grid.plot_drift({"moco": records["moco"]}, str(tmp_path / "none.png")) is None


def test_digits_nuisance(tmp_path, tiny_checkpoint):
    """The digits folder's nuisances are re-drawn exactly (checked against the saved images); every attribute gets a
    kNN score per encoder; a folder written with other flags is refused."""
    demo = driver("demo_imagefolder")
    data = tmp_path / "data"
    drawn = demo.write_digits(str(data), {"train": 60, "val": 30}, anywhere=True)
    assert set(drawn["val"]) == {"digit", "ink", "ruled", "stray", "paper", "x", "y"}
    assert drawn["train"]["x"].abs().max() <= 0.6 and drawn["train"]["ink"].max() <= 2
    nuisance = driver("digits_nuisance")
    out = tmp_path / "n.json"
    res = nuisance.main([str(data), "--anywhere", "--train-images", "60", "--val-images", "30", "random",
                         tiny_checkpoint, "--out", str(out)])
    assert out.exists() and list(res["knn_top1"]) == ["raw_pixels", "random", tiny_checkpoint]
    assert all(set(row) == set(drawn["val"]) and all(0 <= v <= 100 for v in row.values())
               for row in res["knn_top1"].values())
    with pytest.raises(SystemExit, match="differ from the re-drawn"):  # written --anywhere, read without it
        nuisance.main([str(data), "--train-images", "60", "--val-images", "30", "random", tiny_checkpoint,
                       "--out", str(out)])
