"""Legacy ST as STUtility ships it: several sections' counts tables, spot (alignment) tables and H&E images in ONE
folder, read by ``--sections`` (issue 24 item 11); written from the real her2st sections."""
from __future__ import annotations

import os

import pytest

from agl.cli import main
from agl.data.readers import read_her2st
from agl.data.store import open_store
from agl.errors import DataError
from layouts import write_stutility
from test_readers import assert_same_spots

FAST = ["--patch-px", "32", "--seeds", "0"]


@pytest.fixture(scope="module")
def stutility(her2st_dir, tmp_path_factory):
    return write_stutility(her2st_dir, tmp_path_factory.mktemp("stutility") / "BC_run", ["C2", "C3"])


@pytest.mark.reliability(kind="layout", case="STUtility folder: C2 and C3 side by side ({s}_stdata.tsv.gz, "
                         "alignment_table_{s}.tsv, HE_{s}.jpg in one folder)",
                         outcome="--sections C3 reads C3 alone; no --sections reads both; counts, barcodes, pixels "
                                 "and pixel size equal the her2st release's")
def test_stutility_folder_reads_by_sections(stutility, her2st_dir):
    got = read_her2st(stutility, ["C3"])
    assert_same_spots(got, read_her2st(her2st_dir, "C3"))
    assert got.uns["slides"]["C3"]["image_path"] == str((stutility / "HE_C3.jpg").absolute())
    both = read_her2st(stutility)
    assert list(both.obs["slide_id"].cat.categories) == ["C2", "C3"]
    want = read_her2st(her2st_dir, ["C2", "C3"])
    assert (both.X != want.X).nnz == 0 and list(both.var_names) == list(want.var_names)


def test_stutility_ingest_cli_by_sections(stutility, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["ingest", "her2st", str(stutility), "--sections", "C3", "--out", str(out), "--splits", "kfold",
                 *FAST]) == 0
    assert open_store(out).manifest["slides"] == {"C3": 179}
    streamed = tmp_path / "streamed"  # the streaming ingest lists the folder's sections as its units
    assert main(["ingest", "her2st", str(stutility), "--stream", "--out", str(streamed), "--splits", "kfold", "loso",
                 *FAST]) == 0
    assert open_store(streamed).manifest["slides"] == {"C2": 185, "C3": 179}


@pytest.mark.reliability(kind="bad input", case="STUtility folder: --sections names a section it does not hold",
                         outcome="exit 1; the message names --sections and the sections the folder holds")
def test_stutility_unknown_section(stutility, tmp_path, capsys):
    assert main(["ingest", "her2st", str(stutility), "--sections", "C9", "--out", str(tmp_path / "o"), *FAST]) == 1
    err = capsys.readouterr().err
    assert "--sections" in err and "C9" in err and "C2, C3" in err
    assert "counts_path" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.reliability(kind="bad input", case="STUtility folder: one section's alignment table missing",
                         outcome="DataError naming the section and the spot tables found")
def test_stutility_section_without_spot_table(her2st_dir, tmp_path):
    folder = write_stutility(her2st_dir, tmp_path / "run", ["C2", "C3"])
    os.remove(folder / "alignment_table_C2.tsv")
    with pytest.raises(DataError, match=r"section C2: no spot table .*alignment_table_C3.tsv"):
        read_her2st(folder, ["C2"])
    assert read_her2st(folder, ["C3"]).n_obs == 180
