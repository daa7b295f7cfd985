"""agl.fileio: hashing, strict JSON and writes that never leave half a file or folder."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from agl.fileio import atomic_savefig, atomic_write_json, atomic_write_text, jsonable, sha256_file, swap_folder


def test_sha256_file_matches_hashlib_for_any_chunk(tmp_path: Path) -> None:
    data = os.urandom(3000)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == sha256_file(tmp_path / "f", chunk=7) == hashlib.sha256(data).hexdigest()


def test_jsonable_numpy_and_non_finite() -> None:
    value = {1: np.float32(1.5), "b": np.array([1.0, np.nan]), "c": np.bool_(True), "d": (np.int64(3), -np.inf),
             "big": np.zeros((40, 30))}
    out = jsonable(value)
    assert out == {"1": 1.5, "b": [1.0, None], "c": True, "d": [3, None], "big": [[0.0] * 30] * 40}
    assert type(out["d"][0]) is int and type(out["c"]) is bool
    assert jsonable(value, max_array=1000)["big"] == "array[40, 30]"
    json.dumps(out, allow_nan=False)  # strict JSON


def test_atomic_writes_replace_and_leave_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    atomic_write_json(target, {"x": np.float64(np.nan), "y": [1, 2]})
    assert json.loads(target.read_text()) == {"x": None, "y": [1, 2]}
    atomic_write_text(target, "new")
    assert target.read_text() == "new"

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    class Fig:
        savefig = staticmethod(lambda path, **kw: broken(Path(path)))

    with pytest.raises(OSError, match="disk full"):
        atomic_savefig(Fig(), tmp_path / "p.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp, no partial PNG


def test_swap_folder_replaces_and_restores(tmp_path: Path, monkeypatch) -> None:
    out, new = tmp_path / "out", tmp_path / ".new"
    out.mkdir(), new.mkdir()
    (out / "v").write_text("old")
    (new / "v").write_text("new")
    real_rename = os.rename

    def fail_second(src, dst):
        if Path(src) == new:
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_second)
    with pytest.raises(OSError, match="rename failed"):
        swap_folder(new, out)
    assert (out / "v").read_text() == "old"  # the previous folder is back
    monkeypatch.undo()
    swap_folder(new, out)
    assert (out / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_output_folder_cases(tmp_path: Path) -> None:
    from agl.errors import DataError
    from agl.fileio import OUTPUT_MARKER, check_output_folder, output_owner, write_output_marker

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "counts.tsv").write_text("x")
    # the input itself, a folder above it (also through a symlink): refused whatever the flags
    link = tmp_path / "link"
    link.symlink_to(data)
    for out, why in ((data, "is the input"), (tmp_path, "holds the input"), (link, "is the input")):
        with pytest.raises(DataError, match=why) as err:
            check_output_folder(out, "predict", inputs=[data], overwrite=True)
        assert str(out) in str(err.value)
    # a fresh folder inside the input is fine; an existing one of foreign files is not
    assert check_output_folder(data / "pred", "predict", inputs=[data]) == "fresh"
    with pytest.raises(DataError, match=r"not an `agl predict` output \(it holds counts.tsv, sub\)"):
        check_output_folder(data, "predict", overwrite=True)
    (tmp_path / "empty").mkdir()
    assert check_output_folder(tmp_path / "empty", "predict") == "fresh"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        check_output_folder(tmp_path / "file", "predict", overwrite=True)
    # an earlier output of the same command: replaced only with overwrite; another command's never
    own = tmp_path / "own"
    own.mkdir()
    write_output_marker(own, "predict", input="x")
    assert output_owner(own) == "predict" and json.loads((own / OUTPUT_MARKER).read_text())["version"]
    with pytest.raises(DataError, match="pass --overwrite"):
        check_output_folder(own, "predict")
    assert check_output_folder(own, "predict", overwrite=True) == "own"
    assert check_output_folder(own, "predict", reuse=True) == "own"
    with pytest.raises(DataError, match="holds the output of `agl predict`, not an `agl train` output"):
        check_output_folder(own, "train", overwrite=True)
    (own / OUTPUT_MARKER).write_text("{not json")  # a damaged marker proves nothing
    with pytest.raises(DataError, match="not an `agl predict` output"):
        check_output_folder(own, "predict", overwrite=True)
    # outputs from before the marker are recognised by their signature file
    old = tmp_path / "old-store"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    assert output_owner(old) == "ingest"
