"""benchmarks/cost_model.py at toy size, in this process: the projection table has every part, its hours are
positive and finite, the fast path is no slower than the official one on the same inputs, and a GPU JSON (flat, or
gpu_check.py's own) replaces the published figures, the source column saying so."""

import importlib
import json
import math
import os
import sys

from conftest import ROOT

BENCH = os.path.join(ROOT, "benchmarks")
PARTS = ("M-step input pipeline", "M-step GPU steps, MoCo v2", "M-step GPU steps, PCL", "M-step wall",
         "E-step features, CPU eval loader", "E-step features, GPU forward", "E-step features wall",
         "E-step k-means", "E-step total", "PCL v2, ", "MoCo v2, ", "PCL overhead over MoCo v2",
         "E-step share of PCL")
TOY = ["--pairs", "3", "--rounds", "1"]


def cost_model():
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    return importlib.import_module("cost_model")


def rows_of(table: str) -> dict[str, str]:
    """Table row label -> its source cell."""
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[0] not in ("part", "---"):
            out[cells[0]] = cells[3]
    return out


def source_of(table: str, part: str) -> str:
    return next(source for label, source in rows_of(table).items() if label.startswith(part) or
                label.strip("*").startswith(part))


def check_projection(res: dict) -> None:
    labels = list(rows_of(res["table"]))
    for part in PARTS:
        assert any(label.strip("*").startswith(part) for label in labels), f"no row for {part!r} in\n{res['table']}"
    for key, row in res["hours"].items():
        for path, value in row.items():
            assert math.isfinite(value), (key, path, value)
            if not key.endswith("_pct"):
                assert value > 0, (key, path, value)
                assert row["fast"] <= row["official"] * (1 + 1e-9), f"fast path slower for {key}: {row}"
    cpu = res["cpu_measured_here"]
    assert 0 < cpu["fast_pair_s"] < cpu["official_pair_s"] and 0 < cpu["fast_eval_s"] <= cpu["official_eval_s"]


def test_published_figures(tmp_path):
    out = tmp_path / "cost.json"
    res = cost_model().main([*TOY, "--json", str(out)])
    check_projection(res)
    assert json.loads(out.read_text())["hours"] == res["hours"]
    assert source_of(res["table"], "M-step GPU steps, MoCo v2").startswith("published, not measured")
    assert source_of(res["table"], "E-step k-means").startswith("published, not measured")
    assert source_of(res["table"], "M-step input pipeline").startswith("measured here")


def test_gpu_json_overrides_published(tmp_path):
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"gpu": "Test GPU", "moco_pairs_per_s_fp32": 500.0, "moco_pairs_per_s_fast": 1500.0,
                               "pcl_overhead_pct": 2.0, "kmeans_tflops": 20.0}))
    res = cost_model().main([*TOY, "--gpus", "4", "--cores-per-gpu", "6", "--epochs", "10", "--warmup", "2",
                             "--gpu-json", str(gpu)])
    check_projection(res)
    assert res["gpu"]["moco_pairs_per_s"] == {"official": 500.0, "fast": 1500.0}
    assert res["gpu"]["kmeans_flops_per_s"] == 20e12 and res["gpu"]["pcl_overhead"] == 0.02
    for part in ("M-step GPU steps, MoCo v2", "M-step GPU steps, PCL", "E-step k-means"):
        source = source_of(res["table"], part)
        assert source.startswith("measured on GPU") and "published, not measured [" not in source.split(";")[0]
    assert "Test GPU" in res["table"] and res["model"]["esteps"] == 8


def test_reads_gpu_check_json(tmp_path):
    """gpu_check.py's own output: fp32 and its fast variant, the PCL overhead, k-means seconds -> FLOP/s."""
    cm = cost_model()
    seconds = {"25000": 10.0, "50000": 20.0, "100000": 40.0}
    check = {"hardware": "x86_64, 16 cores, 16 threads, torch 2.x, NVIDIA H200", "device": "cuda",
             "sizes": {"arch": "resnet50", "image_size": 224},
             "sections": {"throughput": {"images_per_s": {"fp32": 600.0, "bf16+channels_last": 1800.0},
                                         "fast_variant": "bf16+channels_last"},
                          "overhead": {"overhead_pct": 3.0},
                          "kmeans": {"n": 1_281_167, "seconds_nredo1": seconds}}}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(check))
    fallback = cm.published_gpu("h100", 16384, 128, 3, 0.5)
    gpu = cm.gpu_from_json(str(path), fallback)
    assert gpu.moco_pairs_per_s == {"official": 600.0, "fast": 1800.0} and abs(gpu.pcl_overhead - 0.03) < 1e-12
    flops = cm.kmeans_flops(1_281_167, [25000, 50000, 100000], 128, 20, 1)
    assert abs(gpu.kmeans_flops_per_s - flops / 70.0) < 1e-3 * gpu.kmeans_flops_per_s
    assert "NVIDIA H200" in gpu.step_source and gpu.kmeans_source == gpu.step_source
    # one GPU: the fast path's k-means is the official one (no split, no all-reduce)
    cpu = cm.CpuCosts(0.02, 0.005, 0.004, 0.003, 0.001, 1, 1)
    proj = cm.project(cpu, gpu, 1, 8, 1, 200, 20, 1_281_167, [25000, 50000, 100000], 128, 20, 5)
    assert proj["rows"]["estep_kmeans"]["fast"] == proj["rows"]["estep_kmeans"]["official"]
    assert abs(proj["rows"]["estep_kmeans"]["official"] - 180 * 5 * 70.0 / 3600) < 1e-6
