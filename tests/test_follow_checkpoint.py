"""Evaluations follow the checkpoint: the image size and architecture it was trained with are the defaults, a given
image size that differs is one warning naming both, and the end-of-run "Next:" commands run as printed."""

import os
import shlex

import pytest

from conftest import official_checkpoint
from pcl import PCLError
from pcl.config import build_linear_parser, build_svm_parser, parse_args
from pcl.evaluation import cluster_metrics, common, knn, linear, semisup, svm, visualize
from pcl.evaluation.common import follow_checkpoint


class Reached(Exception):
    """Raised where an evaluation first builds its data: carries the settings it builds them with."""


def stop_at(module, name, pick=lambda *a, **k: a[0]):
    def catch(*args, **kwargs):
        raise Reached(pick(*args, **kwargs))

    return module, name, catch


COMMANDS = {  # command: (parser, entry point, where it builds its data)
    "knn": (knn.build_parser, knn.run, stop_at(knn, "labelled_features")),
    "cluster_metrics": (cluster_metrics.build_parser, cluster_metrics.run,
                        stop_at(cluster_metrics, "labelled_features")),
    "linear": (build_linear_parser, linear.fit_linear, stop_at(linear, "build_labelled_data")),
    "semisup": (semisup.build_parser, semisup.fit_semisup, stop_at(semisup, "build_labelled_data")),
    "svm": (build_svm_parser, svm.run_svm, stop_at(svm, "svm_sets")),
    "visualize": (visualize.build_parser, visualize.run, stop_at(visualize, "load_splits")),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_evaluation_takes_the_image_size_and_architecture_of_the_checkpoint(command, tiny_checkpoint, tmp_path,
                                                                                 monkeypatch, pcl_warnings):
    """The tiny run was trained at 16 px with a width-4 small-stem ResNet-18: no flag says so here."""
    build, entry, (module, name, catch) = COMMANDS[command]
    monkeypatch.setattr(module, name, catch)
    loaded = []
    load = common.ckpt_io.load_backbone
    monkeypatch.setattr(common.ckpt_io, "load_backbone", lambda path, arch=None, **kw: loaded.append((arch, kw)) or
                        load(path, arch, **kw))
    argv = ["--dataset", "demo", "--pretrained", tiny_checkpoint, "--exp-dir", str(tmp_path / "e"), "--workers", "0"]
    args = parse_args(build(), argv)
    assert args.image_size is None and args.arch is None and args.width is None  # "not given" is seen as such
    with pytest.raises(Reached) as reached:
        entry(args)
    settings = reached.value.args[0]  # the run's settings, or the data settings built from them
    assert settings.image_size == 16
    if hasattr(settings, "arch"):
        assert (settings.arch, settings.width, settings.stem) == ("resnet18", 4, "small")
    else:  # the backbone was built before the data, with the checkpoint's architecture
        assert loaded == [("resnet18", {"width": 4, "stem": "small"})]
    assert not pcl_warnings


def test_a_given_image_size_wins_with_one_warning_naming_both(tiny_checkpoint, pcl_warnings):
    args = parse_args(knn.build_parser(), ["--dataset", "demo", "--pretrained", tiny_checkpoint, "--image-size", "24"])
    assert follow_checkpoint(args).image_size == 24
    assert len(pcl_warnings) == 1 and "--image-size 24" in pcl_warnings[0] and "16 px" in pcl_warnings[0]


def test_a_given_architecture_that_differs_names_what_the_checkpoint_was_trained_with(tiny_checkpoint):
    args = parse_args(knn.build_parser(), ["--dataset", "demo", "--pretrained", tiny_checkpoint, "--width", "8"])
    with pytest.raises(PCLError, match=r"--width 8\): it was trained with -a resnet18 --width 4 --stem small"):
        follow_checkpoint(args)


def test_official_checkpoints_and_random_init_default_to_224_px_resnet50(tmp_path):
    official_checkpoint(tmp_path / "v1.pth.tar", arch="resnet18")
    official = follow_checkpoint(parse_args(knn.build_parser(), ["--pretrained", str(tmp_path / "v1.pth.tar")]))
    assert (official.image_size, official.arch, official.width, official.stem) == (224, "resnet18", 64, "standard")
    random = follow_checkpoint(parse_args(knn.build_parser(), []))
    assert (random.image_size, random.arch, random.width, random.stem) == (224, "resnet50", 64, "standard")


def test_knn_of_a_small_checkpoint_without_image_size_is_the_number_at_its_own_size(tiny_checkpoint, tmp_path):
    """The walk's trap: the README's kNN line on the 32 px demo checkpoint ran at 224 px (another number, 26x
    slower). Without --image-size the command now gives exactly the number at the checkpoint's size."""
    base = ["--dataset", "demo", "--demo-renders", "1", "--pretrained", tiny_checkpoint, "--workers", "0",
            "--knn-k", "20", "--no-progress"]
    implicit = knn.run(parse_args(knn.build_parser(), base + ["--exp-dir", str(tmp_path / "a")]))
    explicit = knn.run(parse_args(knn.build_parser(), base + ["--exp-dir", str(tmp_path / "b"), "--image-size", "16"]))
    assert implicit == explicit


def test_the_end_of_run_next_line_holds_complete_commands(tiny_run):
    log = (tiny_run / "train.log").read_text()
    line = next(ln for ln in log.splitlines() if "Next: " in ln)
    commands = line.split("Next: ", 1)[1].split("; ")
    assert len(commands) == 2 and " DIR " not in line
    for command in commands:
        words = shlex.split(command)
        assert words[words.index("--dataset") + 1] == "demo" and words[words.index("--image-size") + 1] == "16"
        assert words[words.index("--demo-renders") + 1] == "1"  # the run's own digits, not the default renders
        assert os.path.isfile(words[words.index("--pretrained") + 1])
    parser = {"eval_linear.py": build_linear_parser, "pcl.evaluation.knn": knn.build_parser}
    for command in commands:  # each parses with its command's own parser
        words = shlex.split(command)
        start = 2 if words[1] == "eval_linear.py" else 3
        parse_args(parser[words[1] if start == 2 else words[2]](), words[start:])


def test_next_commands_name_the_linear_preset_beside_the_runs_preset_and_the_real_folder(tmp_path):
    from pcl.monitor import next_commands
    from pcl.settings import MonitorSettings

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    settings = dict(num_cluster=(20,), epochs=4, seed=0, prototype_gallery=False, knn_every=0, knn_eval=True, knn_k=20,
                    knn_t=0.07, knn_budget_bytes=1 << 30, image_size=32, kmeans_backend="auto")
    demo = MonitorSettings(**settings, dataset="demo", config=os.path.join(root, "configs", "demo.yaml"))
    linear_line = next_commands(demo, "exp/demo/checkpoint_0003.pth.tar")[0]
    assert f"-c {os.path.join(root, 'configs', 'demo_linear.yaml')} --dataset demo --image-size 32" in linear_line
    folder = MonitorSettings(**settings, dataset="imagefolder", data=str(tmp_path / "my images"))
    assert all(shlex.quote(str(tmp_path / "my images")) + " --image-size 32" in c for c in next_commands(folder, "c.pth"))
    unlabelled = next_commands(folder, "run/c.pth", labelled=False)
    assert "pcl.evaluation.visualize" in unlabelled[0] and "pcl.export" in unlabelled[1]


def test_checkpoint_settings_read_ours_official_and_linear_heads(tiny_checkpoint, tmp_path):
    assert common.checkpoint_settings(tiny_checkpoint) == {"arch": "resnet18", "width": 4, "stem": "small",
                                                            "image_size": 16}
    official_checkpoint(tmp_path / "o.pth.tar")
    assert common.checkpoint_settings(str(tmp_path / "o.pth.tar")) == {"arch": "resnet18"}


def test_eval_svm_says_where_it_wrote_its_table(tiny_checkpoint, tmp_path, capsys):
    args = parse_args(build_svm_parser(), ["--dataset", "demo", "--demo-renders", "1", "--pretrained", tiny_checkpoint,
                                           "--exp-dir", str(tmp_path), "--workers", "0", "--no-progress", "--n-jobs", "1"])
    svm.run_svm(args)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"wrote {tmp_path / 'svm_demo.md'} (this table) and {tmp_path / 'svm_demo.json'} (every run and cost)"
    assert (tmp_path / "svm_demo.md").read_text().startswith("| demo mAP |")
