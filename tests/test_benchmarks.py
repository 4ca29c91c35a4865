"""Every benchmark script runs end to end at toy size, in this process, so none can rot unnoticed.

Each run asserts what its JSON must hold (measured numbers, not just "it ran"). gpu_check.py runs through
scripts/gpu_check.sh in test_gpu_ready.py, small_scale.py in test_mnist_family.py; the last test fails when a
script is added to benchmarks/ without a smoke run anywhere.
"""

import importlib
import json
import os
import sys

import pytest

from conftest import ROOT, fake_mnist, tiny_argv

BENCH = os.path.join(ROOT, "benchmarks")
SMOKED_ELSEWHERE = {"gpu_check.py", "small_scale.py"}
TINY_PRETRAIN = ["--demo-renders", "1", "--image-size", "16", "-a", "resnet18", "--width", "4", "--stem", "small",
                 "-b", "64", "--pcl-r", "256", "--num-cluster", "10,20", "--kmeans-nredo", "1", "--kmeans-niter", "5",
                 "--workers", "0", "--no-progress"]


def script(name: str):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    return importlib.import_module(name)


def read(path) -> dict:
    return json.loads(open(path).read())


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from pcl.config import build_pretrain_parser, parse_args
    from pcl.engine import fit

    exp = tmp_path_factory.mktemp("bench_ckpt")
    fit(parse_args(build_pretrain_parser(), tiny_argv(exp, "--epochs", "1", "--warmup-epoch", "0")))
    return str(exp / "checkpoint_last.pth.tar")


def test_bench_estep(tmp_path):
    out = tmp_path / "e.json"
    script("bench_estep").main(["--n", "300", "--ks", "5,10", "--dim", "16", "--centres", "20", "--niter", "3",
                                "--nredo", "1", "--device", "cpu", "--out", str(out)])
    res = read(out)
    assert res["feature_pass_s"] > 0 and len(res["kmeans_s"]) == 2 and max(res["phi_max_abs_diff"]) < 1e-4


def test_bench_estep_math(tmp_path):
    out = tmp_path / "m.json"
    script("bench_estep_math").main(["--n", "3000", "--ks", "400,800", "--r", "32", "--repeats-original", "1",
                                     "--repeats-ours", "1", "--out", str(out)])
    res = read(out)
    assert len(res["phi"]) == 2 and all(r["max_abs_diff"] < 1e-5 for r in res["phi"])
    assert len(res["sampling"]) == 4 and res["goals"]["step_speedup_min"] > 0


def test_bench_kmeans(tmp_path):
    out = tmp_path / "k.json"
    res = script("bench_kmeans").main(["--n", "600", "--dim", "8", "--centres", "6", "--ks", "4,12", "--niter", "3",
                                       "--out", str(out)])
    assert out.exists() and res["rows"] and all(r["objective_ratio_torch_over_faiss"] > 0 for r in res["rows"])


@pytest.mark.parametrize("mode, extra", [("overhead", []), ("throughput", ["--variants", "fp32,fused_sgd"])])
def test_bench_step(tmp_path, mode, extra):
    out = tmp_path / "s.json"
    res = script("bench_step").main(["--mode", mode, "--width", "4", "--batch", "16", "--bn-splits", "2", "--r", "64",
                                     "--ks", "10,20", "--n", "500", "--steps", "1", "--rounds", "1",
                                     "--device", "cpu", "--out", str(out), *extra])
    assert out.exists() and "hardware" in res
    if mode == "overhead":
        assert res["moco_step_s"] > 0 and res["pcl_step_s"] > 0
    else:
        assert set(res["images_per_s"]) == {"fp32", "fused_sgd"} and res["images_per_s"]["fp32"] > 0


def test_demo_diagnosis(tmp_path, tiny_checkpoint):
    out = tmp_path / "d.json"
    res = script("demo_diagnosis").main([tiny_checkpoint, "--num-cluster", "10", "--image-size", "16",
                                         "--demo-renders", "1", "--out", str(out)])
    assert out.exists() and set(res[0]["cluster_ami"][10]) >= {"digit"} and 0 <= res[0]["knn_top1"]["digit"] <= 100


def test_demo_imagefolder(tmp_path):
    data = fake_mnist(tmp_path / "fm", n_train=60, n_test=20)
    out = tmp_path / "f.json"
    res = script("demo_imagefolder").main(["--idx-dir", data, "--out-dir", str(tmp_path / "run"), "--train-per-class",
                                           "4", "--val-per-class", "2", "--json", str(out), "--",
                                           "--epochs", "1", "--warmup-epoch", "0", *TINY_PRETRAIN, "-b", "16",
                                           "--pcl-r", "32", "--num-cluster", "3,4", "--bn-splits", "2"])
    assert out.exists() and set(res["knn"]) == {"learned", "random_init", "raw_pixels"}


def test_learning_demo(tmp_path):
    out = tmp_path / "l.json"
    res = script("learning_demo").main(["--epochs", "2", "--warmup-epoch", "1", "--knn-every", "1", "--out", str(out),
                                        "--exp-root", str(tmp_path / "exp"), "--", *TINY_PRETRAIN])
    assert [r["name"] for r in res["results"]] == ["PCL", "MoCo only"]
    assert all(len(r["curve"]) == 2 and 0 <= r["final"]["learned"] <= 100 for r in res["results"])


def test_linear_demo(tmp_path, tiny_checkpoint):
    out = tmp_path / "lin.json"
    res = script("linear_demo").main(["--pretrained", tiny_checkpoint, "--views", "1", "--out", str(out),
                                      "--exp-root", str(tmp_path / "exp"), "--", "--epochs", "1", "--image-size", "16",
                                      "--demo-renders", "1", "--workers", "0"])
    assert len(res["results"]) == 3 and all(0 <= r["top1"] <= 100 and r["seconds"] > 0 for r in res["results"])


def test_pauc_ablation(tmp_path):
    out = tmp_path / "p.json"
    res = script("pauc_ablation").main(["--epochs", "2", "--warmup-epoch", "1", "--rows", "PCL,PAUC (all three)",
                                        "--out", str(out), "--exp-root", str(tmp_path / "exp"), "--", *TINY_PRETRAIN])
    assert [r["name"] for r in res["rows"]] == ["PCL", "PAUC (all three)"]
    assert all(set(r["spread"]) == {10, 20} or "failed" in r for r in res["rows"])


def test_every_benchmark_script_has_a_smoke_run():
    scripts = {f for f in os.listdir(BENCH) if f.endswith(".py") and f != "common.py"}
    tested = {name[len("test_"):] + ".py" for name in globals() if name.startswith("test_")} | SMOKED_ELSEWHERE
    assert scripts <= tested, f"no smoke run for {sorted(scripts - tested)}: add one to tests/test_benchmarks.py"
