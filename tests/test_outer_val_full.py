"""``outer_val: full`` (DkGSB's features-mode default) on the real demo store: the outer-validation part is one
batch of its inputs and its primary genes' targets only (every hypergradient estimator's outer loss reads the
primary genes alone), and the run is identical to one that loads every model output's targets."""
from __future__ import annotations

import numpy as np
import pytest

from agl.data.store import open_store
from agl.training.bundles import make_bundle
from agl.training.loop import fit
from trainkit import first_split, small_config, use_cheap_features


class Recorded:
    """A bundle that records the columns asked of its outer-validation part; ``widen``: hands back every
    model output's targets whatever was asked (what the full outer part held before)."""

    def __init__(self, bundle, n_out: int | None = None):
        self._bundle, self._n_out, self.asked = bundle, n_out, []

    def __getattr__(self, name):
        return getattr(self._bundle, name)

    def eval_arrays(self, part, n_columns=None):
        self.asked.append((part, n_columns))
        return self._bundle.eval_arrays(part, n_columns=self._n_out or n_columns)


@pytest.mark.parametrize("hypergrad", ["unroll", "ift_cg"])
def test_full_outer_part_holds_only_primary_targets_and_trains_the_same(demo_store, monkeypatch, hypergrad) -> None:
    use_cheap_features(monkeypatch)
    store = open_store(demo_store)
    split = first_split(store)
    cfg = small_config(method="dkgsb", epochs=2, outer_val="full", hypergrad=hypergrad, outer_steps=2)
    primary = Recorded(make_bundle(store, split, cfg))
    n_primary, n_genes = primary.n_primary, len(primary.genes)
    assert n_genes > 10 * n_primary  # DkGSB's model outputs every gene of the split
    narrow = fit(cfg, primary)
    wide = Recorded(make_bundle(store, split, cfg), n_out=n_genes)
    widened = fit(cfg, wide)
    outer = [n for part, n in primary.asked if part in ("val", "val_outer")]
    assert outer and set(outer) == {n_primary}  # part x primary genes, not part x every output
    assert [h["train_loss"] for h in narrow.history] == [h["train_loss"] for h in widened.history]
    np.testing.assert_array_equal(narrow.weights, widened.weights)  # the same gate after the same outer steps
    assert narrow.test["pcc"] == widened.test["pcc"]
