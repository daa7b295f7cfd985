"""Command-line options of ``agl study`` (kept apart from :mod:`agl.evaluation.study` so that
building the parser imports no numpy or pandas)."""
from __future__ import annotations

import argparse

from agl.cli import add_list_arg


def add_study_args(p: argparse.ArgumentParser) -> None:
    """``--quick``, the plan (panels, protocols, seeds, k, epochs), where to write, ``--overwrite``."""
    p.add_argument("--quick", action="store_true",
                   help="a small study to try it: seeds 0,1 (kfold: seed 0, folds 0,1), k 500,4000, 12 epochs, "
                        "patience 4; any option below overrides it")
    add_list_arg(p, "--panels", default=["seurat", "detected"], metavar="PANEL",
                 help="primary-gene panels: seurat (the store's top 50) and/or detected (top 50 among genes "
                      "detected in --min-detection of the training spots)")
    add_list_arg(p, "--protocols", default=["loso", "kfold"], metavar="PROTOCOL", help="loso and/or kfold")
    add_list_arg(p, "--seeds", item=int, default=None, help="training seeds of leave-one-slide-out (full: 0-4)")
    add_list_arg(p, "--kfold-seeds", item=int, default=None,
                 help="split (and training) seeds of the 5-fold protocol; the demo store has 0, 1, 2 (full: all three)")
    add_list_arg(p, "--folds", item=int, default=None, help="only these folds of the 5-fold protocol (full: all)")
    add_list_arg(p, "--slides", default=None, metavar="SLIDE", help="only these held-out slides of leave-one-slide-out")
    add_list_arg(p, "--ks", item=int, default=None, help="k of the top-k / random-k curve (full: 250 ... 8000; "
                                                          "'all' is AGL-all, always run)")
    p.add_argument("--epochs", type=int, default=None, help="epoch budget per run (full: 30; runs stop earlier by --patience)")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience (full: 10)")
    p.add_argument("--min-detection", type=float, default=0.3, metavar="FRACTION",
                   help="detection rate of the 'detected' panel's primary genes")
    p.add_argument("--out", default="docs/results.md", help="the Markdown page; its study block is replaced, "
                                                            "text outside the block kept")
    p.add_argument("--figures", default=None, help="folder for the figures (default: 'figures' beside --out)")
    p.add_argument("--work", default="results/study", help="folder of the evaluation grids (reused to resume)")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (one core each)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the page from the runs already finished in --work (e.g. after an "
                        "interrupted study), saying how much of each grid that is")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a page without a study block, or a block made with other settings")
