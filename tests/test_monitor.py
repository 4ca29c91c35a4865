"""pcl.monitor: what pretraining observes (timings, cluster statistics, the input-bound warning)."""

import re
import time

import torch

from pcl.cluster import ClusterResult
from pcl.data import PretrainData
from pcl.estep import EStep
from pcl.log import InputClock, RunLog
from pcl.monitor import Monitor, knn_report
from pcl.preemption import StopRequest
from pcl.settings import MonitorSettings


def _monitor(tmp_path, **changes):
    settings = dict(num_cluster=(2, 3), epochs=3, seed=0, prototype_gallery=False, knn_every=0, knn_eval=False,
                    knn_k=5, knn_t=0.1, knn_budget_bytes=1 << 20, image_size=8, kmeans_backend="torch")
    settings.update(changes)
    return Monitor(MonitorSettings(**settings), RunLog(str(tmp_path), tensorboard=False),
                   PretrainData(None, None, 6), torch.device("cpu"), StopRequest())


def _slow_batches(n, seconds):
    for i in range(n):
        time.sleep(seconds)
        yield i


def test_input_clock_measures_the_share_of_time_spent_waiting_for_batches():
    waiting = InputClock()
    for _ in waiting.timed(_slow_batches(5, 0.04)):
        time.sleep(0.005)
    computing = InputClock()
    for _ in computing.timed(range(5)):
        time.sleep(0.04)
    assert waiting.batches == 5 and waiting.stats()["input_wait"] > 0.6
    assert computing.stats()["input_wait"] < 0.1


def test_an_input_bound_first_epoch_warns_once_with_the_fix(tmp_path, pcl_warnings):
    monitor = _monitor(tmp_path)
    monitor.epoch_end(0, None, None, {"loss": 1.0, "input_wait": 0.7}, 0.1)
    monitor.epoch_end(1, None, None, {"loss": 1.0, "input_wait": 0.9}, 0.1)  # said once: not again
    assert len(pcl_warnings) == 1 and "waited 70% of epoch 0" in pcl_warnings[0] and "--workers" in pcl_warnings[0]
    _monitor(tmp_path).epoch_end(0, None, None, {"loss": 1.0, "input_wait": 0.1}, 0.1)
    assert len(pcl_warnings) == 1  # a model-bound epoch warns nothing


def test_an_e_step_is_noted_its_features_dropped_and_its_timings_logged_with_the_epoch(tmp_path):
    clusters = ClusterResult([torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([0, 1, 2, 0, 1, 2])],
                             [torch.eye(2, 4), torch.eye(3, 4)], [torch.full((2,), 0.1), torch.full((3,), 0.1)])
    estep = EStep(clusters, torch.randn(6, 4), 0.5, [0.25, 0.75], 1.5)
    monitor = _monitor(tmp_path)
    assert monitor.e_step(4, estep) is clusters and estep.features is None
    stats = monitor.epoch_end(4, None, clusters, {"loss": 2.0}, 0.05)
    assert stats["estep_seconds"] == 1.5 and stats["kmeans_seconds_k2"] == 0.25 and stats["kmeans_seconds_k3"] == 0.75
    assert stats["epoch"] == 4 and stats["lr"] == 0.05 and stats["loss"] == 2.0 and stats["seconds"] >= 0
    assert monitor.final_report(None, lambda: None) == {}  # no --knn-eval


def test_a_resumed_run_marks_its_restart_in_log_txt_and_ends_with_where_its_weights_are(tmp_path, monkeypatch):
    import json

    import pcl.engine
    from conftest import tiny_args
    from pcl.engine import fit

    purges = []

    class Recorded(RunLog):
        def __init__(self, exp_dir, tensorboard=True, purge_step=None, **sinks):
            purges.append(purge_step)
            super().__init__(exp_dir, tensorboard, purge_step, **sinks)

    monkeypatch.setattr(pcl.engine, "RunLog", Recorded)
    fit(tiny_args(tmp_path, "--epochs", "1", "--warmup-epoch", "5"))
    fit(tiny_args(tmp_path, "--epochs", "2", "--warmup-epoch", "5", "--resume", "auto"))
    assert purges == [None, 1]  # TensorBoard continues the curve at the resumed epoch instead of overlaying it
    lines = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert "resumed_from" not in lines[0] and lines[1]["resumed_from"].endswith("checkpoint_0000.pth.tar")
    last = [m for m in (tmp_path / "train.log").read_text().splitlines() if "] finished" in m]
    assert len(last) == 2 and "checkpoint_0001.pth.tar holds the weights after epoch 1" in last[1]
    assert "python eval_linear.py --dataset demo --demo-renders 1 --image-size 16 --pretrained" in last[1]


def test_prototype_drift_is_the_nmi_between_consecutive_e_steps(tmp_path):
    def estep(first, second):
        clusters = ClusterResult([first, second], [torch.eye(2, 4), torch.eye(3, 4)],
                                 [torch.full((2,), 0.1), torch.full((3,), 0.1)])
        return EStep(clusters, None, 0.1, [0.0, 0.0], 0.1)

    a = torch.tensor([0, 0, 0, 1, 1, 1])
    b = torch.tensor([0, 1, 2, 0, 1, 2])
    monitor = _monitor(tmp_path)
    monitor.e_step(1, estep(a, b))
    assert not any(k.startswith("drift") for k in monitor.estep)  # the first E-step of a run has nothing to compare
    monitor.e_step(2, estep(1 - a, b))  # the same partition, renamed: it did not move
    assert monitor.estep["drift_nmi_k2"] == 100.0 and monitor.estep["drift_nmi_k3"] == 100.0
    monitor.e_step(3, estep(a, torch.tensor([0, 0, 1, 1, 2, 2])))
    assert monitor.estep["drift_nmi_k2"] == 100.0 and monitor.estep["drift_nmi_k3"] < 50
    stats = monitor.epoch_end(3, None, estep(a, b).clusters, {"loss": 1.0}, 0.1)
    assert stats["drift_nmi_k3"] == monitor.estep["drift_nmi_k3"]  # in log.txt and TensorBoard with the epoch


def test_an_e_step_that_puts_every_sample_in_one_cluster_says_the_features_collapsed(tmp_path, pcl_warnings):
    """NK03: 20 identical images gave 'k=2 (largest 20, 1 empty)' and nothing else."""
    clusters = ClusterResult([torch.zeros(6, dtype=torch.long), torch.tensor([0, 1, 2, 0, 1, 2])],
                             [torch.eye(2, 4), torch.eye(3, 4)], [torch.full((2,), 0.1), torch.full((3,), 0.1)])
    _monitor(tmp_path).e_step(1, EStep(clusters, None, 0.1, [0.0, 0.0], 0.1))
    assert pcl_warnings == ["E-step epoch 1: k=2 put every sample in one cluster: the features have collapsed "
                            "(identical images, or an encoder that maps every image to one point); the prototypes "
                            "carry no signal"]


def test_a_knn_k_above_the_monitor_bank_warns_and_votes_with_every_image(tmp_path, pcl_warnings):
    """NK14 in pretraining: --knn-k 200 with 6 training images votes with all 6; say so (the report logs k = 6)."""
    images = torch.rand(6, 3, 8, 8)
    bank = [(images, torch.arange(6))]
    test = [(images[:4], torch.arange(4))]
    knn = (bank, torch.tensor([0, 1, 0, 1, 0, 1]), test, torch.tensor([0, 1, 0, 1]))
    settings = dict(num_cluster=(2, 3), epochs=3, seed=0, prototype_gallery=False, knn_every=0, knn_eval=True,
                    knn_k=200, knn_t=0.1, knn_budget_bytes=1 << 20, image_size=8, kmeans_backend="torch")
    Monitor(MonitorSettings(**settings), RunLog(str(tmp_path), tensorboard=False),
            PretrainData(None, None, 6, knn=knn), torch.device("cpu"), StopRequest())
    assert len(pcl_warnings) == 1 and "--knn-k 200" in pcl_warnings[0] and "6 training images" in pcl_warnings[0]
    report = knn_report({"raw_pixels": None}, knn, torch.device("cpu"), k=200, temperature=0.1,
                        budget_bytes=1 << 20, image_size=8)
    assert report == {"raw_pixels": 100.0}  # the 4 test images are bank images 0-3: all 6 vote, the exact match wins
    _monitor(tmp_path, knn_k=5)  # no kNN set: nothing to warn about
    assert len(pcl_warnings) == 1


def test_a_bank_cut_to_the_budget_logs_the_k_that_voted(pcl_lines):
    """NK14 with a budget-cut bank: --knn-k 40 against a learned bank cut to every 2nd of 60 images votes with 30;
    the report and the cut's line say so, per encoder where the banks differ."""
    class Flat(torch.nn.Module):
        feature_dim = 4

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, 4)

        def forward(self, x):
            return self.fc(x.flatten(1))

    images = torch.rand(60, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(60) % 3
    knn = ([(images, labels)], labels, [(images[:12], labels[:12])], labels[:12])
    report = knn_report({"learned": Flat(), "raw_pixels": None}, knn, torch.device("cpu"), k=40, temperature=0.1,
                        budget_bytes=1000, image_size=8)
    assert set(report) == {"learned", "raw_pixels"}
    assert any("one training image in 2 in the bank" in r and "its 30 images are fewer than --knn-k 40" in r
               for r in pcl_lines)
    line = next(r for r in pcl_lines if r.startswith("kNN top-1"))
    assert re.search(r"learned [\d.]+% \(k=30\)", line) and re.search(r"raw_pixels [\d.]+% \(k=40\)", line)
    assert "k=40, T" not in line
