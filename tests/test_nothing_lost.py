"""Issue 24: nothing lost, nothing raw. Interrupted train runs, changed stores, non-finite losses,
unwritable output locations, Ctrl-C during ingest, numbers written 1e-4, and one exit code for an
existing output. Every case runs the real ``agl`` command on the her2st demo store or on a
her2st section cut from the shared release (tests/layouts.py)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from agl.cli import main
from layouts import cut_her2st
from trainkit import first_split, use_cheap_features

FAST = ["--set", "trunk=[16]", "--set", "device=cpu", "--set", "weights=null", "--set", "bilevel_batch_size=256"]


@pytest.fixture
def cheap(monkeypatch):
    use_cheap_features(monkeypatch)
    monkeypatch.setattr("agl.evaluation.protocol.prepare_inputs", lambda store, specs: None)


def _train(store: Path, out: Path, *extra: str, method: str = "dkgsb", epochs: int = 3) -> list[str]:
    return ["train", "--store", str(store), "--method", method, "--split", first_split(store), "--out", str(out),
            "--set", f"epochs={epochs}", *FAST, *extra]


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _linked_store_copy(store: Path, dest: Path, private: tuple[str, ...] = ()) -> Path:
    """A copy of ``store`` whose files are hard links, except ``private`` ones (real copies, safe to change)
    and cache/ (its own folder, so a stamp written there never reaches the original)."""
    shutil.copytree(store, dest, copy_function=os.link, ignore=shutil.ignore_patterns("integrity.json"))
    for rel in private:
        (dest / rel).unlink()
        shutil.copy2(store / rel, dest / rel)
    return dest


def _interrupt_after_epoch(monkeypatch, n: int) -> None:
    """Ctrl-C right after the checkpoint of epoch ``n`` (1-based) is written, as a user's would land."""
    from agl.training import checkpoint

    real = checkpoint.save_checkpoint

    def save_then_interrupt(path, trainer, cfg, state, data):
        written = real(path, trainer, cfg, state, data)
        if state.next_epoch == n:
            raise KeyboardInterrupt
        return written

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_interrupt)


# --------------------------------------------------------------------------- 1. interrupted runs
@pytest.mark.reliability(kind="fault", case="agl train interrupted (Ctrl-C after epoch 2 of 3), then the same "
                                            "command again without --resume, and with --resume and another --method",
                         outcome="exit 130 naming the --resume command; the rerun exits 1 naming both commands "
                                 "(--resume, --overwrite) and the checkpoint is byte for byte as it was; another "
                                 "--method with --resume exits 1 naming the setting; --resume finishes epoch 3")
def test_interrupted_train_run_is_never_restarted_silently(demo_store, tmp_path, cheap, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    _interrupt_after_epoch(monkeypatch, 2)
    assert main(_train(demo_store, out)) == 130
    err = capsys.readouterr().err
    assert "agl train: interrupted" in err and "--resume" in err and "epoch 2 of 3" in err, err
    monkeypatch.undo()
    use_cheap_features(monkeypatch)
    kept = _digest(out / "checkpoint")
    assert not (out / "result.json").exists()

    assert main(_train(demo_store, out)) == 1  # the same command: refused, nothing changed
    err = capsys.readouterr().err
    assert f"{out}: holds an unfinished `agl train` run" in err and "epoch 2 of 3 of dkgsb" in err, err
    assert f"--out {out} --set epochs=3" in err and err.count("--resume") == 1 and err.count("--overwrite") == 1
    assert _digest(out / "checkpoint") == kept

    assert main(_train(demo_store, out, "--resume", method="pgl")) == 1  # another method: not the same run
    err = capsys.readouterr().err
    assert "config.json" in err and "method is 'dkgsb' there but 'pgl' here" in err and "--overwrite" in err, err
    assert main(_train(demo_store, out, "--resume", "--set", "lr=0.01")) == 1
    assert "lr is 0.001 there but 0.01 here" in capsys.readouterr().err
    assert _digest(out / "checkpoint") == kept

    assert main(_train(demo_store, out, "--resume")) == 0
    assert json.loads((out / "result.json").read_text())["epochs"] == 3


# --------------------------------------------------------------------------- 2. store integrity, NaN
@pytest.mark.reliability(kind="bad input", case="a store with one byte of arrays/expression.arrow changed: "
                                                "never checked before; after a check, with its file times kept "
                                                "(caught by a sampled block); outside the samples with a new date",
                         outcome="agl train exits 1 naming arrays/expression.arrow before any training; nothing "
                                 "written to --out; --verify (full sha256) names it too")
def test_changed_store_byte_stops_training(demo_store, tmp_path, cheap, capsys) -> None:
    rel = "arrays/expression.arrow"
    store = _linked_store_copy(demo_store, tmp_path / "store", private=(rel,))
    target = store / rel
    data = bytearray(target.read_bytes())

    def flip(offset: int, keep_times: bool) -> None:
        stat = target.stat()
        data[offset] ^= 0x01
        target.write_bytes(bytes(data))
        if keep_times:
            os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    def refused(*extra: str) -> None:
        out = tmp_path / f"run-{len(os.listdir(tmp_path))}"
        assert main(_train(store, out, *extra, epochs=1)) == 1
        err = capsys.readouterr().err
        assert f"{target}: sha256 differs from manifest.json" in err and "Traceback" not in err, err
        assert not out.exists()  # refused before training: nothing written

    flip(len(data) // 3, keep_times=False)  # the case: one byte changed, the store never checked before
    refused()
    refused("--verify")
    flip(len(data) // 3, keep_times=False)  # restored: the store checks out again, and keeps a stamp
    from agl.data.integrity import STAMP, check_store_files
    from agl.data.store import open_store

    first = check_store_files(open_store(store))
    assert first["hashed"] == first["files"] and (store / STAMP).is_file()  # no stamp yet: every file hashed
    again = check_store_files(open_store(store))  # later runs: a stat and three sampled blocks per file
    assert again["hashed"] == 0 and again["sampled"] == again["files"]
    flip(100, keep_times=True)  # inside the first sampled block, file times kept: only the sample can tell
    refused()
    flip(100, keep_times=True)
    flip(len(data) // 4, keep_times=False)  # outside every sample, a new modification time: hashed again
    refused()


def _nan_store(demo_store: Path, dest: Path) -> Path:
    """The demo store with NaN in 3 spots' expression, its manifest updated (as a faulty writer would)."""
    from agl.data.store import _read_ipc, _write_ipc
    from agl.fileio import sha256_file

    rel = "arrays/expression.arrow"
    store = _linked_store_copy(demo_store, dest, private=(rel, "manifest.json"))
    values = np.array(_read_ipc(store / rel))
    values[:3, :5] = np.nan
    (store / rel).unlink()
    _write_ipc(store / rel, "expression", values)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["files"][rel] = sha256_file(store / rel)
    (store / "manifest.json").write_text(json.dumps(manifest))
    return store


@pytest.mark.reliability(kind="bad input", case="a store whose expression holds NaN (manifest consistent), and "
                                                "a diverging run (--set lr=1e8), through agl train and agl evaluate",
                         outcome="exit 3 at once: 'the training loss is nan at epoch 1, step N', lower lr or check "
                                 "the store; no result.json, no TypeError; evaluate names the grid run, no "
                                 "ValueError from NaN axis limits")
def test_non_finite_loss_stops_the_run(demo_store, tmp_path, cheap, capsys) -> None:
    store = _nan_store(demo_store, tmp_path / "nan-store")
    out = tmp_path / "nan-run"
    assert main(_train(store, out)) == 3
    err = capsys.readouterr().err
    assert "training stopped: the training loss is nan at epoch 1, step" in err, err
    assert "lower the learning rate" in err and "NaN/inf" in err and "Traceback" not in err
    assert not out.exists()  # nothing finished, nothing left

    out = tmp_path / "lr-run"
    assert main(_train(demo_store, out, "--set", "lr=1e8")) == 3
    err = capsys.readouterr().err
    assert "the training loss is nan at epoch 1" in err and "lr is 1e+08" in err and "TypeError" not in err, err
    assert not (out / "result.json").exists()

    grid = tmp_path / "grid"
    assert main(["evaluate", "--store", str(demo_store), "--protocol", "kfold", "--seeds", "0", "--folds", "0",
                 "--methods", "pgl", "--out", str(grid), "--set", "epochs=2", *FAST, "--set", "lr=1e8"]) == 3
    err = capsys.readouterr().err
    assert "grid run pgl on kfold-s0-f0, seed 0" in err and "ValueError" not in err, err
    assert not list(grid.rglob("result.json"))


@pytest.mark.reliability(kind="fault", case="a run diverges in epoch 2 (its learning rate raised to 1e8 after "
                                            "epoch 1's checkpoint)",
                         outcome="exit 3 naming epoch 2 and the kept checkpoint (epoch 1); no result.json; the rerun "
                                 "is refused offering --resume or --overwrite")
def test_divergence_keeps_the_last_good_checkpoint(demo_store, tmp_path, cheap, monkeypatch, capsys) -> None:
    from agl.training.loop import Trainer

    real = Trainer.train_epoch

    def diverge_from_epoch_2(self, epoch, all_genes):
        if epoch == 1:
            for group in self.opt.param_groups:
                group["lr"] = 1e8
        return real(self, epoch, all_genes)

    monkeypatch.setattr(Trainer, "train_epoch", diverge_from_epoch_2)
    out = tmp_path / "run"
    assert main(_train(demo_store, out)) == 3
    err = capsys.readouterr().err
    assert "loss is nan at epoch 2" in err or "loss is inf at epoch 2" in err, err
    assert f"the last good checkpoint (epoch 1 of 3 of dkgsb) is kept in {out / 'checkpoint'}" in err
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["next_epoch"] == 1 and not (out / "result.json").exists()
    assert main(_train(demo_store, out)) == 1
    assert "--resume" in capsys.readouterr().err


def test_method_bars_with_undefined_means(tmp_path) -> None:
    import pandas as pd

    from agl.plotting import plot_method_bars

    table = pd.DataFrame({"method": ["pgl", "dkgsb"], "pcc_mean": [np.nan, np.nan], "pcc_std": [np.nan, np.nan]})
    assert plot_method_bars(table, tmp_path / "bars.png").stat().st_size > 0


# --------------------------------------------------------------------------- 5. output locations
def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def bad_locations(tmp_path):
    """--out under: a read-only tmpfs (EROFS, which root cannot bypass), a 1 MiB tmpfs (real statvfs: less free
    than asked), a file where a folder is expected. Where mounting is not allowed (not root) the first two
    are skipped: the file case still runs."""
    ro, small = tmp_path / "ro", tmp_path / "small"
    mounted = [p for p, opt in ((ro, "ro,size=1m"), (small, "size=1m")) if _mount_tmpfs(p, opt)]
    file = tmp_path / "a-file"
    file.write_text("not a folder")
    cases = [(file / "out", file, "is a file, not a folder")]
    if ro in mounted:
        cases.append((ro / "out", ro, "is on a read-only file system"))
    if small in mounted:
        cases.append((small / "out", small, "has only 1 MiB free, less than the 100 MiB asked"))
    yield cases
    for p in mounted:
        subprocess.run(["umount", "--lazy", str(p)], check=False)


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the output location was checked")


@pytest.mark.reliability(kind="bad input", case="agl ingest, train, predict and evaluate with --out on a read-only "
                                                "file system, a full one (1 MiB tmpfs) and under a file",
                         outcome="exit 1 before any work, naming the location and the problem (read-only, n MiB "
                                 "free, a file); no OSError traceback; nothing written")
def test_unwritable_output_locations_are_refused_before_work(her2st_dir, demo_store, tmp_path, bad_locations,
                                                             monkeypatch, capsys) -> None:
    src = cut_her2st(her2st_dir, tmp_path / "her2st", "C2")
    monkeypatch.setattr("agl.data.readers.read_slides", _no_work)
    monkeypatch.setattr("agl.training.bundles.make_bundle", _no_work)
    monkeypatch.setattr("agl.evaluation.protocol.evaluate", _no_work)
    assert len(bad_locations) == 3, "tmpfs mounts are needed for the read-only and full cases (run as root)"
    for out, named, problem in bad_locations:
        for argv in (["ingest", "her2st", str(src), "--sections", "C2", "--out", str(out)],
                     _train(demo_store, out),
                     ["predict", "--checkpoint", str(tmp_path / "no-checkpoint-needed"), "--input", str(src),
                      "--format", "her2st", "--sections", "C2", "--out", str(out)],
                     ["evaluate", "--store", str(demo_store), "--protocol", "kfold", "--methods", "pgl",
                      "--out", str(out)]):
            assert main(argv) == 1, argv
            err = capsys.readouterr().err
            assert f"{named}: {problem}" in err and f"--out {out}" in err and "Traceback" not in err, err
            assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == []


def test_file_system_refusal_mid_run_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    """A write refused after the checks (the disk filled meanwhile): one line naming the file, exit 1."""
    import errno

    def refuse(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.arrow"))

    monkeypatch.setattr("agl.commands.cmd_evaluate", refuse)
    from agl import cli

    assert cli._run(refuse, None, "agl evaluate") == 1
    assert capsys.readouterr().err == f"agl evaluate: error: {tmp_path / 'x.arrow'}: No space left on device\n"


# --------------------------------------------------------------------------- 6. Ctrl-C during ingest
INGEST = ["--sections", "C2", "C3", "--patch-px", "32", "--seeds", "0", "--splits", "kfold"]


@pytest.mark.reliability(kind="fault", case="Ctrl-C inside the numba-compiled scanpy call of ingest's gene-set "
                                            "stage (numba's dispatcher reports it as SystemError: '... returned a "
                                            "result with an exception set')",
                         outcome="exit 130 'agl ingest: interrupted', no SystemError traceback; no store and no "
                                 "temporary folder left")
def test_ctrl_c_in_compiled_code_during_ingest_exits_130(her2st_dir, tmp_path, monkeypatch, capsys) -> None:
    from agl.data import ingest

    real, calls = ingest.gene_set, []

    def interrupted_in_numba(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # what CPython raises when a KeyboardInterrupt lands inside numba's dispatcher
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as ctrl_c:
                raise SystemError("CPUDispatcher(<function sparse_mean_var_minor_axis>) returned a result with "
                                  "an exception set") from ctrl_c
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest, "gene_set", interrupted_in_numba)
    out = tmp_path / "store"
    assert main(["ingest", "her2st", str(her2st_dir), *INGEST, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.strip().endswith("agl ingest: interrupted") and "SystemError" not in err, err
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", [1, 3, 5])
@pytest.mark.reliability(kind="fault", case="SIGINT to a running `agl ingest` (C2 + C3) as its stage 1, 3 or 5 "
                                            "of 6 ends",
                         outcome="exit 130 with 'interrupted' on stderr; no store and no temporary folder left")
def test_sigint_during_ingest_leaves_nothing(her2st_dir, tmp_path, stage) -> None:
    import signal
    import sys

    out = tmp_path / "store"
    cmd = [str(Path(sys.executable).with_name("agl")), "ingest", "her2st", str(her2st_dir), *INGEST, "--out", str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if f"ingest [{stage}/6]" in line:
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.communicate(timeout=300)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    assert "agl ingest: interrupted" in rest and "Traceback" not in rest, rest
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 7. numbers written 1e-4
@pytest.mark.reliability(kind="bad input", case="numbers written 1e-4 / 1E-2 / 5e-1 (YAML 1.1 reads them as text) in "
                                                "--set, a --config file, --method options and a search space",
                         outcome="read as numbers everywhere: the run records lr 0.0001, outer_lr 0.01, ift_alpha 0.5; "
                                 "the space's bounds are floats")
def test_exponent_numbers_are_numbers_everywhere(demo_store, tmp_path, cheap) -> None:
    from agl.distributed.spaces import load_space

    config = tmp_path / "run.yaml"
    config.write_text("outer_lr: 1E-2\n")
    out = tmp_path / "run"
    assert main(_train(demo_store, out, "--set", "lr=1e-4", "--config", str(config), epochs=1,
                       method="dkgsb:ift_alpha=5e-1")) == 0
    settings = json.loads((out / "result.json").read_text())["config"]
    assert (settings["lr"], settings["outer_lr"], settings["ift_alpha"]) == (1e-4, 1e-2, 0.5)

    space_file = tmp_path / "space.yaml"
    space_file.write_text("params:\n  lr: {type: float, low: 1e-5, high: 1E-2, log: true}\n"
                          "  outer_lr: {type: categorical, choices: [1e-3, 3e-2]}\n")
    space = load_space(space_file)
    assert (space.params["lr"].low, space.params["lr"].high) == (1e-5, 1e-2)
    assert space.params["outer_lr"].choices == [1e-3, 3e-2] or list(space.params["outer_lr"].choices) == [1e-3, 3e-2]


# --------------------------------------------------------------------------- 9. one exit code
@pytest.mark.reliability(kind="bad input", case="an existing output given as --out again, in agl train, evaluate "
                                                "(another configuration), ingest, predict and tune",
                         outcome="exit 1 in every command (the rule in `agl --help`), the folder named with the "
                                 "flag to pass; nothing changed")
def test_existing_output_exits_1_in_every_command(her2st_dir, demo_store, tmp_path, cheap, capsys) -> None:
    from agl.fileio import write_output_marker

    run = tmp_path / "run"
    assert main(_train(demo_store, run, epochs=1, method="pgl")) == 0
    grid = tmp_path / "grid"
    evaluate = ["evaluate", "--store", str(demo_store), "--protocol", "kfold", "--seeds", "0", "--folds", "0",
                "--methods", "pgl", "--out", str(grid), "--set", "epochs=1", *FAST]
    assert main(evaluate) == 0
    src = cut_her2st(her2st_dir, tmp_path / "her2st", "C2")
    store = tmp_path / "store"
    ingest = ["ingest", "her2st", str(src), "--sections", "C2", "--out", str(store), "--patch-px", "32",
              "--seeds", "0", "--splits", "kfold", "--min-genes", "10", "--n-primary", "5"]
    assert main(ingest) == 0
    predicted = tmp_path / "pred"
    predicted.mkdir()
    (predicted / "predictions.h5ad").write_bytes(b"h5")
    write_output_marker(predicted, "predict")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"name": "agl-sweep"}))
    write_output_marker(sweep, "tune")
    capsys.readouterr()
    cases = [
        (_train(demo_store, run, epochs=1, method="pgl"), f"{run / 'result.json'}: exists; pass --overwrite"),
        ([*evaluate, "--set", "lr=0.01"], "a finished run with a different configuration is here"),
        (ingest, f"{store}: already exists"),
        (["predict", "--checkpoint", str(run / "checkpoint"), "--input", str(src), "--format", "her2st",
          "--sections", "C2", "--out", str(predicted)], f"{predicted}: already exists (an `agl predict` output); "
                                                       "pass --overwrite"),
        (["tune", "--space", "tiny", "--store", str(demo_store), "--out", str(sweep), "--num-samples", "1"],
         f"{sweep.resolve()}: already holds sweep 'agl-sweep'; pass --resume"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    from agl.cli import build_parser

    assert "also an existing --out, in every command" in build_parser().format_help()
