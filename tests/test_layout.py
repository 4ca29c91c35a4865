"""The layout holds: imports only downward, evaluation apart from the engine, math apart from settings, a launcher
that knows no training module, read-only settings.

The layers (bottom up) are the "Layout" table of docs/architecture.md; a module may import its own layer and the ones below.
``if __name__ == "__main__":`` blocks are entry points and may import anything (e.g. :mod:`pcl.launch`).
"""

import ast
import os
import pickle
import subprocess

import pytest

from conftest import ROOT

LAYERS = {
    0: ["pcl"],
    1: ["pcl.distributed", "pcl.loss", "pcl.settings", "pcl.schedule", "pcl.data.transforms", "pcl.data.demo",
        "pcl.data.registry", "pcl.data.unlabelled"],
    2: ["pcl.config", "pcl.model", "pcl.cluster", "pcl.log", "pcl.features", "pcl.data", "pcl.data.datasets",
        "pcl.data.tensor_augment", "pcl.data.device_input", "pcl.data.loaders", "pcl.data.pretrain", "pcl.data.labelled", "pcl.data.transfer"],
    3: ["pcl.gallery", "pcl.checkpoint", "pcl.evaluation"],
    4: ["pcl.preemption", "pcl.evaluation.common", "pcl.export"],
    5: ["pcl.estep", "pcl.resume", "pcl.evaluation.linear"],
    6: ["pcl.engine", "pcl.monitor", "pcl.evaluation.knn", "pcl.evaluation.cluster_metrics", "pcl.evaluation.svm",
        "pcl.evaluation.semisup", "pcl.evaluation.visualize"],
    7: ["pcl.launch"],
}
MATH = ("pcl.loss", "pcl.cluster", "pcl.features")  # pure functions of tensors: no settings, no command line
SETTINGS = ("pcl.config", "pcl.settings")
TRAINING = ("pcl.engine", "pcl.estep", "pcl.monitor", "pcl.loss", "pcl.model", "pcl.cluster")
LAYER = {module: level for level, modules in LAYERS.items() for module in modules}


def python_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [f for f in listed if os.path.exists(os.path.join(ROOT, f))]


def module_name(path: str) -> str:
    name = path[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def pcl_imports(path: str) -> set[str]:
    """The pcl modules a file imports (module level and inside functions), outside its __main__ block."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    skip = {id(n) for block in tree.body if isinstance(block, ast.If) and "__main__" in ast.unparse(block.test)
            for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pcl":
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if n in LAYER} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pcl"}
    return found


def test_every_package_module_has_a_layer():
    modules = {module_name(f) for f in python_files() if f.startswith("pcl/")}
    assert modules == set(LAYER), f"add to LAYERS (and the Layout table in docs/architecture.md): {sorted(modules ^ set(LAYER))}"


def test_no_module_imports_a_higher_layer():
    upward = [f"{module_name(f)} (layer {LAYER[module_name(f)]}) imports {dep} (layer {LAYER[dep]})"
              for f in python_files() if f.startswith("pcl/")
              for dep in pcl_imports(f) if LAYER[dep] > LAYER[module_name(f)]]
    assert not upward, "\n".join(upward)


def test_evaluation_never_imports_the_engine():
    offenders = [f for f in python_files() if f.startswith("pcl/evaluation/")
                 if any(d in ("pcl.engine", "pcl.estep") for d in pcl_imports(f))]
    assert not offenders


def test_the_math_modules_import_no_settings():
    offenders = [f"{m} imports {d}" for f in python_files() if (m := module_name(f)) in MATH
                 for d in pcl_imports(f) if d in SETTINGS]
    assert not offenders, offenders


def test_the_launcher_knows_no_training_module():
    assert not pcl_imports("pcl/launch.py") & set(TRAINING)


def test_run_config_is_read_only_and_travels_to_spawned_workers():
    from pcl.config import build_pretrain_parser, parse_args, validate_pretrain_args

    cfg = validate_pretrain_args(parse_args(build_pretrain_parser(), ["--dataset", "demo"]))
    with pytest.raises(AttributeError, match="read-only"):
        cfg.batch_size = 1
    derived = cfg.replace(local_rank=3)
    assert derived.local_rank == 3 and cfg.local_rank == 0 and cfg.num_cluster == (25000, 50000, 100000)
    assert pickle.loads(pickle.dumps(derived)) == derived
    with pytest.raises(AttributeError, match="no 'nonexistent'"):
        cfg.nonexistent
