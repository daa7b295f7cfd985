"""Dihedral augmentation and the loaders over a real her2st store."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from agl.data.augment import dihedral, dihedral_batch, dihedral_chw, dihedral_inverse
from agl.data.loaders import (IMAGENET_MEAN, IMAGENET_STD, PatchDataset, load_views, iter_patch_batches,
                              normalise_uint8, ray_dataset)
from agl.data.store import open_store


@pytest.fixture(scope="module")
def store(small_store):
    return open_store(small_store)


@pytest.fixture(scope="module")
def patch(store) -> np.ndarray:
    return np.asarray(store.patches[0])  # a real, asymmetric H&E patch


def test_eight_distinct_views_and_inverses(patch):
    views = [dihedral(patch, k) for k in range(8)]
    assert len({v.tobytes() for v in views}) == 8
    for k in range(8):
        assert np.array_equal(dihedral(views[k], dihedral_inverse(k)), patch)
    # the definition: rotate by 90*(k%4) counter-clockwise, then flip left-right if k >= 4
    assert np.array_equal(views[1], np.rot90(patch)) and np.array_equal(views[4], patch[:, ::-1])
    assert np.array_equal(views[6], np.rot90(patch, 2)[:, ::-1])


def test_views_form_a_group(patch):
    """Composing two views is again one of the 8 views (closure)."""
    views = {dihedral(patch, k).tobytes(): k for k in range(8)}
    for a, b in itertools.product(range(8), repeat=2):
        assert dihedral(dihedral(patch, a), b).tobytes() in views


def test_numpy_and_torch_agree(patch):
    chw = torch.from_numpy(patch.copy()).permute(2, 0, 1)
    for k in range(8):
        assert np.array_equal(dihedral(chw, k).permute(1, 2, 0).numpy(), dihedral(patch, k))
    batch = torch.stack([chw] * 8)
    ks = torch.tensor([3, 0, 7, 1, 5, 5, 2, 4])
    out = dihedral_batch(batch, ks)
    for i, k in enumerate(ks.tolist()):
        assert torch.equal(out[i], dihedral(chw, k))
    with pytest.raises(ValueError):
        dihedral(patch, 8)


def test_dihedral_chw_is_the_same_view_in_chw(store):
    batch = np.asarray(store.patches[:3])
    for k in range(8):
        view = dihedral_chw(batch[0], k)
        assert np.shares_memory(view, batch) and view.shape == (3, 32, 32)  # a view, no copy
        assert np.array_equal(view, dihedral(batch[0], k).transpose(2, 0, 1))
        assert np.array_equal(dihedral_chw(batch, k), np.moveaxis(dihedral(batch, k), -1, -3))


def _torchvision_reference(patch: np.ndarray, k: int) -> torch.Tensor:
    """What the naive loader computes for view k: ToTensor then Normalize (torchvision)."""
    from torchvision.transforms import functional as TF

    return TF.normalize(TF.to_tensor(dihedral(patch, k).copy()), IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("k", range(8))
def test_load_views_matches_per_item_for_every_view(store, k):
    idx = np.array([1, 4, 5, 9, 20, 33])
    ks = np.array([k, (k + 3) % 8, k, 7 - k, k, (k + 5) % 8])
    out = load_views(store.patches, idx, ks)
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    out8 = load_views(store.patches, idx, ks, normalise=False)
    assert out8.dtype == torch.uint8 and out8.is_contiguous()
    for i, (r, kk) in enumerate(zip(idx, ks)):
        chw = np.ascontiguousarray(dihedral(store.patches[r], int(kk)).transpose(2, 0, 1))
        assert np.array_equal(out8[i].numpy(), chw)
        # bit-identical to the previous path (view, transpose, then normalise_uint8) ...
        assert torch.equal(out[i], normalise_uint8(chw))
        # ... and to torchvision's ToTensor + Normalize of the same view (the naive loader) up to rounding
        torch.testing.assert_close(out[i], _torchvision_reference(store.patches[r], int(kk)), rtol=0, atol=1e-6)
    # no augmentation is view 0; a given ``out`` array is filled in place
    buf = np.full((6, 3, 32, 32), np.nan, dtype=np.float32)
    plain = load_views(store.patches, idx, None, out=buf)
    assert np.shares_memory(plain.numpy(), buf)
    assert torch.equal(plain, load_views(store.patches, idx, np.zeros(6, dtype=np.int64)))
    with pytest.raises(ValueError, match="out must be"):
        load_views(store.patches, idx, ks, out=np.empty((6, 32, 32, 3), dtype=np.float32))


def test_normalisation_is_imagenet():
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
    ref = (torch.from_numpy(x).float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(normalise_uint8(x), ref, rtol=1e-5, atol=1e-5)


def test_patch_dataset(store):
    gs = store.gene_set("kfold-s0-f0")
    cols = gs["column"].to_numpy()[:60]
    rows = store.rows("kfold-s0-f0", "train")
    ds = PatchDataset(store, rows, cols, augment=5)
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.float32
    np.testing.assert_array_equal(y.numpy(), store.expression[rows[3], cols])
    expected = normalise_uint8(np.ascontiguousarray(dihedral(store.patches[rows[3]], 5).transpose(2, 0, 1)))
    torch.testing.assert_close(x, expected)
    assert len(ds) == len(rows)
    xb, yb = next(iter(torch.utils.data.DataLoader(PatchDataset(store, rows, cols, augment=True), batch_size=4)))
    assert xb.shape == (4, 3, 32, 32) and yb.shape == (4, 60)


def test_iter_patch_batches(store):
    gs = store.gene_set("kfold-s0-f0")
    cols = gs["column"].to_numpy()
    rows = store.rows("kfold-s0-f0", "train")
    plain = list(iter_patch_batches(store, rows, cols, 64, augment=False, seed=0, epoch=0))
    assert sum(len(x) for x, _ in plain) == len(rows)
    assert [len(x) for x, _ in iter_patch_batches(store, rows, cols, 64, False, drop_last=True)] == [64] * (len(rows) // 64)
    # every training row exactly once; y and x belong to the same spot
    seen = []
    table = store.expression[rows][:, cols]
    for x, y in plain:
        assert x.shape[1:] == (3, 32, 32) and y.shape[1] == len(cols) and x.is_contiguous()
        match = [np.flatnonzero((table == yi.numpy()).all(1)) for yi in y]
        seen.extend(rows[m[0]] for m in match)
        for xi, m in zip(x, match):
            torch.testing.assert_close(xi, normalise_uint8(store.patches[rows[m[0]]].transpose(2, 0, 1).copy()))
    assert sorted(seen) == sorted(rows.tolist())
    # reproducible per (seed, epoch), different across epochs
    a = next(iter_patch_batches(store, rows, cols, 64, True, seed=1, epoch=2))
    b = next(iter_patch_batches(store, rows, cols, 64, True, seed=1, epoch=2))
    c = next(iter_patch_batches(store, rows, cols, 64, True, seed=1, epoch=3))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], c[1])


def test_augmented_batches_are_views_of_the_same_patches(store):
    rows = store.rows("kfold-s0-f0", "val")
    x_plain, y_plain = next(iter_patch_batches(store, rows, None, 16, augment=False, shuffle=False))
    x_aug, y_aug = next(iter_patch_batches(store, rows, None, 16, augment=True, shuffle=False, seed=3))
    assert torch.equal(y_plain, y_aug)
    n_changed = 0
    for p, a in zip(x_plain, x_aug):
        candidates = [dihedral(p, k) for k in range(8)]
        assert any(torch.equal(a, c) for c in candidates)
        n_changed += not torch.equal(a, p)
    assert n_changed > 8  # most items got a non-identity view


def test_batch_memory_is_recycled_only_when_released(store):
    """Dropped batches lend their memory to later ones; kept batches (or views of them) never change."""
    rows = store.rows("kfold-s0-f0", "train")
    batches = iter_patch_batches(store, rows, None, 16, augment=True, seed=4)
    kept, kept_copy = [], []
    for i, (x, _) in enumerate(batches):
        if i < 3:  # keep a view of the first three batches only
            kept.append(x[1:3])
            kept_copy.append(x[1:3].clone())
        if i == 6:
            break
    for view, copy in zip(kept, kept_copy):
        assert torch.equal(view, copy)
    # a consumer that drops each batch gets two alternating arrays (no fresh 77 MB per batch at 224 px)
    pointers = [x.data_ptr() for x, _ in itertools.islice(iter_patch_batches(store, rows, None, 16, seed=4), 6)]
    assert len(set(pointers)) == 2
    # the contents do not depend on recycling
    fresh = [x.clone() for x, _ in iter_patch_batches(store, rows, None, 16, seed=4)]
    for (x, _), ref in zip(iter_patch_batches(store, rows, None, 16, seed=4), fresh, strict=True):
        assert torch.equal(x, ref)


def test_ray_dataset(store):
    ray = pytest.importorskip("ray")
    from agl.distributed.runtime import init_ray

    init_ray(num_cpus=1)  # local, on 127.0.0.1 only
    try:
        test_rows = store.rows("loso-C3", "test")
        rows, n = [], 0
        for batch in ray_dataset(store, "loso-C3", "test").iter_batches(batch_size=50, batch_format="numpy"):
            assert batch["patch"].shape[1:] == (32, 32, 3) and batch["expression"].dtype == np.float32
            assert np.array_equal(batch["patch"], store.patches[batch["row"]])
            assert np.array_equal(batch["expression"], store.expression[batch["row"]])
            rows.extend(batch["row"].tolist())
        assert sorted(rows) == test_rows.tolist()
        only = ray_dataset(store, "kfold-s0-f0", "val", columns=("expression",)).take_batch(3)
        assert list(only) == ["expression"]
    finally:
        ray.shutdown()



@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cuda", torch.uint8)])
def test_fine_tune_batches_stay_uint8_for_an_accelerator(store, device, dtype):
    """uint8 is the default where the model normalises on its device; the Estimator's result is the same."""
    from agl.config import TrainConfig
    from agl.models import Estimator
    from agl.training.bundles import PatchInputs

    inputs = PatchInputs(store, TrainConfig(mode="finetune", device=device))
    rows, views = np.array([3, 0, 5]), np.array([1, 0, 6])
    x = inputs.batch(rows, views)
    assert x.dtype == dtype
    reference = load_views(store.patches, rows, views)  # normalised float32 on the CPU
    expected = reference if dtype == torch.float32 else normalise_uint8(x)
    assert torch.equal(expected, reference)
    torch.manual_seed(0)
    c, h, w = x.shape[1:]
    model = Estimator(c * h * w, 4, trunk=(3,), dropout=0.0, backbone=torch.nn.Flatten()).eval()
    assert torch.allclose(model(x), model(reference), atol=1e-6)
