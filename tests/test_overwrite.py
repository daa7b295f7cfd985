"""--out and --overwrite never destroy data: each command refuses its input, a folder holding its
input, and folders of files it did not write, before any work, leaving every byte in place.

Inputs are real: a small copy of her2st section C2 and a small real store (both under tmp_path).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agl.cli import main
from agl.fileio import write_output_marker
from layouts import cut_her2st

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time (-1 for folders)."""
    return {p.relative_to(root).as_posix(): (p.lstat().st_size, p.lstat().st_mtime_ns) if p.is_file() else (-1, -1)
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def her2st_copy(her2st_dir: Path, tmp_path: Path) -> Path:
    return cut_her2st(her2st_dir, tmp_path / "slides" / "her2st", "C2")


@pytest.fixture
def store_copy(small_store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(small_store, tmp_path / "stores" / "small"))


def _refused(argv: list[str], root: Path, named: Path, why: str, capsys) -> None:
    """``agl ARGV`` exits 1 naming ``named`` and ``why``, and nothing under ``root`` changes."""
    before = _snapshot(root)
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{named}: " in err and why in err, err
    assert "Traceback" not in err
    assert _snapshot(root) == before


def _predict(src: Path, out: Path) -> list[str]:
    return ["predict", "--checkpoint", str(src / "no-checkpoint-needed"), "--input", str(src), "--format", "her2st",
            "--sections", "C2", "--out", str(out), "--overwrite"]


@pytest.mark.reliability(kind="bad input", case="CLI: agl predict --input X --out X --overwrite (the issue's data loss)",
                         outcome="exit 1 naming X ('is the input'); X's counts, spot file and image untouched")
def test_predict_never_replaces_its_input(her2st_copy: Path, tmp_path: Path, capsys) -> None:
    _refused(_predict(her2st_copy, her2st_copy), tmp_path, her2st_copy, "is the input", capsys)
    # the folder above the input, and the input's own sub-folder of spot files
    _refused(_predict(her2st_copy, her2st_copy.parent), tmp_path, her2st_copy.parent, "holds the input", capsys)
    spots = her2st_copy / "ST-spotfiles"
    _refused(_predict(her2st_copy, spots), tmp_path, spots, "is not an `agl predict` output", capsys)


@pytest.mark.reliability(kind="bad input", case="CLI: launch/predict.py --overwrite --out of the --input folder",
                         outcome="exit 1 naming the folder; nothing deleted (same check as agl predict)")
def test_launch_predict_goes_through_the_same_check(her2st_copy: Path, tmp_path: Path) -> None:
    before = _snapshot(tmp_path)
    argv = _predict(her2st_copy, her2st_copy)[1:]
    done = subprocess.run([sys.executable, str(REPO / "launch" / "predict.py"), *argv], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"{her2st_copy}: is the input" in done.stderr
    assert _snapshot(tmp_path) == before


@pytest.mark.reliability(kind="bad input", case="CLI: agl predict --overwrite into another command's output (a train run)",
                         outcome="exit 1: 'holds the output of `agl train`'; the run is kept")
def test_predict_refuses_another_commands_output(her2st_copy: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text("{}")
    write_output_marker(run, "train")
    _refused(_predict(her2st_copy, run), tmp_path, run, "holds the output of `agl train`", capsys)


@pytest.mark.reliability(kind="bad input", case="CLI: agl ingest --overwrite with --out the input folder or its parent",
                         outcome="exit 1 naming --out; the slide files untouched")
def test_ingest_never_replaces_its_input(her2st_copy: Path, tmp_path: Path, capsys) -> None:
    def ingest(out: Path) -> list[str]:
        return ["ingest", "her2st", str(her2st_copy), "--sections", "C2", "--out", str(out), "--overwrite",
                "--patch-px", "32", "--seeds", "0", "--splits", "kfold"]

    _refused(ingest(her2st_copy), tmp_path, her2st_copy, "is the input", capsys)
    _refused(ingest(her2st_copy.parent), tmp_path, her2st_copy.parent, "holds the input", capsys)


TRAIN = ["--method", "pgl", "--split", "kfold-s0-f0", "--set", "epochs=1", "--set", "trunk=[16]",
         "--set", "weights=null", "--set", "device=cpu"]


@pytest.mark.reliability(kind="bad input", case="CLI: agl train --overwrite with --out the store, its parent, "
                         "a folder of other files, or a predict output",
                         outcome="exit 1 naming --out and why; nothing written or changed")
def test_train_refuses_unsafe_out(store_copy: Path, tmp_path: Path, capsys) -> None:
    def train(out: Path) -> list[str]:
        return ["train", "--store", str(store_copy), "--out", str(out), "--overwrite", *TRAIN]

    _refused(train(store_copy), tmp_path, store_copy, "is the input", capsys)
    _refused(train(store_copy.parent), tmp_path, store_copy.parent, "holds the input", capsys)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")
    _refused(train(notes), tmp_path, notes, "is not an `agl train` output (it holds thesis.txt)", capsys)
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "predictions.h5ad").write_bytes(b"h5")
    _refused(train(pred), tmp_path, pred, "holds the output of `agl predict`", capsys)


@pytest.mark.reliability(kind="bad input", case="CLI: agl evaluate with --out the store or a folder of other files",
                         outcome="exit 1 naming --out; nothing written")
def test_evaluate_refuses_unsafe_out(store_copy: Path, tmp_path: Path, capsys) -> None:
    def evaluate(out: Path) -> list[str]:
        return ["evaluate", "--store", str(store_copy), "--protocol", "kfold", "--folds", "0", "--methods", "pgl",
                "--out", str(out), "--set", "epochs=1"]

    _refused(evaluate(store_copy), tmp_path, store_copy, "is the input", capsys)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")
    _refused(evaluate(notes), tmp_path, notes, "is not an `agl evaluate` output", capsys)


@pytest.mark.reliability(kind="bad input", case="CLI: agl tune with --out the store's folder or a folder of other files",
                         outcome="exit 1 naming --out, before Ray or MLflow start; nothing written")
def test_tune_refuses_unsafe_out(store_copy: Path, tmp_path: Path, capsys) -> None:
    def tune(out: Path) -> list[str]:
        return ["tune", "--space", "tiny", "--store", str(store_copy), "--out", str(out), "--num-samples", "1"]

    _refused(tune(store_copy.parent), tmp_path, store_copy.parent, "holds the input", capsys)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")
    _refused(tune(notes), tmp_path, notes, "is not an `agl tune` output", capsys)
