"""A reader added in one module: a toy format (``counts.csv``, ``spots.csv``, ``slide.json``, ``image.jpg`` in one
folder per slide, several slide folders side by side), registered on import. Nothing else in agl names it.

Importing this module is all it takes for ``read_slides("toy-csv", ...)``, ``SlideSource`` (streaming ingest, one
slide folder per unit) and ``agl ingest``'s reader options to know it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from agl.data.readers import SlideData, assemble, counts_to_csr, register_reader
from agl.errors import DataError


def _slides(root: Path, **_: object) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "slide.json").is_file())


@register_reader("toy-csv", subset="slides", list_units=_slides, help="toy: one folder of CSV tables per slide")
def read_toy(root: str | Path, slides: Sequence[str] | None = None) -> ad.AnnData:
    root = Path(root)
    out = []
    for sid in slides or _slides(root):
        folder = root / sid
        if not (folder / "slide.json").is_file():
            raise DataError(folder, "missing slide.json")
        meta = json.loads((folder / "slide.json").read_text())
        counts = pd.read_csv(folder / "counts.csv", index_col=0)
        spots = pd.read_csv(folder / "spots.csv", index_col=0).loc[counts.index]
        pixels = spots[["x_um", "y_um"]].to_numpy(np.float64) / meta["microns_per_pixel"]
        out.append(SlideData(sid, counts_to_csr(counts.to_numpy(), folder / "counts.csv"), list(counts.columns),
                             counts.index.to_numpy(dtype=str), pixels,
                             {"image_path": str((folder / "image.jpg").absolute()),
                              "microns_per_pixel": meta["microns_per_pixel"], "spot_diameter_um": 100.0,
                              "source_format": "toy-csv",
                              "source_files": [str((folder / n).absolute()) for n in ("counts.csv", "spots.csv")]},
                             source=str(folder / "counts.csv")))
    return assemble(out)
