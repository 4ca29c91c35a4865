"""Bad input: one clear line naming the problem, non-zero exit, no traceback."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, assert_clean_error, run_main, two_class_folder


def test_missing_data_dir(tmp_path):
    code, err = run_main(str(tmp_path / "nope"), *TINY, "--exp-dir", str(tmp_path / "e"))
    assert_clean_error(code, err, "data folder not found", "nope")


def test_empty_data_dir(tmp_path):
    os.makedirs(tmp_path / "d" / "train")
    code, err = run_main(str(tmp_path / "d"), *TINY, "--exp-dir", str(tmp_path / "e"))
    assert_clean_error(code, err, "no images in", "train")


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"this is not a checkpoint")
    code, err = run_main(two_class_folder(tmp_path / "d"), *TINY, "--resume", str(bad), "--exp-dir", str(tmp_path / "e"))
    assert_clean_error(code, err, "bad.pth.tar", "unreadable")


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 3\nnum_clusters: 10\n")
    code, err = run_main("-c", str(cfg), "--dataset", "demo")
    assert_clean_error(code, err, "unknown key 'num_clusters'")


def test_malformed_num_cluster(tmp_path):
    code, err = run_main(str(tmp_path), "--num-cluster", "100,abc")
    assert_clean_error(code, err, "--num-cluster", "malformed")


def test_more_clusters_than_samples(tmp_path):
    argv = [a if a != "2,3" else "5,100" for a in TINY]
    code, err = run_main(two_class_folder(tmp_path / "d"), *argv, "--exp-dir", str(tmp_path / "e"))
    assert_clean_error(code, err, "k=100", "12 training samples")


def test_no_data_at_all():
    code, err = run_main("--epochs", "1")
    assert_clean_error(code, err, "--dataset demo")


@pytest.mark.parametrize("flag", ["--help"])
def test_help_lists_official_flags(flag):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "main_pcl.py"), flag], capture_output=True,
                         text=True, timeout=120).stdout
    for name in ("--arch", "--pcl-r", "--moco-m", "--num-cluster", "--warmup-epoch", "--exp-dir", "--aug-plus"):
        assert name in out


@pytest.mark.parametrize("typo, meant", [("--warmup-epochs", "--warmup-epoch"), ("--num-clusters", "--num-cluster"),
                                         ("--epoch", "--epochs"), ("--warmup", "--warmup-epoch")])
def test_a_flag_typo_is_one_line_naming_the_nearest_flag_and_no_prefix_is_taken(typo, meant, capsys):
    """No silent prefix matching (--epoch was taken for --epochs), no 38-line usage block."""
    from pcl.config import build_pretrain_parser, parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(build_pretrain_parser(), ["--dataset", "demo", typo, "1"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"unrecognized arguments: {typo}" in err and f"{typo}: did you mean {meant}?" in err


def test_every_parser_in_the_repository_refuses_abbreviations():
    import ast

    from test_layout import python_files

    lax = []
    for path in (p for p in python_files() if not p.startswith("tests/")):
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "ArgumentParser":
                if not any(k.arg == "allow_abbrev" and getattr(k.value, "value", True) is False for k in node.keywords):
                    lax.append(f"{path}:{node.lineno}")
    assert not lax, f"use pcl.config.Parser or allow_abbrev=False: {lax}"


def doc_commands(path):
    """The commands of main_pcl.py, eval_*.py and python -m pcl.* in a Markdown file's code blocks, continuation
    lines joined and comments cut: (script or module, its arguments)."""
    import shlex

    text = open(os.path.join(ROOT, path)).read().replace("\\\n", " ")
    blocks = text.split("```")[1::2]
    for line in (ln for block in blocks for ln in block.splitlines()):
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):
            if word in ("main_pcl.py", "eval_linear.py", "eval_svm.py") or (word == "-m" and i + 1 < len(words)
                                                                              and words[i + 1].startswith("pcl.")):
                name = words[i + 1] if word == "-m" else word
                yield name, [w for w in words[i + (2 if word == "-m" else 1):] if w != "&&"]
                break


def test_every_documented_command_parses_and_the_quickstart_has_a_smoke_line(monkeypatch):
    """No flag in README.md or docs/ is unknown or abbreviated (flags are never abbreviated now); the Quickstart
    keeps its two commands and offers the one-minute smoke run under them."""
    import importlib
    import re

    from pcl import config
    from pcl.export import build_export_parser

    parsers = {"main_pcl.py": config.build_pretrain_parser, "eval_linear.py": config.build_linear_parser,
               "eval_svm.py": config.build_svm_parser, "pcl.export": build_export_parser}
    monkeypatch.chdir(ROOT)
    docs = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
                            if f.endswith(".md")]
    seen = 0
    for path in docs:
        for name, argv in doc_commands(path):
            build = parsers.get(name) or importlib.import_module(name).build_parser
            argv = ["1" if re.fullmatch(r"[A-Z][A-Z0-9_]*|\$\S+", w) else w for w in argv]  # DIR, NODES, $RANK
            if any(a in ("-c", "--config") and not os.path.isfile(v) for a, v in zip(argv, argv[1:])):
                continue  # a placeholder preset (-c my.yaml)
            config.parse_args(build(), argv)
            seen += 1
    assert seen > 30
    readme = open(os.path.join(ROOT, "README.md")).read()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert quickstart.split("```")[1].count("pip install") == 2
    assert "python main_pcl.py -c configs/demo.yaml --epochs 4 --warmup-epoch 2" in quickstart
