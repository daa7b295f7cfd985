"""One extension point, one file: a reader module registers itself and ingests a real her2st section rewritten in
its format (issue 25 item 4); the built-in readers each live in their own module."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from agl.data.commands import FORMATS
from agl.data.ingest import IngestSettings, SlideSource, ingest_slides
from agl.data.readers import READER_ENTRIES, READERS, read_her2st, read_slides
from agl.data.store import open_store


@pytest.fixture
def toy_format():
    import toy_reader  # registers "toy-csv" on import: the only step a new format needs

    yield toy_reader
    for name in [n for n, e in READER_ENTRIES.items() if e.read is toy_reader.read_toy]:
        READERS.pop(name), READER_ENTRIES.pop(name)


def write_toy(adata, root):
    """Each slide of a canonical AnnData as a toy-csv folder (counts by spot, positions in microns, the image)."""
    for sid in adata.obs["slide_id"].cat.categories:
        one = adata[adata.obs["slide_id"] == sid]
        meta = adata.uns["slides"][sid]
        folder = root / sid
        folder.mkdir(parents=True)
        barcodes = one.obs["barcode"].astype(str).to_numpy()
        pd.DataFrame(one.X.toarray(), index=barcodes, columns=one.var_names).to_csv(folder / "counts.csv")
        pd.DataFrame(one.obs[["pixel_x", "pixel_y"]].to_numpy() * meta["microns_per_pixel"], index=barcodes,
                     columns=["x_um", "y_um"]).to_csv(folder / "spots.csv")
        (folder / "slide.json").write_text(json.dumps({"microns_per_pixel": meta["microns_per_pixel"]}))
        os.symlink(meta["image_path"], folder / "image.jpg")
    return root


def test_toy_reader_in_one_module_ingests_real_sections(toy_format, her2st_dir, tmp_path):
    real = read_her2st(her2st_dir, ["C2", "C3"])
    root = write_toy(real, tmp_path / "toy")
    got = read_slides("toy-csv", root, slides=["C3"])
    want = real[real.obs["slide_id"] == "C3"]
    assert got.obs["barcode"].tolist() == want.obs["barcode"].tolist() and (got.X != want.X).nnz == 0
    settings = IngestSettings(patch_px=32, seeds=(0,), split_kinds=("kfold", "loso"))
    source = SlideSource("toy-csv", root)
    assert source.units == ["C2", "C3"]  # listed by the module's own list_units
    store = open_store(ingest_slides(source, tmp_path / "store", settings))
    reference = open_store(ingest_slides(SlideSource("her2st", her2st_dir, units=["C2", "C3"]), tmp_path / "ref",
                                         settings))
    assert store.manifest["slides"] == reference.manifest["slides"] == {"C2": 185, "C3": 179}
    np.testing.assert_array_equal(store.expression[:], reference.expression[:])
    np.testing.assert_array_equal(store.patches[:8], reference.patches[:8])


def test_cli_formats_are_the_built_in_readers():
    built_in = {e.name for e in READER_ENTRIES.values() if e.read.__module__.startswith("agl.")}
    assert set(FORMATS) == built_in
    modules = {e.read.__module__ for e in READER_ENTRIES.values() if e.read.__module__.startswith("agl.")}
    assert len(modules) == len(built_in)  # one module per format
