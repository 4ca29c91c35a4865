"""benchmarks/cost_model.py at toy size, in this process: every path's parts are finite ranges (low <= high), the
loader is each preset's own workers, the bank takes the E-step's feature pass away, a warm start divides the
k-means by nredo (its cold checks apart), the device decode is an explicit input, and the GPU check's JSON (or a
flat one) replaces the published figures, the source column saying so."""

import importlib
import json
import math
import os
import sys
from dataclasses import replace

import pytest

from conftest import ROOT

BENCH = os.path.join(ROOT, "benchmarks")
TOY = ["--pairs", "2", "--rounds", "2"]
PATHS = ("official", "fast", "fast + pass + cold", "fast + bank + cold", "fast + bank + warm")
N = 1_281_167


def module(name: str):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def cm():
    return module("cost_model")


@pytest.fixture(scope="module")
def ci():
    return module("cost_inputs")


def cpu_costs(ci, scale: float = 1.0):
    """Injected CPU seconds (no timing): the PIL pipeline 15 ms a pair, device decode's workers 0.5 ms."""
    return ci.CpuCosts(decode_s=1e-3 * scale, pil_pair_s=15e-3 * scale, augment_pair_s=3.5e-3 * scale,
                       pil_eval_s=3.5e-3 * scale, augment_eval_s=3e-3 * scale, bytes_pair_s=0.5e-3 * scale,
                       bytes_image_s=0.1e-3 * scale)


def published(ci):
    return ci.published_gpu("h100", 16384, 128, 3, 0.5)


def source_of(table: str, label: str) -> str:
    return next(line.rstrip("|").split("|")[-1] for line in table.splitlines() if line.startswith(f"| {label}"))


def test_main_projects_every_path_as_a_range(cm, tmp_path):
    out = tmp_path / "cost.json"
    res = cm.main([*TOY, "--json", str(out)])
    assert json.loads(out.read_text())["hours"] == res["hours"]
    assert list(res["hours"]) == list(PATHS) and list(res["hours_decode_2x"]) == list(PATHS[1:])
    for name, rows in res["hours"].items():
        for key, (low, high) in rows.items():
            assert math.isfinite(low) and low <= high, (name, key, low, high)
        assert rows["pcl_total"][0] > rows["moco_total"][0] > 0, name
    assert res["paths"]["official"]["loader_cores"] == 32 and res["paths"]["fast"]["loader"] == "decode"
    parts = res["tables"]["parts"]
    assert source_of(parts, "M-step input").strip().startswith("measured here")
    assert source_of(parts, "M-step GPU, MoCo v2").strip().startswith("published, not measured")
    assert source_of(parts, "M-step GPU: device decode").strip().startswith("assumed, not measured")
    assert "0.10 ms of the training GPU per image" in parts
    assert all("published and assumed GPU figures" in v for v in res["verdicts"].values())
    cpu = res["cpu_measured_here"]
    assert len(cpu["rounds"]) == 2 and all(cpu["low"][k] <= cpu["high"][k] for k in cpu["low"])
    assert 0 < cpu["low"]["bytes_image_s"] < cpu["low"]["pil_eval_s"]  # bytes + header only: no decode


def test_the_presets_own_workers_are_the_loader(cm, ci, tmp_path):
    paths = {p.name: p for p in cm.build_paths()}
    node = cm.Node(8, 14, 1, N)
    assert {p.workers for p in paths.values()} == {32} and node.loader_cores(paths["fast"]) == 32  # not 8 x 13
    assert {p.loader for p in paths.values()} == {"pil", "decode"} and paths["fast"].amp == "bf16"
    yaml = tmp_path / "fast.yaml"
    yaml.write_text(open(cm.PRESETS["fast"]).read().replace("workers: 32", "workers: 48"))
    mine = cm.read_preset("fast", str(yaml))
    assert mine.workers == 48 and node.loader_cores(mine) == 48
    assert node.loader_cores(replace(mine, workers=500)) == 8 * 13  # capped at the node's cores
    assert {p.workers for p in cm.build_paths(workers=96)} == {96}  # the what-if flag
    cpu, gpu = cpu_costs(ci), published(ci)
    at32 = cm.project(cpu, gpu, paths["official"], node)["mstep_input"]
    at96 = cm.project(cpu, gpu, replace(paths["official"], workers=96), node)["mstep_input"]
    assert at32 == pytest.approx(3 * at96) and at32 == pytest.approx(200 * N * 15e-3 / 32 / 3600)


def test_the_bank_takes_the_feature_pass_away(cm, ci):
    paths = {p.name: p for p in cm.build_paths()}
    node, cpu, gpu = cm.Node(8, 14, 1, N), cpu_costs(ci), published(ci)
    with_pass = cm.project(cpu, gpu, paths["fast + pass + cold"], node)
    bank = cm.project(cpu, gpu, paths["fast + bank + cold"], node)
    assert with_pass["estep_features"] > 0.5 and bank["estep_features"] == 0.0
    assert bank["estep_kmeans"] == with_pass["estep_kmeans"] and 0 < bank["bank_upkeep"] < 0.05
    fresh = cm.project(cpu, gpu, replace(paths["fast + bank + cold"], warmup=0), node)  # nothing written yet
    one_pass = cm.project(cpu, gpu, replace(paths["fast + pass + cold"], warmup=0), node)["estep_features"] / 200
    assert fresh["estep_features"] == pytest.approx(one_pass)


def test_a_warm_start_divides_the_kmeans_by_nredo(cm, ci):
    paths = {p.name: p for p in cm.build_paths()}
    node, cpu, gpu = cm.Node(8, 14, 1, N), cpu_costs(ci), published(ci)
    cold, warm = paths["fast + bank + cold"], paths["fast + bank + warm"]
    assert warm.warm_check == 10 and cm.kmeans_runs(cold) == (180, 0)
    assert cm.kmeans_runs(warm) == (18, 179)  # the first E-step, then epochs 30, 40, ..., 190 check a cold run
    hours = {name: cm.project(cpu, gpu, p, node)["estep_kmeans"] for name, p in
             (("cold", cold), ("warm", warm), ("nocheck", replace(warm, warm_check=0)))}
    assert cm.kmeans_runs(replace(warm, warm_check=0)) == (1, 179)
    assert hours["nocheck"] == pytest.approx(hours["cold"] * (5 + 179) / (180 * 5), rel=1e-9)
    assert hours["warm"] == pytest.approx(hours["cold"] * (18 * 5 + 179) / (180 * 5), rel=1e-9)


def test_range_low_is_at_most_high(cm, ci):
    measured = ci.measure_cpu(pairs=2, rounds=2)
    for name in ci.CpuCosts.__dataclass_fields__:
        assert 0 < getattr(measured.low, name) <= getattr(measured.high, name)
    spread = ci.CpuRange(cpu_costs(ci), cpu_costs(ci, 1.5), [], 0)
    hours = cm.project_range(spread, published(ci), cm.build_paths(), cm.Node(8, 14, 1, N))
    official = hours["official"]
    assert official["pcl_total"][0] < official["pcl_total"][1]  # loader-bound: the CPU spread shows
    assert all(low <= high for rows in hours.values() for low, high in rows.values())


def test_the_device_decode_is_an_explicit_input(cm, ci):
    paths = {p.name: p for p in cm.build_paths()}
    node, cpu, gpu = cm.Node(8, 14, 1, N), cpu_costs(ci), published(ci)
    assert gpu.decode_s == pytest.approx(1e-4) and gpu.decode_source.startswith("assumed, not measured")
    slow = replace(gpu, decode_s=2 * gpu.decode_s)
    for name, path in paths.items():
        a, b = cm.project(cpu, gpu, path, node), cm.project(cpu, slow, path, node)
        if name == "official":  # the PIL loader: no device decode
            assert a == b
        else:  # each training image once per epoch, and each E-step image of a feature pass
            images = 200 * N + (180 * N if path.features == "pass" else 0)
            extra = images / 8 * gpu.decode_s / 3600
            assert b["pcl_total"] - a["pcl_total"] == pytest.approx(extra, rel=1e-6)
    warm = paths["fast + bank + warm"]
    at = cm.decode_for_goal(cpu, gpu, warm, node, 4.0)  # the decode figure at which the total is 4 h
    assert 0 < at < gpu.decode_s
    assert cm.project(cpu, replace(gpu, decode_s=at), warm, node)["pcl_total"] == pytest.approx(4.0, abs=1e-6)
    assert cm.decode_for_goal(cpu, gpu, paths["fast + pass + cold"], node, 4.0) is None  # over 4 h at 0 ms


def gpu_check_json(tmp_path, **extra_sections) -> str:
    """A small hand-made file in gpu_check.py's format (the sections cost_model reads)."""
    sections = {
        "throughput": {"images_per_s": {"fp32": 600.0, "bf16+channels_last": 1800.0, "bn_splits8": 550.0,
                                        "bf16+channels_last+bn_splits8": 1600.0}, "fast_variant": "bf16+channels_last"},
        "overhead": {"overhead_pct": 3.0},
        "kmeans": {"backend": "torch", "n": N, "seconds_nredo1": {"25000": 10.0, "50000": 20.0, "100000": 40.0},
                   "kmeans_tflops": 16.4},
        "kmeans_ranks": {"backend": "torch-ranks", "kmeans_tflops": 15.0},
        "estep": {"images_per_s": {"fp32": 2500.0, "bf16": 7000.0}},
        "device_aug": {"device_images_per_s": 40000.0},
        "fast_path": {"train": {"images_per_s": 1000.0, "input_wait": 0.2}},
        "faiss": {"error": "RuntimeError: no GPU", "ok": False},
        **extra_sections}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps({"hardware": "x86_64, 16 cores, torch 2.x, NVIDIA H100 80GB HBM3", "device": "cuda",
                                "sizes": {"arch": "resnet50", "image_size": 224}, "sections": sections}))
    return str(path)


def test_reads_the_gpu_check_json(ci, tmp_path):
    gpu = ci.gpu_from_json(gpu_check_json(tmp_path), published(ci))
    assert gpu.moco_pairs_per_s == {"fp32": 600.0, "amp": 1800.0} and gpu.pcl_overhead == pytest.approx(0.03)
    assert gpu.forward_images_per_s == {"fp32": 2500.0, "amp": 7000.0}
    assert gpu.kmeans_flops_per_s == {"one_gpu": pytest.approx(16.4e12), "ranks": pytest.approx(15e12)}
    assert gpu.augment_s == pytest.approx(2 / 40000.0)  # two crops at device_aug's images/s
    busy = (1 - 0.2) / 1000.0 - 1 / 1600.0  # the decode loader's step, waits left out, over the same step from memory
    assert gpu.decode_s == pytest.approx(busy - 2 / 40000.0)
    for source in (gpu.step_source, gpu.forward_source, gpu.overhead_source, gpu.decode_source, gpu.augment_source,
                   *gpu.kmeans_source.values()):
        assert source.startswith("measured on GPU (NVIDIA H100 80GB HBM3"), source
    assert "kmeans_ranks" in gpu.kmeans_source["ranks"] and "estep" in gpu.forward_source
    # a failed or missing section keeps the fallback's figure and source
    partial = ci.gpu_from_json(gpu_check_json(tmp_path, estep={"error": "x", "ok": False}, fast_path={}), published(ci))
    assert partial.forward_source.startswith("derived") and partial.forward_images_per_s["amp"] == 4 * 1800.0
    assert partial.decode_source.startswith("assumed, not measured") and partial.decode_s == pytest.approx(1e-4)


def test_gpu_json_reaches_the_tables(cm, tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"gpu": "Test GPU", "moco_pairs_per_s_fp32": 500.0, "moco_pairs_per_s_fast": 1500.0,
                                "pcl_overhead_pct": 2.0, "kmeans_tflops": 20.0}))
    res = cm.main([*TOY, "--gpus", "4", "--epochs", "10", "--warmup", "2", "--gpu-json", str(flat),
                   "--gpu-decode-ms", "0.3"])
    gpu = res["gpu"]
    assert gpu["moco_pairs_per_s"] == {"fp32": 500.0, "amp": 1500.0} and gpu["pcl_overhead"] == 0.02
    assert gpu["kmeans_flops_per_s"] == {"one_gpu": 20e12, "ranks": 20e12} and gpu["decode_s"] == pytest.approx(3e-4)
    assert gpu["decode_source"] == "given (--gpu-decode-ms)" and "Test GPU" in res["tables"]["parts"]
    assert source_of(res["tables"]["parts"], "M-step GPU, MoCo v2").strip().startswith("measured on GPU")
    assert res["paths"]["fast + bank + warm"]["kmeans_runs"] == [1, 7]
    assert cm.main([*TOY, "--epochs", "30", "--kmeans-warm-check", "5"])["paths"]["fast + bank + warm"][
        "kmeans_runs"] == [1 + 1, 9]  # epochs 20..29: cold at 20, warm 21..29, a cold check at 25
    full = cm.main([*TOY, "--gpu-json", gpu_check_json(tmp_path)])
    assert full["gpu"]["decode_source"].startswith("measured on GPU") and "(on published" not in "".join(
        full["verdicts"].values())
