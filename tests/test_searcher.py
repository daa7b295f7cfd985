"""The sweep's searcher: TPE set up for parallel conditional trials, stopped trials pruned in the Optuna
study, and warm starts that enqueue an earlier sweep's best configurations."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from optuna.trial import TrialState

from agl.distributed.searcher import random_startup, read_earlier_trials, warm_start_points
from agl.distributed.spaces import SearchSpace, load_space
from agl.distributed.tune import SweepOptions, _searcher, run_sweep
from agl.errors import ConfigError


def test_tpe_uses_constant_liar_multivariate_groups_and_a_startup_budget_that_scales_with_concurrency() -> None:
    space = SearchSpace(**{**load_space("default").__dict__, "num_samples": 32})
    pinned = len(space.start_with)
    for concurrency in (1, 4, 8):
        sampler = _searcher(space, concurrency)._ot_study.sampler
        assert sampler._constant_liar and sampler._multivariate is True and sampler._group
        random_part = sampler._n_startup_trials - pinned   # pinned trials are not random start-up
        assert random_part == random_startup(32, concurrency, pinned) and random_part >= min(concurrency, 32 - pinned)
    assert random_startup(32, 1, 3) == 10 and random_startup(32, 16, 3) == 16 and random_startup(6, 8, 3) == 3


def test_a_trial_the_scheduler_stops_is_pruned_in_the_optuna_study() -> None:
    space = load_space("default")
    searcher = _searcher(space, 2)
    for i in range(5):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t0", {"cv_pcc": 0.15, "training_iteration": 4, "folds_done": 4, "final": True})
    searcher.on_trial_result("t3", {"cv_pcc": 0.10, "training_iteration": 1, "folds_done": 1})
    # ASHA's stopping result goes to the scheduler, then on_trial_complete; it has no "final"
    searcher.on_trial_complete("t3", {"cv_pcc": 0.12, "training_iteration": 2, "folds_done": 2})
    searcher.on_trial_complete("t1", error=True)
    states = {t.number: t for t in searcher._ot_study.get_trials(deepcopy=False)}
    assert states[0].state == TrialState.COMPLETE and states[0].value == pytest.approx(0.15)
    assert states[3].state == TrialState.PRUNED and states[3].intermediate_values == {1: 0.10, 2: 0.12}
    assert states[1].state == TrialState.FAIL



def test_a_diverged_trial_is_failed_once_in_the_optuna_study() -> None:
    """A NonFiniteLossError ends the trial with a diverged report: FAIL with its message, never COMPLETE with
    NaN (Ray's OptunaSearch) nor PRUNED; a second completion of it changes nothing."""
    from agl.distributed.results import diverged_report
    from agl.errors import NonFiniteLossError

    space = load_space("default")
    searcher = _searcher(space, 2)
    for i in range(2):
        searcher.suggest(f"t{i}")
    report = {**diverged_report(NonFiniteLossError("training loss", float("inf"), 1, 3, 1e30), space.metric),
              "training_iteration": 2}  # Tune adds it to every report
    searcher.on_trial_result("t0", report)
    searcher.on_trial_complete("t0", report)
    searcher.on_trial_complete("t0", report)
    trial = searcher._ot_study.get_trials(deepcopy=False)[0]
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["error"].startswith("NonFiniteLossError: ") and "epoch 1, step 3" in trial.user_attrs["error"]


EARLIER = pd.DataFrame([
    # a stopped trial with the best score ranks after the finished ones; a trial outside today's space is skipped
    {"trial_id": "a", "status": "stopped", "param.method": "topk", "param.k": 30.0, "param.prior_weight": 0.5,
     "param.lr": 1e-3, "param.trunk_width": 64.0, "cv_pcc": 0.30},
    {"trial_id": "b", "status": "finished", "param.method": "topk", "param.k": 5000.0, "param.prior_weight": 0.5,
     "param.lr": 1e-3, "param.trunk_width": 64.0, "cv_pcc": 0.25},
    {"trial_id": "c", "status": "finished", "param.method": "dkgsb", "param.k": 222.0, "param.prior_weight": 0.75,
     "param.tau": 0.02, "param.outer_lr": 0.01, "param.lr": 2e-3, "param.trunk_width": 256.0, "cv_pcc": 0.21},
    {"trial_id": "d", "status": "finished", "param.method": "pgl", "param.lr": 5e-4, "param.trunk_width": 128.0,
     "cv_pcc": 0.19},
    {"trial_id": "e", "status": "error", "param.method": "pgl", "param.lr": 5e-4, "param.trunk_width": 128.0,
     "cv_pcc": float("nan")},
])


def test_warm_start_points_are_the_earlier_best_in_todays_space(tmp_path: Path) -> None:
    (tmp_path / "trials.csv").write_text(EARLIER.to_csv(index=False))
    table, where = read_earlier_trials(str(tmp_path))
    space = load_space("default")
    points = warm_start_points(table, space, top=3, source=where)
    assert points[0] == {"method": "dkgsb", "k": 222, "prior_weight": 0.75, "tau": 0.02, "outer_lr": 0.01,
                         "lr": 2e-3, "trunk_width": 256}
    assert points[1] == {"method": "pgl", "lr": 5e-4, "trunk_width": 128}
    assert points[2]["method"] == "topk" and points[2]["k"] == 30 and len(points) == 3
    assert isinstance(points[0]["k"], int) and isinstance(points[0]["trunk_width"], int)
    # enqueued after the pinned trials: the first suggestions are pinned, then the earlier best
    searcher = _searcher(space, 1, points)
    suggested = [searcher.suggest(f"t{i}") for i in range(len(space.start_with) + 3)]
    assert suggested[:len(space.start_with)] == [dict(p) for p in space.start_with]
    assert suggested[len(space.start_with):] == points
    assert searcher._ot_study.sampler._n_startup_trials == len(space.start_with) + 3 + random_startup(6, 1, 6)


@pytest.mark.reliability(kind="bad input", case="--warm-start-from names a folder without a trial table, or an "
                                                "MLflow run without --tracking-uri",
                         outcome="ConfigError naming --warm-start-from and the folder/run; nothing written")
def test_warm_start_from_a_folder_without_trials_is_refused(tmp_path: Path, demo_store: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError, match=r"--warm-start-from: .*empty: holds no trials.csv"):
        run_sweep(SweepOptions(space="tiny", store=str(demo_store), out=str(out),
                               warm_start_from=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"--warm-start-from: runs:/abc.*needs --tracking-uri"):
        run_sweep(SweepOptions(space="tiny", store=str(demo_store), out=str(out), warm_start_from="runs:/abc"))
    assert not out.exists()


def test_warm_start_from_an_mlflow_parent_run(tmp_path: Path) -> None:
    from agl.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri)
    experiment = tracker.experiment("earlier", artifact_root=tmp_path / "artifacts")
    (tmp_path / "trials.csv").write_text(EARLIER.to_csv(index=False))
    parent = tracker.start_sweep(experiment, "earlier-sweep", {"space": "default"})
    tracker.end_sweep(parent, files=[tmp_path / "trials.csv"])
    table, where = read_earlier_trials(f"runs:/{parent}", uri)
    assert parent in where and list(table["trial_id"]) == list(EARLIER["trial_id"])
    assert warm_start_points(table, load_space("default"), top=1)[0]["k"] == 222


def test_a_sweep_warm_started_from_an_earlier_one_runs_its_best_configuration_first(
        ray_local, demo_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`agl tune --warm-start-from`: the earlier best runs first; the gene consensus of its one trial (top-k,
    k = 17) is those 17 genes, printed and logged to the parent run."""
    from agl.cli import main
    from agl.tracking import MlflowTracker

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    pd.DataFrame([
        {"trial_id": "x", "status": "finished", "param.method": "topk", "param.k": 17, "param.lr": 0.0021,
         "val_pcc": 0.4},
        {"trial_id": "y", "status": "finished", "param.method": "dkgsb", "param.k": 200, "param.lr": 0.001,
         "val_pcc": 0.3},
    ]).to_csv(earlier / "trials.csv", index=False)
    out = tmp_path / "sweep"
    assert main(["tune", "--space", "tiny", "--store", str(demo_store), "--out", str(out), "--num-samples", "1",
                 "--warm-start-from", str(earlier), "--warm-start-top", "1"]) == 0
    row = pd.read_csv(out / "trials.csv").iloc[0]
    assert (row["param.method"], row["param.k"], row["param.lr"]) == ("topk", 17, pytest.approx(0.0021))
    printed = capsys.readouterr().out
    assert "gene consensus: 17 auxiliary genes selected in at least half of the top 1 trials" in printed
    consensus = pd.read_csv(out / "gene_consensus.csv")
    assert int(consensus["in_consensus"].sum()) == 17 == int((consensus["trials_selected"] == 1).sum())
    state = json.loads((out / "sweep.json").read_text())
    client = MlflowTracker(state["tracking_uri"]).client
    params = client.get_run(state["parent_run_id"]).data.params
    assert params["warm_start_from"].endswith("trials.csv") and params["warm_start_points"] == "1"
    assert "gene_consensus.json" in {a.path for a in client.list_artifacts(state["parent_run_id"])}


def test_random_searcher_is_optunas_random_sampler_through_the_same_code() -> None:
    import optuna

    space = load_space("default")
    searcher = _searcher(space, 2, None, "random")
    assert isinstance(searcher._ot_study.sampler, optuna.samplers.RandomSampler)
    assert [searcher.suggest(f"t{i}") for i in range(3)] == [dict(p) for p in space.start_with]  # pinned first
    with pytest.raises(ConfigError, match="--searcher"):
        _searcher(space, 2, None, "grid")


def test_tpe_plain_is_the_earlier_searcher_that_scores_a_stopped_trial_as_complete() -> None:
    """The baseline of agl bench search: TPE with Optuna's defaults (in Optuna 5.0 these already include constant
    liar, and multivariate for one objective; not group), a start-up budget that counts the pinned trials, and a
    trial the scheduler stopped is COMPLETE at its last score (what the sweep did before it was told PRUNED)."""
    import argparse

    from agl.distributed.commands import add_tune_args
    from agl.distributed.searcher import SAMPLERS

    space = load_space("default")
    searcher = _searcher(space, 2, None, "tpe-plain")
    sampler = searcher._ot_study.sampler
    assert not sampler._group and sampler._n_startup_trials == min(10, max(2, space.num_samples // 2))
    assert [searcher.suggest(f"t{i}") for i in range(4)][:3] == [dict(p) for p in space.start_with]
    searcher.on_trial_result("t3", {"cv_pcc": 0.10, "training_iteration": 1, "folds_done": 1})
    searcher.on_trial_complete("t3", {"cv_pcc": 0.12, "training_iteration": 2, "folds_done": 2})
    stopped = searcher._ot_study.get_trials(deepcopy=False)[3]
    assert stopped.state == TrialState.COMPLETE and stopped.value == pytest.approx(0.12)
    parser = argparse.ArgumentParser()
    add_tune_args(parser)
    choices = next(a.choices for a in parser._actions if a.dest == "searcher")
    assert tuple(choices) == SAMPLERS   # the CLI offers every sampler the sweep builds, and no other
