"""Test helpers: write real her2st spots into other on-disk layouts (HEST-1k, Visium, a small her2st).

The writers follow each format's public specification so the readers can be checked by an
exact round trip: what goes in (real counts, barcodes, pixel positions) must come back out.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from PIL import Image

from agl.data.patches import extract_patches


def _one_slide(adata: ad.AnnData) -> tuple[str, dict]:
    sids = adata.obs["slide_id"].astype(str).unique()
    assert len(sids) == 1, "layout writers take one slide"
    return str(sids[0]), adata.uns["slides"][str(sids[0])]


def write_hest(adata: ad.AnnData, root: Path, sample_id: str, *, patches: bool = True,
               wsi: bool = True) -> Path:
    """HEST-1k layout: st/{id}.h5ad, metadata/{id}.json, patches/{id}.h5, wsis/{id}.jpg."""
    _, meta = _one_slide(adata)
    for sub in ("st", "metadata", "patches", "wsis"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    barcodes = adata.obs["barcode"].astype(str).to_numpy()
    px = adata.obs[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    # HEST stores counts as float32; the reader must accept integer-valued floats.
    st = ad.AnnData(X=sp.csr_matrix(adata.X, dtype=np.float32),
                    obs=pd.DataFrame({"in_tissue": 1,
                                      "array_row": adata.obs["array_row"].to_numpy(),
                                      "array_col": adata.obs["array_col"].to_numpy(),
                                      "pxl_col_in_fullres": px[:, 0],
                                      "pxl_row_in_fullres": px[:, 1]}, index=pd.Index(barcodes)),
                    var=pd.DataFrame(index=adata.var_names.copy()))
    st.obsm["spatial"] = px.copy()
    st.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps({
        "pixel_size_um_estimated": meta["microns_per_pixel"], "pixel_size_um_embedded": None,
        "spot_diameter": meta["spot_diameter_um"], "inter_spot_dist": 200.0,
        "st_technology": "Spatial Transcriptomics", "id": sample_id}))
    if patches:
        # HEST's standard: 224 px at 0.5 um/px around each spot; coords = top-left corner.
        imgs, _, _ = extract_patches(adata, patch_um=112.0, patch_px=224, progress=False)
        side = 112.0 / meta["microns_per_pixel"]
        with h5py.File(root / "patches" / f"{sample_id}.h5", "w") as f:
            f.create_dataset("img", data=imgs)
            f.create_dataset("coords", data=(px - side // 2).astype(np.int64))
            f.create_dataset("barcode", data=np.array(barcodes, dtype="S")[:, None])
    if wsi:
        os.symlink(meta["image_path"], root / "wsis" / f"{sample_id}.jpg")
    return root


def write_visium(adata: ad.AnnData, outs: Path, *, legacy_positions: bool = False,
                 extra_features: bool = True, matrix: str = "h5", images: bool = True) -> Path:
    """Space Ranger outs/ as Space Ranger writes it, from one real slide.

    ``filtered_feature_bc_matrix.h5`` (10x HDF5 schema) or ``filtered_feature_bc_matrix/``
    (``matrix="mtx"``: matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz), ``spatial/`` with
    tissue_positions.csv (or the headerless tissue_positions_list.csv of Space Ranger 1),
    scalefactors_json.json and, if ``images``, tissue_hires_image.png (longest side 2000 px) and
    tissue_lowres_image.png (600 px) downscaled from the real image. The full-resolution image
    lies beside outs/, as users keep it: Space Ranger never copies it into outs/.
    """
    _, meta = _one_slide(adata)
    (outs / "spatial").mkdir(parents=True, exist_ok=True)
    barcodes = adata.obs["barcode"].astype(str).to_numpy()
    genes = adata.var_names.to_numpy(dtype=str)
    counts = sp.csr_matrix(adata.X)
    types = ["Gene Expression"] * len(genes)
    if extra_features:  # an antibody panel the reader must leave out
        counts = sp.hstack([counts, sp.csr_matrix(np.full((len(barcodes), 2), 7, np.int32))], format="csr")
        genes = np.concatenate([genes, ["CD3_TotalSeqB", "CD8_TotalSeqB"]])
        types += ["Antibody Capture"] * 2
    ids = [f"ENSG{i:011d}" for i in range(len(genes))]
    if matrix == "h5":
        with h5py.File(outs / "filtered_feature_bc_matrix.h5", "w") as f:
            # the file attributes Space Ranger writes (scanpy.read_visium takes the library id from them)
            f.attrs.update({"filetype": "matrix", "version": 2, "software_version": "spaceranger-2.1.0",
                            "chemistry_description": "Spatial 3' v1",
                            "library_ids": np.array([outs.parent.name], dtype="S"),
                            "original_gem_groups": np.array([1], dtype=np.int64)})
            m = f.create_group("matrix")
            # features x barcodes in CSC == barcodes x features in CSR.
            m.create_dataset("data", data=counts.data.astype(np.int32))
            m.create_dataset("indices", data=counts.indices.astype(np.int64))
            m.create_dataset("indptr", data=counts.indptr.astype(np.int64))
            m.create_dataset("shape", data=np.array([counts.shape[1], counts.shape[0]], dtype=np.int32))
            m.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
            feats = m.create_group("features")
            feats.create_dataset("name", data=np.array(genes, dtype="S"))
            feats.create_dataset("id", data=np.array(ids, dtype="S"))
            feats.create_dataset("feature_type", data=np.array(types, dtype="S"))
            feats.create_dataset("genome", data=np.array(["GRCh38"] * len(genes), dtype="S"))
    else:
        import scipy.io

        folder = outs / "filtered_feature_bc_matrix"
        folder.mkdir()
        with gzip.open(folder / "matrix.mtx.gz", "wb") as fh:
            scipy.io.mmwrite(fh, sp.coo_matrix(counts.T), field="integer")
        pd.DataFrame({"id": ids, "name": genes, "type": types}).to_csv(
            folder / "features.tsv.gz", sep="\t", header=False, index=False, compression="gzip")
        pd.Series(barcodes).to_csv(folder / "barcodes.tsv.gz", header=False, index=False, compression="gzip")
    pos = pd.DataFrame({
        "barcode": barcodes, "in_tissue": 1,
        "array_row": adata.obs["array_row"].to_numpy(), "array_col": adata.obs["array_col"].to_numpy(),
        "pxl_row_in_fullres": adata.obs["pixel_y"].to_numpy(), "pxl_col_in_fullres": adata.obs["pixel_x"].to_numpy(),
    })
    # Spots off the tissue appear in the positions but not in the filtered matrix.
    off = pd.DataFrame({"barcode": ["OFFTISSUE-1", "OFFTISSUE-2"], "in_tissue": 0, "array_row": [0, 0],
                        "array_col": [0, 2], "pxl_row_in_fullres": [10.0, 10.0], "pxl_col_in_fullres": [10.0, 20.0]})
    pos = pd.concat([off, pos], ignore_index=True)
    if legacy_positions:
        pos.to_csv(outs / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    else:
        pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    with Image.open(meta["image_path"]) as full:
        size = full.size
        scalef = {"tissue_hires_scalef": 2000 / max(size), "tissue_lowres_scalef": 600 / max(size)}
        if images:
            full.draft("RGB", (size[0] // 4, size[1] // 4))  # JPEG decodes at 1/4 directly: quick, still real
            for name, key in (("tissue_hires_image.png", "tissue_hires_scalef"),
                              ("tissue_lowres_image.png", "tissue_lowres_scalef")):
                target = (round(size[0] * scalef[key]), round(size[1] * scalef[key]))
                full.convert("RGB").resize(target, Image.Resampling.LANCZOS).save(outs / "spatial" / name)
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps({
        "spot_diameter_fullres": 55.0 / meta["microns_per_pixel"], **scalef, "fiducial_diameter_fullres": 80.0}))
    os.symlink(meta["image_path"], outs.parent / Path(meta["image_path"]).name)
    return outs


def write_scanpy_visium(adata: ad.AnnData, root: Path) -> tuple[Path, Path]:
    """One real slide as users hold it after scanpy: Space Ranger outs/ read by ``scanpy.read_visium``
    (which fills ``uns['spatial'][library]`` with the scale factors and the hires/lowres images as
    float arrays, ``obsm['spatial']`` with full-resolution pixels) and saved with ``write_h5ad``.

    Returns (the .h5ad, the outs/ folder it came from), the .h5ad named after the slide.
    """
    import warnings

    import scanpy as sc

    sid, _ = _one_slide(adata)
    outs = write_visium(adata, root / sid / "outs")
    with warnings.catch_warnings():  # scanpy >= 1.11 points to squidpy for Visium; the layout is the same
        warnings.simplefilter("ignore", FutureWarning)
        read = sc.read_visium(outs)
    path = root / f"{sid}.h5ad"
    read.write_h5ad(path)
    return path, outs


def cut_her2st(src: Path, dst: Path, section: str, n_spots: int = 30, n_genes: int = 300) -> Path:
    """A small copy of a real her2st section: the first spots, the most-counted genes, its image.

    The counts table keeps its original format (gzip TSV, unnamed spot-id column).
    """
    table = pd.read_csv(src / "ST-cnts" / f"{section}.tsv.gz", sep="\t", index_col=0)
    sel = pd.read_csv(src / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
    sel_ids = sel["x"].astype(str) + "x" + sel["y"].astype(str)
    spots = [s for s in table.index if s in set(sel_ids)][:n_spots]
    genes = table.loc[spots].sum().sort_values(ascending=False, kind="stable").index[:n_genes]
    for sub in ("ST-cnts", "ST-spotfiles", f"ST-imgs/{section[0]}/{section}"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    write_counts(table.loc[spots, genes], dst / "ST-cnts" / f"{section}.tsv.gz")
    sel[sel_ids.isin(spots).to_numpy()].to_csv(dst / "ST-spotfiles" / f"{section}_selection.tsv",
                                                sep="\t", index=False)
    for img in (src / "ST-imgs" / section[0] / section).glob("*.jpg"):
        os.symlink(img, dst / "ST-imgs" / section[0] / section / img.name)
    return dst


def write_counts(table: pd.DataFrame, path: Path) -> None:
    """A her2st counts table: gzip TSV, first header cell empty, spot ids in the first column."""
    with gzip.open(path, "wt") as fh:
        fh.write("\t" + "\t".join(map(str, table.columns)) + "\n")
        table.to_csv(fh, sep="\t", header=False)


# --------------------------------------------------------------------------- legacy ST layouts


def _spot_ids(sel: pd.DataFrame) -> pd.Series:
    return sel["x"].round().astype(int).astype(str) + "x" + sel["y"].round().astype(int).astype(str)


def write_st_2k(src: Path, dst: Path, section: str) -> Path:
    """A real her2st section as if printed on the 2k array: array coordinates doubled, same pixels.

    On the 2k array (100 um pitch) one step is half the 1k step (200 um), so the same tissue and
    image give array coordinates twice as large; the counts' spot ids follow.
    """
    table = pd.read_csv(src / "ST-cnts" / f"{section}.tsv.gz", sep="\t", index_col=0)
    sel = pd.read_csv(src / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
    old_ids = _spot_ids(sel)
    for c in ("x", "y", "new_x", "new_y"):
        sel[c] = sel[c] * 2
    table.index = table.index.map(dict(zip(old_ids, _spot_ids(sel))))
    for sub in ("ST-cnts", "ST-spotfiles", f"ST-imgs/{section[0]}/{section}"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    write_counts(table, dst / "ST-cnts" / f"{section}.tsv.gz")
    sel.to_csv(dst / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t", index=False)
    for img in (src / "ST-imgs" / section[0] / section).glob("*.jpg"):
        os.symlink(img, dst / "ST-imgs" / section[0] / section / img.name)
    return dst


def write_st_folder(src: Path, dst: Path, section: str, *, genes_as_rows: bool = False, gzip_counts: bool = False,
                    spot_header: bool = True, unselect: int = 0) -> Path:
    """One real her2st section as an ST Pipeline run folder: ``{s}_stdata.tsv``, ``spots_{s}.txt``, ``HE.jpg``.

    ST Pipeline writes plain TSV counts with ``XxY`` spot ids (spots as rows; older versions
    genes as rows); the ST spot detector writes ``x y new_x new_y pixel_x pixel_y selected``
    (``selected`` 0 for spots off the tissue; the first ``unselect`` spots are marked so).
    """
    table = pd.read_csv(src / "ST-cnts" / f"{section}.tsv.gz", sep="\t", index_col=0)
    sel = pd.read_csv(src / "ST-spotfiles" / f"{section}_selection.tsv", sep="\t")
    if unselect:
        sel.loc[sel.index[:unselect], "selected"] = 0
    dst.mkdir(parents=True, exist_ok=True)
    out = table.T if genes_as_rows else table
    counts = dst / f"{section}_stdata.tsv{'.gz' if gzip_counts else ''}"
    out.to_csv(counts, sep="\t", compression="gzip" if gzip_counts else None)
    sel.to_csv(dst / f"spots_{section}.txt", sep="\t", index=False, header=spot_header)
    (img,) = (src / "ST-imgs" / section[0] / section).glob("*.jpg")
    os.symlink(img, dst / "HE.jpg")
    return dst


# --------------------------------------------------------------------------- whole-slide images


def write_pyramid_tiff(image: Image.Image, out: Path, *, levels: int = 3, tile: int | None = 256,
                       mpp: float | None = None) -> Path:
    """A tiled pyramidal TIFF as slide scanners and HEST write them: level 0 plus 2x-reduced SubIFDs.

    Lossless (zlib) so every level-0 pixel equals the source image's; ``tile=None`` writes strips.
    """
    import tifffile

    levels_img = [image]
    for _ in range(levels - 1):
        levels_img.append(levels_img[-1].reduce(2))
    kw = {"photometric": "rgb", "compression": "zlib", "compressionargs": {"level": 1}}
    if tile is not None:
        kw["tile"] = (tile, tile)
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    with tifffile.TiffWriter(out, bigtiff=True) as tw:
        tw.write(np.asarray(levels_img[0]), subifds=levels - 1, **kw, **res)
        for lv in levels_img[1:]:
            tw.write(np.asarray(lv), subfiletype=1, **kw)
    return out
