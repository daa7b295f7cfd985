"""Bad input across the whole command line: slide data, stores, search spaces and configs, CLI
arguments, checkpoints and MLflow. Each case runs one real ``agl`` command and checks that it
exits non-zero, that stderr names the file or field and the problem (no traceback), and that the
work folder is byte-for-byte as before: no partial output, nothing overwritten.

Cases are rows of ``CASES``; each becomes a test and a row of docs/reliability.md.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

from agl.cli import main
from layouts import cut_her2st, write_counts
from servers import free_port
from trainkit import small_config, use_cheap_features

SPLIT = "kfold-s0-f0"


@dataclass
class Ctx:
    """Inputs a case may corrupt (fresh copies in ``root``) and where it may be asked to write."""

    root: Path
    her2st_src: Path
    small_store: Path
    checkpoint: Path
    demo_store: Path

    def her2st(self) -> Path:
        """A small real her2st release (C2: 30 spots x 300 genes, the real image) to corrupt."""
        return cut_her2st(self.her2st_src, self.root / "her2st", "C2")

    def store(self) -> Path:
        """A writable copy of a small real store (her2st C2 + C3, 32 px patches)."""
        return Path(shutil.copytree(self.small_store, self.root / "store"))

    def ckpt(self) -> Path:
        return Path(shutil.copytree(self.checkpoint, self.root / "ckpt"))

    def space(self, text: str) -> Path:
        path = self.root / "space.yaml"
        path.write_text(text)
        return path

    def ingest(self, src: Path) -> list[str]:
        return ["ingest", "her2st", str(src), "--sections", "C2", "--out", str(self.root / "out"),
                "--patch-px", "32", "--seeds", "0", "--splits", "kfold"]

    def predict(self, ckpt: Path, *extra: str) -> list[str]:
        return ["predict", "--checkpoint", str(ckpt), "--input", str(self.her2st_src), "--format", "her2st",
                "--sections", "C2", "--out", str(self.root / "pred"), *extra]

    def train(self, *extra: str) -> list[str]:
        return ["train", "--store", str(self.demo_store), "--method", "dkgsb", "--split", SPLIT, "--out", str(self.root / "run"),
                "--set", "trunk=[16]", "--set", "weights=null", "--set", "epochs=1", *extra]


@dataclass
class Case:
    id: str
    kind: str           # the surface: slide data, store, search space, train config, CLI, checkpoint, MLflow
    case: str           # what was given
    build: Callable[[Ctx], list[str]]  # corrupts inputs under ctx.root, returns the agl argv
    names: Callable[[Ctx], str] | str  # the file or field the message must name
    problem: str        # regex the message must match


def _counts(src: Path) -> Path:
    return src / "ST-cnts" / "C2.tsv.gz"


def _spots(src: Path) -> Path:
    return src / "ST-spotfiles" / "C2_selection.tsv"


def _edit_counts(src: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    table = pd.read_csv(_counts(src), sep="\t", index_col=0)
    write_counts(edit(table), _counts(src))


def _edit_spots(src: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
    edit(pd.read_csv(_spots(src), sep="\t")).to_csv(_spots(src), sep="\t", index=False)
    return src


def _set(table: pd.DataFrame, value: object) -> pd.DataFrame:
    table = table.astype(object)
    table.iloc[1, 2] = value
    return table


def _image(src: Path) -> Path:
    return next((src / "ST-imgs" / "C" / "C2").glob("*.jpg"))


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.unlink()  # may be a symlink to the real file: never write through it
    path.write_bytes(data[: max(8, int(len(data) * keep))])
    return path


def _manifest(store: Path, edit: Callable[[dict], None]) -> Path:
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return path


class _Detonator:
    """Unpickling this would create the file ``target`` (it must never happen)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _pickle_bombs(ctx: Ctx) -> list[str]:
    """A checkpoint whose weight files are pickles that would create ``DETONATED`` when unpickled."""
    ckpt = ctx.ckpt()
    for name in ("model.safetensors", "best.safetensors"):
        (ckpt / name).write_bytes(pickle.dumps(_Detonator(ctx.root.parent / "DETONATED")))
    return ctx.predict(ckpt)


def _with_state(ckpt: Path, **changes: object) -> Path:
    state = ckpt / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), **changes}))
    return ckpt


def _other_split_checkpoint(ctx: Ctx) -> list[str]:
    run = ctx.root / "run"
    run.mkdir()
    shutil.copytree(ctx.checkpoint, run / "checkpoint")
    return ["train", "--store", str(ctx.demo_store), "--method", "dkgsb", "--split", "kfold-s0-f1", "--out", str(run), "--resume",
            "--set", "trunk=[16]", "--set", "weights=null", "--set", "epochs=2"]


def _other_backbone_checkpoint(ctx: Ctx) -> list[str]:
    run = ctx.root / "run"
    run.mkdir()
    shutil.copytree(ctx.checkpoint, run / "checkpoint")
    return ["train", "--store", str(ctx.demo_store), "--method", "dkgsb", "--split", SPLIT, "--out", str(run), "--resume",
            "--set", "trunk=[16]", "--set", "weights=null", "--set", "epochs=2", "--set", "backbone=timm/resnet18"]


def _finished_run(ctx: Ctx) -> list[str]:
    run = ctx.root / "run"
    run.mkdir()
    (run / "result.json").write_text('{"earlier": "result"}\n')
    return ctx.train()


def _closed_port_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


GOOD_SPACE = """split: kfold-s0-f0
num_samples: 2
fixed: {mode: features, epochs: 2}
params:
  method: {type: categorical, choices: [dkgsb, topk]}
  lr: {type: float, low: 5.0e-4, high: 3.0e-3, log: true}
"""


def _tune(ctx: Ctx, space: str, *extra: str) -> list[str]:
    return ["tune", "--space", str(ctx.space(space)), "--store", str(ctx.small_store), "--out",
            str(ctx.root / "sweep"), *extra]


CASES = [
    # ---- slide data (agl ingest her2st)
    Case("her2st-missing-counts", "slide data", "her2st section without its counts file",
         lambda c: (_counts(s := c.her2st()).unlink(), c.ingest(s))[1], lambda c: str(_counts(c.root / "her2st")),
         "missing counts file"),
    Case("her2st-missing-spots", "slide data", "her2st section without its spot file",
         lambda c: (_spots(s := c.her2st()).unlink(), c.ingest(s))[1], lambda c: str(_spots(c.root / "her2st")),
         "missing spot file"),
    Case("her2st-missing-image", "slide data", "her2st section without its H&E image",
         lambda c: (_image(s := c.her2st()).unlink(), c.ingest(s))[1], "ST-imgs/C/C2", "missing image"),
    Case("her2st-truncated-image", "slide data", "truncated H&E JPEG",
         lambda c: (_truncate(_image(s := c.her2st()), 0.3), c.ingest(s))[1], ".jpg", "unreadable or corrupt image"),
    Case("her2st-non-numeric-counts", "slide data", "a count that is not a number ('abc')",
         lambda c: (_edit_counts(s := c.her2st(), lambda t: _set(t, "abc")), c.ingest(s))[1],
         lambda c: str(_counts(c.root / "her2st")), "non-numeric counts"),
    Case("her2st-negative-counts", "slide data", "a negative count",
         lambda c: (_edit_counts(s := c.her2st(), lambda t: _set(t, -3)), c.ingest(s))[1],
         lambda c: str(_counts(c.root / "her2st")), "negative"),
    Case("her2st-duplicate-genes", "slide data", "two columns with the same gene symbol",
         lambda c: (_edit_counts(s := c.her2st(), lambda t: t.set_axis([t.columns[0], *t.columns[:-1]], axis=1)),
                    c.ingest(s))[1], lambda c: str(_counts(c.root / "her2st")), "duplicate gene symbols"),
    Case("her2st-duplicate-barcodes", "slide data", "the same spot twice in the spot file",
         lambda c: c.ingest(_edit_spots(c.her2st(), lambda t: pd.concat([t, t.iloc[[0]]]))),
         lambda c: str(_spots(c.root / "her2st")), "duplicate spot barcodes"),
    Case("her2st-spot-outside-image", "slide data", "a spot centre beyond the image border",
         lambda c: c.ingest(_edit_spots(c.her2st(), lambda t: t.assign(pixel_x=t["pixel_x"].where(t.index != 0, 1e7)))),
         ".jpg", "outside the"),
    # ---- stores (agl info / agl train --store)
    Case("store-truncated-parquet", "store", "a truncated Parquet file (the splits table)",
         lambda c: ["info", str(_truncate((s := c.store()) / "split_table.parquet").parent)],
         lambda c: str(c.root / "store" / "split_table.parquet"), "not a readable Parquet file"),
    Case("store-truncated-partition", "store", "a truncated Parquet spot partition, opened for training",
         lambda c: (_truncate(next((s := c.store()).glob("spots/slide_id=C2/part-0.parquet"))),
                    ["train", "--store", str(s), "--method", "pgl", "--split", SPLIT, "--out", str(c.root / "run")])[1],
         "slide_id=C2/part-0.parquet", "not a readable Parquet file|sha256 differs"),
    Case("store-hash-mismatch", "store", "a store file changed after ingest (sha256 differs from the manifest)",
         lambda c: ((lambda f: f.write_bytes(f.read_bytes()[:-1] + b"\0"))((s := c.store()) / "genes.parquet"),
                    ["info", str(s), "--verify"])[1], lambda c: str(c.root / "store" / "genes.parquet"),
         "sha256 differs from manifest.json"),
    Case("store-unlisted-file", "store", "a data file dropped into the store that the manifest does not list",
         lambda c: ((s := c.store()).joinpath("gene_sets", "extra.parquet").write_bytes(b"x"),
                    ["info", str(s), "--verify"])[1], "gene_sets/extra.parquet", "not listed in manifest.json"),
    Case("store-foreign-schema", "store", "a store of another schema version",
         lambda c: ["info", str(_manifest(c.store(), lambda m: m.update(schema_version=99)).parent)],
         "manifest.json", "schema_version 99 is not supported"),
    Case("store-manifest-not-json", "store", "a truncated manifest.json",
         lambda c: ["info", str(_truncate(c.store() / "manifest.json").parent)], "manifest.json",
         "unreadable manifest"),
    Case("store-path-escape", "store", "a manifest listing '../outside.txt'",
         lambda c: ["info", str(_manifest(c.store(), lambda m: m["files"].update({"../outside.txt": "0" * 64})).parent),
                    "--verify"], "manifest.json", "'../outside.txt' escapes the store folder"),
    Case("store-split-escape", "store", "a manifest naming a split '../../etc/x'",
         lambda c: ["info", str(_manifest(c.store(), lambda m: m["splits"].append("../../etc/x")).parent)],
         "manifest.json", "are not plain file names"),
    Case("store-missing-array", "store", "the memory-mapped expression array deleted",
         lambda c: (((s := c.store()) / "arrays" / "expression.arrow").unlink(),
                    ["train", "--store", str(s), "--method", "pgl", "--split", SPLIT, "--out", str(c.root / "run")])[1],
         "arrays/expression.arrow", "missing"),
    Case("store-not-a-store", "store", "--store pointing at a folder that is not a store",
         lambda c: ["train", "--store", str(c.root), "--method", "pgl", "--split", SPLIT, "--out", str(c.root / "run")],
         "manifest.json", "not an agl store"),
    # ---- search spaces (agl tune --space FILE)
    Case("space-unknown-key", "search space", "a search-space YAML with an unknown top-level key",
         lambda c: _tune(c, GOOD_SPACE + "sampler: tpe\n"), "space.yaml", "sampler"),
    Case("space-unknown-param", "search space", "a parameter that is not a TrainConfig field",
         lambda c: _tune(c, GOOD_SPACE + "  lrr: {type: float, low: 0.1, high: 0.2}\n"), "space.yaml", "lrr"),
    Case("space-bad-range", "search space", "a range with low >= high",
         lambda c: _tune(c, GOOD_SPACE.replace("low: 5.0e-4, high: 3.0e-3", "low: 0.2, high: 0.1")),
         "params.lr", r"low \(0.2\) must be < high \(0.1\)"),
    Case("space-log-nonpositive", "search space", "a log-scale range starting at 0",
         lambda c: _tune(c, GOOD_SPACE.replace("low: 5.0e-4", "low: 0.0")), "params.lr", "log"),
    Case("space-wrong-type", "search space", "a fixed setting of the wrong type (epochs: ten)",
         lambda c: _tune(c, GOOD_SPACE.replace("epochs: 2", "epochs: ten")), "epochs", "int|integer"),
    Case("space-bad-choice", "search space", "a categorical choice that is not a method",
         lambda c: _tune(c, GOOD_SPACE.replace("[dkgsb, topk]", "[dkgsb, magic]")), "method", "magic"),
    Case("space-not-yaml", "search space", "a search space that is not valid YAML",
         lambda c: _tune(c, "params: {method: [unclosed\n"), "space.yaml", "YAML"),
    Case("space-quoted-number", "search space", "a bound written as a quoted number ('5e-4', a string)",
         lambda c: _tune(c, GOOD_SPACE.replace("5.0e-4", "'5e-4'")), "params.lr", "string '5e-4'.*without quotes"),
    # ---- training settings (agl train --config / --set)
    Case("config-unknown-key", "train config", "a config file with an unknown setting",
         lambda c: c.train("--config", str((c.root / "cfg.yaml", (c.root / "cfg.yaml").write_text("lrate: 0.1\n"))[0])),
         "cfg.yaml", "lrate"),
    Case("config-wrong-type", "train config", "--set lr=abc", lambda c: c.train("--set", "lr=abc"), "lr", "abc|number|float"),
    Case("config-out-of-range", "train config", "--set epochs=0", lambda c: c.train("--set", "epochs=0"), "epochs",
         ">= 1|at least|positive"),
    Case("config-not-a-mapping", "train config", "a config file holding a list",
         lambda c: c.train("--config", str((c.root / "cfg.yaml", (c.root / "cfg.yaml").write_text("- 1\n- 2\n"))[0])),
         "cfg.yaml", "mapping"),
    # ---- command-line arguments
    Case("cli-unknown-split", "CLI", "--split that the store does not have",
         lambda c: ["train", "--store", str(c.small_store), "--method", "pgl", "--split", "kfold-s9-f9", "--out", str(c.root / "run")],
         "split_table.parquet", "unknown split 'kfold-s9-f9'"),
    Case("cli-num-samples-zero", "CLI", "agl tune --num-samples 0",
         lambda c: _tune(c, GOOD_SPACE, "--num-samples", "0"), "--num-samples", ">= 1"),
    Case("cli-bad-trainer", "CLI", "agl tune --trainer bogus (argparse)",
         lambda c: _tune(c, GOOD_SPACE, "--trainer", "bogus"), "--trainer", "invalid choice"),
    Case("cli-sections-wrong-format", "CLI", "agl predict --sections with --format visium",
         lambda c: ["predict", "--checkpoint", str(c.checkpoint), "--input", str(c.root), "--format", "visium",
                    "--sections", "C2", "--out", str(c.root / "pred")], "--sections", "only for formats"),
    Case("cli-finished-run-kept", "CLI", "agl train into a folder holding a finished run (no --overwrite)",
         _finished_run, "run/result.json", "exists; pass --overwrite"),
    Case("cli-bad-set-syntax", "CLI", "--set without '=' ", lambda c: c.train("--set", "epochs"), "--set",
         "must look like key=value"),
    # ---- checkpoints (agl predict --checkpoint / agl train --resume)
    Case("ckpt-truncated-weights", "checkpoint", "a truncated best.safetensors",
         lambda c: c.predict(_truncate(c.ckpt() / "best.safetensors").parent), "best.safetensors",
         "not a readable safetensors file"),
    Case("ckpt-corrupt-config", "checkpoint", "config.json that is not JSON",
         lambda c: c.predict(_truncate(c.ckpt() / "config.json", 0.4).parent), "config.json", "not valid JSON"),
    Case("ckpt-missing-genes", "checkpoint", "a checkpoint without genes.parquet",
         lambda c: (((k := c.ckpt()) / "genes.parquet").unlink(), c.predict(k))[1], "genes.parquet", "missing"),
    Case("ckpt-pickle-bomb", "checkpoint", "a malicious pickle saved as model.safetensors and best.safetensors",
         _pickle_bombs, ".safetensors", "not a readable safetensors file"),
    Case("ckpt-other-gene-set", "checkpoint", "resuming with a checkpoint trained on another split's gene set",
         _other_split_checkpoint, "config.json", "split is 'kfold-s0-f0' there but 'kfold-s0-f1' here"),
    Case("ckpt-other-backbone", "checkpoint", "resuming with a checkpoint of another backbone",
         _other_backbone_checkpoint, "config.json", "backbone is 'torchvision/mobilenet_v2' there but 'timm/resnet18' here"),
    Case("ckpt-future-format", "checkpoint", "a checkpoint of an unknown format version",
         lambda c: c.predict(_with_state(c.ckpt(), format=7)),
         "state.json", "unsupported checkpoint format 7"),
    # ---- MLflow
    Case("mlflow-unreachable-tune", "MLflow", "agl tune --tracking-uri of a server that is not running",
         lambda c: _tune(c, GOOD_SPACE, "--tracking-uri", _closed_port_uri()), "--tracking-uri", "unreachable"),
    Case("mlflow-unreachable-predict", "MLflow", "agl predict from the champion of an unreachable server",
         lambda c: ["predict", "--tracking-uri", _closed_port_uri(), "--input", str(c.her2st_src), "--format",
                    "her2st", "--sections", "C2", "--out", str(c.root / "pred")], "--tracking-uri", "unreachable"),
    Case("mlflow-file-store", "MLflow", "agl tune --tracking-uri of a plain folder (MLflow 3 file store)",
         lambda c: _tune(c, GOOD_SPACE, "--tracking-uri", str(c.root / "mlruns")), "--tracking-uri", "file store"),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (hidden temporary ones too) with a file's size and modification time."""
    return {p.relative_to(root).as_posix(): (p.lstat().st_size, p.lstat().st_mtime_ns) if p.is_file() else (-1, -1)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def checkpoint(demo_store, tmp_path_factory) -> Path:
    """A real one-epoch DkGSB checkpoint on the demo store (cheap colour features, trunk [16])."""
    from agl.training.bundles import make_bundle
    from agl.training.loop import fit

    mp = pytest.MonkeyPatch()
    use_cheap_features(mp)
    try:
        cfg = small_config(epochs=1)
        out = tmp_path_factory.mktemp("ckpt")
        fit(cfg, make_bundle(demo_store, SPLIT, cfg), out_dir=out)
    finally:
        mp.undo()
    return out / "checkpoint"


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=pytest.mark.reliability(
        kind="bad input", case=f"{c.kind}: {c.case}",
        outcome=f"exit != 0; message names {c.names if isinstance(c.names, str) else 'the file'} "
                f"and says /{c.problem}/; nothing written or changed"))
    for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, her2st_dir: Path, small_store: Path, checkpoint: Path,
                                      demo_store: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    use_cheap_features(monkeypatch)  # training cases never need the CNN feature cache
    monkeypatch.chdir(tmp_path)      # commands that default to ./results write nowhere else
    work = tmp_path / "work"
    work.mkdir()
    ctx = Ctx(root=work, her2st_src=her2st_dir, small_store=small_store, checkpoint=checkpoint,
              demo_store=demo_store)
    argv = case.build(ctx)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code not in (0, None), f"{case.id}: exit {code}"
    names = case.names(ctx) if callable(case.names) else case.names
    assert names in err, f"{case.id}: {names!r} not named in: {err}"
    assert re.search(case.problem, err), f"{case.id}: /{case.problem}/ not in: {err}"
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before, f"{case.id}: files were written or changed"
    assert not (tmp_path / "DETONATED").exists(), "a pickle was executed"


def test_the_suite_is_large_enough() -> None:
    """The issue asks for at least 25 distinct cases over every input surface."""
    assert len({c.id for c in CASES}) == len(CASES) >= 25
    assert {c.kind for c in CASES} == {"slide data", "store", "search space", "train config", "CLI", "checkpoint",
                                       "MLflow"}
