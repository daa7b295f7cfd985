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


def write_10x_h5(path: Path, counts: sp.csr_matrix, barcodes: np.ndarray, genes: np.ndarray, *,
                 attrs: dict, types: list[str] | None = None, ids: list[str] | None = None) -> None:
    """A 10x feature-barcode HDF5 matrix as Space Ranger / Xenium write it: features x barcodes in CSC (i.e.
    barcodes x features in CSR), features name / id / feature_type / genome, the file attributes ``attrs``."""
    counts = sp.csr_matrix(counts)
    ids = ids or [f"ENSG{i:011d}" for i in range(len(genes))]
    with h5py.File(path, "w") as f:
        f.attrs.update({"filetype": "matrix", "version": 2, **attrs})
        m = f.create_group("matrix")
        m.create_dataset("data", data=counts.data.astype(np.int32))
        m.create_dataset("indices", data=counts.indices.astype(np.int64))
        m.create_dataset("indptr", data=counts.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array([counts.shape[1], counts.shape[0]], dtype=np.int32))
        m.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        feats = m.create_group("features")
        feats.create_dataset("name", data=np.array(genes, dtype="S"))
        feats.create_dataset("id", data=np.array(ids, dtype="S"))
        feats.create_dataset("feature_type", data=np.array(types or ["Gene Expression"] * len(genes), dtype="S"))
        feats.create_dataset("genome", data=np.array(["GRCh38"] * len(genes), dtype="S"))


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
        # the file attributes Space Ranger writes (scanpy.read_visium takes the library id from them)
        write_10x_h5(outs / "filtered_feature_bc_matrix.h5", counts, barcodes, genes, types=types, ids=ids,
                     attrs={"software_version": "spaceranger-2.1.0", "chemistry_description": "Spatial 3' v1",
                            "library_ids": np.array([outs.parent.name], dtype="S"),
                            "original_gem_groups": np.array([1], dtype=np.int64)})
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
                    spot_header: bool = True, unselect: int = 0, spots_name: str | None = None,
                    image_name: str = "HE.jpg") -> Path:
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
    sel.to_csv(dst / (spots_name or f"spots_{section}.txt"), sep="\t", index=False, header=spot_header)
    (img,) = (src / "ST-imgs" / section[0] / section).glob("*.jpg")
    os.symlink(img, dst / image_name)
    return dst


def write_stutility(src: Path, dst: Path, sections: list[str]) -> Path:
    """Several real her2st sections in ONE folder, as STUtility's users keep them (its infoTable lists, per
    section, a counts table, a spot/alignment table and an H&E image side by side):
    ``{s}_stdata.tsv.gz``, ``alignment_table_{s}.tsv`` (ST spot detector columns), ``HE_{s}.jpg``.
    """
    for s in sections:
        write_st_folder(src, dst, s, gzip_counts=True, spots_name=f"alignment_table_{s}.tsv", image_name=f"HE_{s}.jpg")
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


# --------------------------------------------------------------------------- Visium HD and Xenium


def _spot_umis(adata: ad.AnnData, rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per spot (rows of ``adata``): its UMIs as gene codes (one entry per count)."""
    X = sp.csr_matrix(adata.X)
    out = []
    for i in rows:
        cols, vals = X.indices[X.indptr[i]:X.indptr[i + 1]], X.data[X.indptr[i]:X.indptr[i + 1]]
        out.append(np.repeat(cols, vals.astype(np.int64)))
    return out


def hd_square_of_spots(adata: ad.AnnData, spot_um: float) -> np.ndarray:
    """The (column, row) square of ``spot_um`` (grid anchored at pixel 0, axis-aligned) holding each spot's centre."""
    _, meta = _one_slide(adata)
    um = adata.obs[["pixel_x", "pixel_y"]].to_numpy(np.float64) * meta["microns_per_pixel"]
    return np.floor(um / spot_um).astype(np.int64)


def write_visium_hd(adata: ad.AnnData, outs: Path, *, bins_um: tuple[int, ...] = (8, 16), spot_um: float = 112.0,
                    space_ranger: int = 3, hires: bool = False, seed: int = 0) -> Path:
    """A Visium HD ``outs/`` written from one real slide: each spot's UMIs scattered over the bins of the
    ``spot_um`` square holding its centre (so pooling those bins gives back its counts exactly).

    ``binned_outputs/square_{b:03d}um/`` per bin size: ``filtered_feature_bc_matrix.h5`` (every bin of the used
    squares, empty bins included), ``spatial/tissue_positions.parquet`` (plus off-tissue bins not in the
    matrix), ``spatial/scalefactors_json.json`` (bin_size_um, microns_per_pixel, spot_diameter_fullres = bin
    width in pixels, hires/lowres scale factors) and, if ``hires``, ``tissue_hires_image.png`` (longest side
    6000 px, as Space Ranger writes for HD). ``space_ranger=4`` adds ``segmented_outputs/``. The bin grid is
    aligned with the image axes, anchored at pixel 0; the full-resolution image lies beside outs/.
    """
    _, meta = _one_slide(adata)
    mpp = float(meta["microns_per_pixel"])
    squares = hd_square_of_spots(adata, spot_um)
    genes = adata.var_names.to_numpy(dtype=str)
    umis = _spot_umis(adata, np.arange(adata.n_obs))
    with Image.open(meta["image_path"]) as full:
        size = full.size
    scalef = {"tissue_hires_scalef": 6000 / max(size), "tissue_lowres_scalef": 600 / max(size)}
    for b in bins_um:
        k = int(round(spot_um / b))
        assert abs(k * b - spot_um) < 1e-9
        rng = np.random.default_rng(seed + b)
        folder = outs / "binned_outputs" / f"square_{b:03d}um"
        (folder / "spatial").mkdir(parents=True, exist_ok=True)
        local = np.stack(np.meshgrid(np.arange(k), np.arange(k), indexing="ij"), -1).reshape(-1, 2)  # (dc, dr)
        cols = (squares[:, None, 0] * k + local[None, :, 0]).ravel()
        rows = (squares[:, None, 1] * k + local[None, :, 1]).ravel()
        parts = []
        for i, u in enumerate(umis):
            parts.append(sp.csr_matrix((np.ones(len(u), np.int64), (rng.integers(0, k * k, len(u)), u)),
                                       shape=(k * k, len(genes))))
        counts = sp.vstack(parts, format="csr")
        counts.sum_duplicates()
        barcodes = np.array([f"s_{b:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)])
        write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, barcodes, genes,
                     attrs={"software_version": f"spaceranger-{space_ranger}.0.1"})
        pos = pd.DataFrame({"barcode": barcodes, "in_tissue": 1, "array_row": rows, "array_col": cols,
                            "pxl_row_in_fullres": (rows + 0.5) * b / mpp, "pxl_col_in_fullres": (cols + 0.5) * b / mpp})
        off = pd.DataFrame({"barcode": [f"s_{b:03d}um_00000_0000{j}-1" for j in range(3)], "in_tissue": 0,
                            "array_row": 0, "array_col": np.arange(3),
                            "pxl_row_in_fullres": 0.5 * b / mpp, "pxl_col_in_fullres": (np.arange(3) + 0.5) * b / mpp})
        pd.concat([off, pos], ignore_index=True).to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps({
            "bin_size_um": float(b), "microns_per_pixel": mpp, "spot_diameter_fullres": b / mpp,
            "fiducial_diameter_fullres": 100.0 / mpp, "regist_target_img_scalef": scalef["tissue_hires_scalef"],
            **scalef}))
        if hires:
            with Image.open(meta["image_path"]) as full:
                target = (round(size[0] * scalef["tissue_hires_scalef"]), round(size[1] * scalef["tissue_hires_scalef"]))
                full.convert("RGB").resize(target, Image.Resampling.LANCZOS).save(folder / "spatial" / "tissue_hires_image.png")
    if space_ranger >= 4:  # Space Ranger 4: cells from segmentation beside the bins
        seg = outs / "segmented_outputs"
        (seg / "spatial").mkdir(parents=True, exist_ok=True)
        (seg / "cell_segmentations.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    link = outs.parent / Path(meta["image_path"]).name
    if not link.exists():
        os.symlink(meta["image_path"], link)
    return outs


def pseudo_spot_rows(got: ad.AnnData, squares: np.ndarray, spot_um: float, centres: np.ndarray) -> list[int]:
    """Rows of ``got`` (a reader's pseudo-spots) holding each source spot's square; asserts one spot per square,
    no pseudo-spot without a source spot, and each at its expected pixel centre (1e-6 px)."""
    key = [f"sq{spot_um:g}um_c{c:05d}_r{r:05d}" for c, r in squares]
    rows = got.obs["barcode"].astype(str).tolist()
    assert sorted(rows) == sorted(key) and len(set(key)) == len(squares)
    order = [rows.index(k) for k in key]
    np.testing.assert_allclose(got.obs[["pixel_x", "pixel_y"]].to_numpy()[order], centres, rtol=0, atol=1e-6)
    return order


XENIUM_PIXEL_SIZE = 0.2125  # um per morphology-image pixel (experiment.xenium)


def he_to_xenium_affine(mpp_he: float, angle_deg: float = 30.0, offset_px: tuple[float, float] = (40000.0, 5000.0)
                        ) -> np.ndarray:
    """A 3 x 3 affine from H&E pixels to Xenium morphology pixels: a rotation, the scale between the two pixel sizes
    and a shift, as Xenium Explorer exports after aligning an H&E (a similarity transform)."""
    s = mpp_he / XENIUM_PIXEL_SIZE
    a = np.deg2rad(angle_deg)
    return np.array([[s * np.cos(a), -s * np.sin(a), offset_px[0]], [s * np.sin(a), s * np.cos(a), offset_px[1]],
                     [0.0, 0.0, 1.0]])


def xenium_square_of_spots(adata: ad.AnnData, affine: np.ndarray, spot_um: float) -> np.ndarray:
    """The (column, row) ``spot_um`` square of the Xenium micron grid holding each spot's centre."""
    px = adata.obs[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    um = (np.column_stack([px, np.ones(len(px))]) @ affine.T)[:, :2] * XENIUM_PIXEL_SIZE
    return np.floor(um / spot_um).astype(np.int64)


def write_xenium(adata: ad.AnnData, bundle: Path, *, affine: np.ndarray, spot_um: float = 112.0,
                 transcripts: bool = True, cells_per_spot: int = 3, keypoints: bool = False, seed: int = 0) -> Path:
    """A Xenium output bundle written from one real slide, its H&E beside it under a known ``affine``.

    Each spot's UMIs become transcripts at random places inside the ``spot_um`` square (Xenium microns) that holds
    its centre, qv 20-40; plus low-quality transcripts (qv < 20) and control probes (NegControlProbe_*, BLANK_*)
    that a reader must leave out. ``cell_feature_matrix.h5`` + ``cells.parquet``: each spot's counts split over
    ``cells_per_spot`` cells with centroids inside the same square. The H&E (a link to the real image) and
    ``{name}_he_imagealignment.csv`` (the affine) or, if ``keypoints``, a Xenium Explorer keypoints CSV lie beside
    the bundle, as 10x distributes them. ``transcripts=False`` leaves out transcripts.parquet.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, meta = _one_slide(adata)
    rng = np.random.default_rng(seed)
    bundle.mkdir(parents=True, exist_ok=True)
    genes = adata.var_names.to_numpy(dtype=str)
    squares = xenium_square_of_spots(adata, affine, spot_um)
    umis = _spot_umis(adata, np.arange(adata.n_obs))
    (bundle / "experiment.xenium").write_text(json.dumps({
        "major_version": 5, "minor_version": 0, "analysis_sw_version": "xenium-2.0.0.10", "pixel_size": XENIUM_PIXEL_SIZE,
        "panel_name": "her2st top genes (written for a test)", "run_name": bundle.name}))
    if transcripts:
        codes = np.concatenate(umis)
        square = np.repeat(squares, [len(u) for u in umis], axis=0)
        xy = (square + rng.uniform(0.01, 0.99, size=(len(codes), 2))) * spot_um
        qv = rng.uniform(20.0, 40.0, len(codes)).astype(np.float32)
        n_bad = len(codes) // 10  # low-quality transcripts of real genes, and control probes
        bad_xy = (squares[rng.integers(0, len(squares), 2 * n_bad)] + rng.uniform(0.01, 0.99, (2 * n_bad, 2))) * spot_um
        names = np.concatenate([genes[codes], genes[rng.integers(0, len(genes), n_bad)],
                                np.where(rng.random(n_bad) < 0.5, "NegControlProbe_00042", "BLANK_0013")])
        qv = np.concatenate([qv, rng.uniform(0.0, 19.9, n_bad).astype(np.float32),
                             rng.uniform(20.0, 40.0, n_bad).astype(np.float32)])
        xy = np.vstack([xy, bad_xy])
        order = rng.permutation(len(names))
        pq.write_table(pa.table({
            "transcript_id": np.arange(len(names), dtype=np.uint64), "cell_id": np.full(len(names), "UNASSIGNED"),
            "overlaps_nucleus": np.zeros(len(names), np.uint8), "feature_name": names[order],
            "x_location": xy[order, 0].astype(np.float32), "y_location": xy[order, 1].astype(np.float32),
            "z_location": np.full(len(names), 10.0, np.float32), "qv": qv[order]}), bundle / "transcripts.parquet")
    # cells: each spot's UMIs dealt to cells_per_spot cells inside its square
    cell_rows, cell_xy = [], []
    for i, u in enumerate(umis):
        which = rng.integers(0, cells_per_spot, len(u))
        for c in range(cells_per_spot):
            cell_rows.append(np.bincount(u[which == c], minlength=len(genes)))
            cell_xy.append((squares[i] + rng.uniform(0.05, 0.95, 2)) * spot_um)
    ids = np.array([f"cell{j:06d}-1" for j in range(len(cell_rows))])
    write_10x_h5(bundle / "cell_feature_matrix.h5", sp.csr_matrix(np.vstack(cell_rows)), ids, genes,
                 attrs={"software_version": "xenium-2.0.0.10"})
    cell_xy = np.array(cell_xy)
    pd.DataFrame({"cell_id": ids, "x_centroid": cell_xy[:, 0], "y_centroid": cell_xy[:, 1],
                  "transcript_counts": np.vstack(cell_rows).sum(axis=1)}).to_parquet(bundle / "cells.parquet", index=False)
    stem = bundle.name
    os.symlink(meta["image_path"], bundle.parent / f"{stem}_he_image{Path(meta['image_path']).suffix}")
    if keypoints:  # Xenium Explorer: pairs of H&E pixels (alignment) and morphology-image pixels (fixed)
        he = np.array([[500.0, 700.0], [8000.0, 900.0], [4000.0, 8500.0], [1200.0, 6000.0], [7000.0, 7000.0]])
        px = (np.column_stack([he, np.ones(len(he))]) @ affine.T)[:, :2]  # not microns: Explorer writes pixels
        pd.DataFrame({"fixedX": px[:, 0], "fixedY": px[:, 1], "alignmentX": he[:, 0], "alignmentY": he[:, 1]}).to_csv(
            bundle.parent / f"{stem}_keypoints.csv", index=False)
    else:
        np.savetxt(bundle.parent / f"{stem}_he_imagealignment.csv", affine, delimiter=",", fmt="%.17g")
    return bundle
