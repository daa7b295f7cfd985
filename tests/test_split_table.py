"""The compact split table: the same roles as the role columns it replaces, read one split at a time, old stores read."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from agl.data.splits import ROLE_NAMES, SplitTable, loso_validation, make_splits, role_codes, split_table
from agl.data.store import (ROLE_COLUMNS, SPLIT_TABLE, Store, open_store, read_split_table, write_role_columns,
                            write_split_table)
from agl.errors import ConfigError, DataError

# sha256 of every split's roles of the demo store's spots, as agl before the compact table drew them
# (`make_splits` of main at 938e28d, the demo's split settings; the roles joined by "," per split, splits by "\n")
DEMO_ROLES_SHA256 = "31c995dc219443968a38d860d74af2e9903ccf3e75d625ac953414eeef29cbf6"
DEMO_ROLES_VAL_OUTER_SHA256 = "1189b741e15b84601b2a0a5b84215b637f9ea4f59e77bdb9571ca503ad0d8c63"  # val_outer 0.3


def _roles_sha256(frame: pd.DataFrame) -> str:
    return hashlib.sha256("\n".join(",".join(frame[c]) for c in frame.columns).encode()).hexdigest()


def _settings(store: Store) -> dict:
    s = store.manifest["split_settings"]
    return {"kinds": s["kinds"], "n_folds": s["n_folds"], "seeds": s["seeds"]}


def _store_with(tmp: Path, demo: Store, name: str) -> Path:
    """A folder with the demo's manifest, listing ``name`` as its split file (what the split readers need)."""
    tmp.mkdir()
    manifest = dict(demo.manifest)
    files = {k: v for k, v in manifest["files"].items() if k not in (SPLIT_TABLE, ROLE_COLUMNS)}
    manifest["files"] = {**files, name: "0" * 64}
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    return tmp


def test_demo_roles_equal_in_the_old_and_the_new_format(demo_store, tmp_path) -> None:
    demo = open_store(demo_store)
    table = split_table(demo.spots, **_settings(demo))
    assert table.columns == demo.split_names
    # the compact draws are the draws of before, pinned by their hash (also with val_outer carved)
    assert _roles_sha256(table.to_frame()) == DEMO_ROLES_SHA256
    carved = split_table(demo.spots, **_settings(demo), val_outer_fraction=0.3)
    assert _roles_sha256(carved.to_frame()) == DEMO_ROLES_VAL_OUTER_SHA256
    # the cached demo store (whichever format it was written in) reads the same roles
    for name in demo.split_names:
        assert np.array_equal(demo.split(name).to_numpy(), table[name]), name
    # the old format (splits.parquet, a string column per split) and the new one, side by side
    old = _store_with(tmp_path / "old", demo, ROLE_COLUMNS)
    write_role_columns(table.to_frame(), demo.spots["spot_id"].to_numpy(), old / ROLE_COLUMNS)
    new = _store_with(tmp_path / "new", demo, SPLIT_TABLE)
    write_split_table(table, new / SPLIT_TABLE)
    old_store, new_store = Store(old), Store(new)
    assert old_store.split_file.name == ROLE_COLUMNS and new_store.split_file.name == SPLIT_TABLE
    for name in demo.split_names:
        a, b = old_store.split(name), new_store.split(name)
        assert a.equals(b) and a.name == name, name
        assert np.array_equal(old_store.split_codes(name), new_store.split_codes(name))
        for part in ("train", "val", "test"):
            assert np.array_equal(old_store.rows(name, part), new_store.rows(name, part))
    assert (new / SPLIT_TABLE).stat().st_size < (old / ROLE_COLUMNS).stat().st_size / 3  # 9 vs 30 kB; grows with slides


def test_a_split_reads_only_the_columns_it_derives_from(demo_store, tmp_path) -> None:
    demo = open_store(demo_store)
    path = tmp_path / SPLIT_TABLE
    write_split_table(split_table(demo.spots, **_settings(demo)), path)
    lazy = read_split_table(path, len(demo.spots))
    assert lazy.nbytes() == 0  # opening reads the footer only
    lazy.codes("kfold-s1-f2")
    assert set(lazy._columns) == {"folds:kfold-s1"}
    assert lazy._columns["folds:kfold-s1"].dtype == np.int8
    lazy.codes("loso-C3")
    lazy.codes("loso-B4")
    assert set(lazy._columns) == {"folds:kfold-s1", "slide", "loso_val"}
    assert lazy.nbytes() == len(demo.spots) * (1 + 2 + 1)  # int8 folds, int16 slides, bool mask


def test_structure_on_many_synthetic_slides() -> None:
    """loso from the slide column + one mask, folds from int8 ids: checked against the roles' definitions."""
    rng = np.random.default_rng(1)
    sizes = rng.integers(8, 40, size=300)
    slides = np.repeat([f"S{i}" for i in range(len(sizes))], sizes)
    obs = pd.DataFrame({"slide_id": slides, "pixel_x": rng.uniform(0, 1e4, len(slides)),
                        "pixel_y": rng.uniform(0, 1e4, len(slides))})
    table = split_table(obs, kinds=("kfold", "loso"), seeds=(0, 4))
    n = len(obs)
    assert len(table) == 2 * 5 + 300
    # in memory: int16 slide codes, the bool mask and one int8 fold id per seed, whatever the number of splits
    assert table.nbytes() == n * (2 + 1 + 2)
    val = loso_validation(obs)
    for held in ("S0", "S137", "S299"):
        roles = table[f"loso-{held}"]
        expected = np.where(slides == held, "test", np.where(val, "val", "train"))
        assert np.array_equal(roles.astype(str), expected)
    folds = table.column("folds:kfold-s4")
    for f in range(5):
        codes = table.codes(f"kfold-s4-f{f}")
        assert np.array_equal(codes == ROLE_NAMES.index("test"), folds == f)
        assert np.array_equal(codes == ROLE_NAMES.index("val"), folds == (f + 1) % 5)
    # the table is a mapping of roles, as the split kinds' dicts were (inner folds index it so)
    assert dict(table.items())["loso-S5"].dtype == object and "loso-S5" in table


def test_role_columns_round_trip_and_bad_roles(tmp_path) -> None:
    frame = pd.DataFrame({"a": ["train", "val", "test", "", "val_outer"], "b": ["test"] * 5})
    table = SplitTable.from_roles(frame, 5)
    pd.testing.assert_frame_equal(table.to_frame(), frame.astype(object))
    write_split_table(table, tmp_path / SPLIT_TABLE)
    assert read_split_table(tmp_path / SPLIT_TABLE, 5)["a"].tolist() == frame["a"].tolist()
    with pytest.raises(DataError, match="unknown role"):
        role_codes(["train", "tset"], "x")


@pytest.mark.reliability(kind="bad input", case="split table of other spots",
                         outcome="DataError naming split_table.parquet; nothing read")
def test_a_split_table_that_disagrees_with_the_manifest_is_refused(demo_store, tmp_path) -> None:
    demo = open_store(demo_store)
    folder = _store_with(tmp_path / "store", demo, SPLIT_TABLE)
    write_split_table(split_table(demo.spots.iloc[:-3], **_settings(demo)), folder / SPLIT_TABLE)
    with pytest.raises(DataError, match=r"split_table.parquet.*holds splits of 993 spots, the manifest records 996"):
        Store(folder).split("loso-B4")
    write_split_table(split_table(demo.spots, kinds=("kfold",), seeds=(0,)), folder / SPLIT_TABLE)
    with pytest.raises(DataError, match=r"split_table.parquet.*holds no split"):
        Store(folder).split("kfold-s0-f0")
    with pytest.raises(ConfigError, match="split_table.parquet.*unknown split 'kfold-s9-f9'"):
        Store(folder).split("kfold-s9-f9")


def test_new_stores_are_compact_and_pass_their_integrity_checks(small_store, tmp_path) -> None:
    from agl.data.integrity import check_store_files

    folder = Path(shutil.copytree(small_store, tmp_path / "store"))
    assert (folder / SPLIT_TABLE).is_file() and not (folder / ROLE_COLUMNS).exists()
    store = open_store(folder, verify=True)
    assert SPLIT_TABLE in store.manifest["files"]
    assert check_store_files(store, full=True)["hashed"] == len(store.manifest["files"])
    expected = make_splits(store.spots, **_settings(store))
    for name in store.split_names:
        assert np.array_equal(store.split(name).to_numpy(), expected[name].to_numpy()), name
    raw = (folder / SPLIT_TABLE).read_bytes()
    (folder / SPLIT_TABLE).write_bytes(raw[:-9] + bytes([raw[-9] ^ 1]) + raw[-8:])
    with pytest.raises(DataError, match="split_table.parquet.*sha256 differs"):
        check_store_files(open_store(folder), full=True)
