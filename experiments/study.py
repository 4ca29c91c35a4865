"""What every study driver in ``experiments/`` shares: one pretraining run with its learning curve, the hardware
line and JSON writer of the speed benchmarks (``benchmarks/common.py``, re-exported here so that a study result and a
speed number name their hardware the same way), and the bookkeeping that keeps a study's outputs honest:

- :func:`default_out`: where a driver writes when no ``--out``/``--out-dir``/``--json`` is given: under
  ``exp/results/`` (ignored by git, like the run folders), never over the checkout's committed
  ``experiments/results/``, which only an explicit path replaces;
- :func:`made_with` / :func:`check_made_with`: a folder a driver fills (a run, a data subset, a rendered folder)
  carries ``made_with.json``, the settings and the data fingerprint it was made with; a later call that would reuse
  it under other settings or from other data is refused in one line instead of mixing two experiments;
- :func:`fingerprint`: the data's identity, a hash of the tensors a study reads;
- :func:`cli`: a driver's ``__main__``: a :class:`pcl.PCLError` is one ``error:`` line and exit 2, no traceback.

A driver runs the library only through its public entry points: ``pcl.engine.fit`` on the arguments that
``pcl.config.parse_args(pcl.config.build_pretrain_parser(), argv)`` makes, and the evaluation protocols' own
functions; this module adds nothing but the bookkeeping a study needs around them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Mapping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
for _path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
from common import hardware, use_cores, write_json  # noqa: E402
from pcl import EXIT_INPUT, EXIT_PREEMPTED, PCLError, Preempted, error_line  # noqa: E402

__all__ = ["MADE_WITH", "OUT_ROOT", "RESULTS", "ROOT", "as_json", "check_made_with", "cli", "default_out",
           "differences", "fingerprint", "fit_with_curve", "hardware", "log_epochs", "made_with", "use_cores",
           "write_json"]

#: where the drivers write by default, relative to the working directory like the run folders (exp/ is ignored by git)
OUT_ROOT = os.path.join("exp", "results")
#: the record a driver leaves in a folder it fills: the settings and the data fingerprint the folder was made with
MADE_WITH = "made_with.json"


def default_out(*parts: str) -> str:
    """A driver's default output path, ``exp/results/<parts>``: a folder of its own, never the checkout's committed
    ``experiments/results`` (a driver writes there only when ``--out``/``--out-dir``/``--json`` names it)."""
    return os.path.join(OUT_ROOT, *parts)


def cli(main: Callable[[], Any]) -> None:
    """A driver's ``__main__``: torch threads as :func:`use_cores` says, then ``main()``. A :class:`pcl.PCLError`
    (bad input, a refused folder, a run the library stopped) is one ``error:`` line on stderr and exit 2, no
    traceback; a run preempted after saving exits 75 (rerun the same command to continue); Ctrl-C exits 130."""
    use_cores()
    try:
        main()
    except PCLError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT) from None
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        raise SystemExit(EXIT_PREEMPTED) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def source_commit() -> str:
    """The checkout's commit (short hash, ``-dirty`` when tracked files differ from it), or ``unknown`` outside a
    git checkout: what each study row records, so a table's rows can be traced to the code that made them."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD"], capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """The identity of a study's data: SHA-256 (first 16 hex digits) over every tensor's name, shape, dtype and
    bytes, in name order. Two folders with the same images and labels in the same order have the same
    fingerprint, wherever they lie; one changed pixel or label changes it."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        for chunk in (t.reshape(1) if t.dim() == 0 else t).split(4096):  # an expanded view is copied in pieces
            digest.update(chunk.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def as_json(obj: Any) -> Any:
    """``obj`` as JSON reads it back (tuples become lists, keys strings): what a record on disk is compared as."""
    return json.loads(json.dumps(obj))


def differences(found: Any, wanted: Any, loose: tuple[str, ...] = (), where: str = "") -> list[str]:
    """The leaves where two records differ, as 'key: FOUND there, WANTED now'. In a section named in ``loose``
    a key that only one side has is no difference (a flag added to the library later has its default there)."""
    if isinstance(found, dict) and isinstance(wanted, dict):
        keys = list(wanted) + [k for k in found if k not in wanted]
        if where.split(".")[-1] in loose:
            keys = [k for k in keys if k in found and k in wanted]
        out: list[str] = []
        for k in keys:
            out += differences(found.get(k, "(absent)"), wanted.get(k, "(absent)"), loose, f"{where}.{k}" if where
                               else k)
        return out
    if found == wanted:
        return []
    show = lambda v: (lambda t: t if len(t) <= 80 else t[:77] + "...")(json.dumps(v))  # noqa: E731
    return [f"{where or 'the record'}: {show(found)} there, {show(wanted)} now"]


def check_made_with(folder: str, record: Mapping[str, Any], what: str, fix: str, loose: tuple[str, ...] = (),
                    holds: Callable[[str], bool] | None = None) -> bool:
    """Whether ``folder`` may be (re)used for ``record``: False when it holds nothing yet (the caller makes it and
    writes the record), True when its ``made_with.json`` says the same. A folder made with other settings or data,
    or holding files but no record (an older driver, an interrupted write), is a PCLError naming the differences
    and ``fix``. ``holds(folder)``: whether the folder holds anything to protect (default: any file but the
    record); a run folder whose run never got to save anything may then be claimed again."""
    path = os.path.join(folder, MADE_WITH)
    held = holds or (lambda f: any(e.name != MADE_WITH for e in os.scandir(f)))
    if not os.path.isdir(folder) or not held(folder):
        return False
    if not os.path.isfile(path):
        raise PCLError(f"{folder} holds {what} but no {MADE_WITH} saying how it was made (an older driver or an "
                       f"interrupted write): {fix}")
    diff = differences(read_record(path, fix), as_json(dict(record)), loose)
    if diff:
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise PCLError(f"{folder} holds {what} made with other settings or data ({'; '.join(diff[:3])}{more}): "
                       f"{fix}")
    return True


def read_record(path: str, fix: str) -> Any:
    """A made_with.json as JSON; an unreadable one is a PCLError naming it and ``fix``."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise PCLError(f"{path} is unreadable ({e}): {fix}") from None


def made_with(folder: str, record: Mapping[str, Any]) -> None:
    """Write ``folder``/made_with.json (folders created; written to a temporary name and renamed into place)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, MADE_WITH)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(as_json(dict(record)), f, indent=1)
    os.replace(tmp, path)


def log_epochs(exp_dir: str) -> dict[int, dict[str, Any]]:
    """EXP_DIR/log.txt as {epoch: entry}, in epoch order. The log is appended to, so only the lines from the last
    start at epoch 0 count, and of an epoch repeated after a resume the last line wins."""
    with open(os.path.join(exp_dir, "log.txt")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    starts = [i for i, entry in enumerate(lines) if entry.get("epoch") == 0]
    epochs = {int(entry["epoch"]): entry for entry in lines[starts[-1] if starts else 0:]}
    return dict(sorted(epochs.items()))


def fit_with_curve(argv: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pretrain with ``main_pcl`` flags in this process; returns (fit's stats, a record of the run): wall and
    training seconds (E-steps in, kNN monitoring out) and the learning curve read back from EXP_DIR/log.txt."""
    from pcl.config import build_pretrain_parser, parse_args
    from pcl.engine import fit

    args = parse_args(build_pretrain_parser(), argv)
    start = time.perf_counter()
    stats = fit(args)
    wall = time.perf_counter() - start
    curve, elapsed = [], 0.0
    with open(os.path.join(args.exp_dir, "log.txt")) as f:
        for line in f:
            entry = json.loads(line)
            elapsed += entry["seconds"]
            if "knn_top1" in entry:
                point = {"epoch": entry["epoch"] + 1, "train_seconds": round(elapsed, 1),
                         "knn_top1": round(entry["knn_top1"], 2)}
                if "test_nmi" in entry:
                    point["test_nmi"] = round(entry["test_nmi"], 2)
                curve.append(point)
    record = {"argv": argv, "exp_dir": args.exp_dir, "wall_seconds": round(wall, 1),
              "train_seconds": round(elapsed, 1), "curve": curve}
    return stats, record
