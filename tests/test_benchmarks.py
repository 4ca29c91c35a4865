"""Every speed benchmark in benchmarks/ runs end to end at toy size, in this process, so none can rot unnoticed.

Each run asserts what its JSON must hold (measured numbers, not just "it ran"). gpu_check.py runs through
scripts/gpu_check.sh in test_gpu_ready.py; the last test fails when a script is added to benchmarks/ without a
smoke run anywhere. The study drivers (experiments/) have theirs in test_experiments.py.
"""

import importlib
import json
import os
import sys

import pytest

from conftest import ROOT

BENCH = os.path.join(ROOT, "benchmarks")
SMOKED_ELSEWHERE = {"gpu_check.py", "gpu_check_input.py", "gpu_check_estep.py", "cost_model.py", "cost_inputs.py",
                    "cost_tables.py"}  # cost_*: tests/test_cost_model.py


def script(name: str):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    return importlib.import_module(name)


def read(path) -> dict:
    return json.loads(open(path).read())


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
    low = script("bench_kmeans").main(["--n", "600", "--dim", "8", "--centres", "6", "--ks", "4,12", "--niter", "3",
                                       "--precision", "bf16", "--out", str(out)])
    assert (tmp_path / "k_bf16.json").exists() and [r["k"] for r in low["rows"]] == [4, 12]
    assert all(0.9 < r["objective_ratio_low_over_fp32"] < 1.1 and 0 <= r["nmi_low_vs_fp32"] <= 100 for r in low["rows"])


def test_bench_split(tmp_path):
    out = tmp_path / "split.json"
    res = script("bench_split").main(["--n", "1280", "--k", "100", "--dim", "8", "--repeats", "1",
                                      "--out", str(out)])
    assert out.exists() and [r["empty"] for r in res["rows"]] == [1, 4, 50] and res["points_per_cluster"] == 12.8
    one, _, many = res["rows"]
    assert one["sequential_draws"] == one["batched_draws"] == 1 and many["sequential_draws"] == 50
    assert many["batched_draws"] < 10 and all(r["sequential_s"] > 0 and r["batched_s"] > 0 for r in res["rows"])


def test_bench_warm_kmeans(tmp_path):
    out = tmp_path / "w.json"
    res = script("bench_warm_kmeans").main(["--n", "600", "--dim", "8", "--k", "12", "--centres", "6", "--niter", "3",
                                            "--nredo", "2", "--json", str(out)])
    assert out.exists() and res["cold"]["seconds"] > 0 and res["warm"]["seconds"] > 0
    assert 0 <= res["nmi_warm_cold"] <= 100 and 0.5 < res["objective_ratio"] < 2


def test_bench_estep_modes(tmp_path):
    out = tmp_path / "modes.json"
    res = script("bench_estep_modes").main(["--config", os.path.join(ROOT, "configs", "demo.yaml"), "--epochs", "3",
                                            "--warmup-epoch", "1", "--modes", "pass,bank_warm", "--exp-root",
                                            str(tmp_path / "runs"), "--json", str(out), "--", "--demo-renders", "1",
                                            "--image-size", "16", "--width", "4", "--num-cluster", "10,20,40"])
    assert out.exists() and set(res["modes"]) == {"pass", "bank_warm"}
    assert res["modes"]["pass"]["feature_seconds"] > 0 and res["modes"]["bank_warm"]["feature_seconds"] < 0.05
    assert res["modes"]["bank_warm"]["first_estep_filled"] > 0 and "nmi_warm_cold_k20" in res["modes"]["bank_warm"]


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


def test_every_benchmark_script_has_a_smoke_run():
    scripts = {f for f in os.listdir(BENCH) if f.endswith(".py") and f != "common.py"}
    tested = {name[len("test_"):] + ".py" for name in globals() if name.startswith("test_")} | SMOKED_ELSEWHERE
    assert scripts <= tested, f"no smoke run for {sorted(scripts - tested)}: add one to tests/test_benchmarks.py"
