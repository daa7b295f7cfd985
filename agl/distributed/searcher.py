"""The sweep's searcher: Optuna TPE set up for parallel, conditional, pruned trials, and warm starts.

- TPE with ``constant_liar`` (a running trial counts as a bad result, so concurrent trials are
  not proposed next to each other), ``multivariate`` (joint densities, not one per setting) and
  ``group`` (the conditional space is split into the groups of settings that occur together:
  a PGL trial's settings are modelled apart from a DkGSB trial's); see the Optuna ``TPESampler``
  docs (``group``: "the search space is decomposed ... for conditional search spaces").
  Optuna 5.0's defaults already turn on constant liar and, for one objective, multivariate; they are
  set here explicitly so that the searcher does not change with Optuna's defaults.
- A random start-up budget that scales with concurrency: the first ``concurrency`` trials start
  together with nothing to learn from, so at least that many are random. Pinned (``start_with``)
  and warm-start trials are enqueued and do not count as random start-up: Optuna's
  ``n_startup_trials`` counts every finished trial, so it is set to enqueued + random.
- A trial whose loss went non-finite ends with a ``diverged`` report (no retry) and is told to Optuna
  as ``FAIL`` once, its message in the user attribute ``error``.
- Trials that the scheduler (ASHA) stops are told to Optuna as ``PRUNED`` with the value of their
  last report as an intermediate value (Ray's ``OptunaSearch`` would record them ``COMPLETE``,
  scored on the folds they had done); a trial is finished only when its last report says ``final``.
- Warm start: the best configurations of an earlier sweep (its folder's ``trials.csv``, or the
  ``trials.csv`` artifact of its MLflow parent run ``runs:/<run_id>``) are enqueued first.
"""
from __future__ import annotations

import logging
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from agl.distributed.results import TABLE_CSV
from agl.distributed.spaces import SearchSpace, default_value
from agl.errors import ConfigError

log = logging.getLogger(__name__)

WARM_FLAG = "--warm-start-from"
RUN_URI_PREFIX = "runs:/"
MAX_RANDOM_STARTUP = 10   # TPE's own default start-up budget (Optuna's n_startup_trials=10)


def random_startup(num_samples: int, concurrency: int, enqueued: int = 0) -> int:
    """Random start-up trials: about half of the sampled trials (2 to 10), never fewer than run at once,
    never more than the trials left after the enqueued ones."""
    sampled = max(0, num_samples - enqueued)
    return min(sampled, max(concurrency, min(MAX_RANDOM_STARTUP, max(2, sampled // 2))))


def tpe_sampler(seed: int, n_startup_trials: int) -> Any:
    """TPE for parallel conditional trials (constant liar, multivariate, group)."""
    import optuna

    with warnings.catch_warnings():  # group is marked experimental in Optuna 5.0; chosen knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials, constant_liar=True,
                                          multivariate=True, group=True)


def _optuna_search_base() -> type:
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch


class PruningOptunaSearch(_optuna_search_base()):
    """Ray's OptunaSearch, but a trial that ended without its ``final`` report (stopped by the scheduler)
    is told to Optuna as PRUNED, its last report kept as the intermediate value TPE ranks it by."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        from agl.distributed.results import is_diverged

        if result and is_diverged(result) and trial_id not in self._completed_trials:
            # its loss went non-finite: FAIL, once (Ray's own would tell COMPLETE with NaN, which Optuna refuses)
            trial = self._ot_trials[trial_id]
            trial.set_user_attr("error", str(result.get("error", ""))[:1000])
            self._ot_study.tell(trial, state=TrialState.FAIL)
            self._completed_trials.add(trial_id)
            return
        if error or not result or result.get("final") or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        trial = self._ot_trials[trial_id]
        value = result.get(self.metric)
        step = int(result.get("training_iteration", 0))
        if value is not None and math.isfinite(float(value)):
            with warnings.catch_warnings():  # a step reported already is kept as it was (Optuna warns)
                warnings.simplefilter("ignore")
                trial.report(float(value), step)  # the stopping report reached the scheduler, not on_trial_result
        try:
            self._ot_study.tell(trial, state=TrialState.PRUNED)
        except Exception as err:  # as Ray's own: a bad report must not stop the sweep
            log.warning("Optuna refused the stopped trial %s (%s)", trial_id, err)
        self._completed_trials.add(trial_id)


# random: Optuna's RandomSampler, the baseline a user weighs TPE against; tpe-plain: the searcher before
# 2026-12-07 (TPESampler with Optuna's defaults: in 5.0 constant liar on, multivariate for one objective, no
# group; pinned trials counted as start-up; ASHA-stopped trials COMPLETE at their last score), kept so that
# agl bench search can measure what the set-up above changes
SAMPLERS = ("tpe", "random", "tpe-plain")


def build_searcher(space: SearchSpace, concurrency: int, warm_points: Sequence[Mapping[str, Any]] = (),
                   sampler: str = "tpe") -> Any:
    """The sweep's searcher: pinned trials, then warm-start points, then TPE (random start-up first), random, or
    ``tpe-plain`` (Ray's own OptunaSearch over a default TPESampler: the baseline of ``agl bench search``)."""
    import optuna

    if sampler not in SAMPLERS:
        raise ConfigError("--searcher", f"must be one of {SAMPLERS}, got {sampler!r}")
    points = [dict(p) for p in space.start_with] + [dict(p) for p in warm_points]
    if sampler == "tpe-plain":
        plain = optuna.samplers.TPESampler(seed=space.seed,
                                           n_startup_trials=min(MAX_RANDOM_STARTUP, max(2, space.num_samples // 2)))
        return _optuna_search_base()(space=space.define_by_run(), metric=space.metric, mode=space.mode,
                                     sampler=plain, points_to_evaluate=points or None)
    startup = len(points) + random_startup(space.num_samples, concurrency, len(points))
    chosen = (tpe_sampler(space.seed, startup) if sampler == "tpe"
              else optuna.samplers.RandomSampler(seed=space.seed))
    # define-by-run: conditional settings (``when``) are suggested only in the trials that use them
    return PruningOptunaSearch(space=space.define_by_run(), metric=space.metric, mode=space.mode,
                               sampler=chosen, points_to_evaluate=points or None)


# --------------------------------------------------------------------------- warm start
def read_earlier_trials(source: str, tracking_uri: str | None = None) -> tuple[pd.DataFrame, str]:
    """An earlier sweep's trial table: ``<folder>/trials.csv``, or the ``trials.csv`` artifact of the
    MLflow parent run ``runs:/<run_id>`` on ``tracking_uri``; returns (table, where it was read)."""
    if source.startswith(RUN_URI_PREFIX):
        run_id = source[len(RUN_URI_PREFIX):].strip("/").split("/")[0]
        if not tracking_uri:
            raise ConfigError(WARM_FLAG, f"{source}: an MLflow run needs --tracking-uri (the server that holds it)")
        import mlflow
        from mlflow.exceptions import MlflowException

        from agl.tracking import check_reachable

        check_reachable(tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TABLE_CSV, dst_path=tmp,
                                                            tracking_uri=tracking_uri)
            except (MlflowException, OSError) as err:
                raise ConfigError(WARM_FLAG, f"{source} on {tracking_uri}: no {TABLE_CSV} artifact "
                                             f"(is it a finished sweep's parent run?): {str(err)[:200]}") from None
            return _read_csv(Path(local), source), f"{tracking_uri} {source}"
    folder = Path(source)
    if not folder.is_dir():
        raise ConfigError(WARM_FLAG, f"{source}: not a folder (give an earlier sweep's --out, or runs:/<run_id>)")
    if not (folder / TABLE_CSV).is_file():
        raise ConfigError(WARM_FLAG, f"{folder}: holds no {TABLE_CSV}; is it an earlier sweep's --out?")
    return _read_csv(folder / TABLE_CSV, str(folder / TABLE_CSV)), str(folder / TABLE_CSV)


def _read_csv(path: Path, source: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ConfigError(WARM_FLAG, f"{source}: not a readable trial table ({err})") from None
    if "trial_id" not in table or not any(c.startswith("param.") for c in table):
        raise ConfigError(WARM_FLAG, f"{source}: not an agl trial table (no trial_id / param.* columns)")
    return table


def warm_start_points(table: pd.DataFrame, space: SearchSpace, top: int, source: str = WARM_FLAG
                      ) -> list[dict[str, Any]]:
    """The ``top`` best configurations of an earlier sweep's table that the current space can produce.

    Ranked by the space's metric (finished trials first, then stopped ones); each is completed as a
    pinned trial is (settings the earlier space did not search take TrainConfig's default) and left
    out, with a warning, when a value lies outside the current space; the pinned ``start_with``
    trials are not repeated."""
    if space.metric not in table:
        raise ConfigError(WARM_FLAG, f"{source}: the earlier sweep has no {space.metric!r} column "
                                     f"(the current space's metric); warm start needs the same objective")
    ranked = table[pd.to_numeric(table[space.metric], errors="coerce").notna()].copy()
    ranked["_finished"] = ranked.get("status", pd.Series("finished", index=ranked.index)).eq("finished")
    ranked = ranked.sort_values(["_finished", space.metric], ascending=[False, space.mode == "min"], kind="stable")
    points: list[dict[str, Any]] = []
    for _, row in ranked.iterrows():
        if len(points) >= top:
            break
        point = _as_point(row, space)
        if point is None:
            log.warning("%s: trial %s lies outside the current space; not enqueued", source, row["trial_id"])
        elif point not in points and point not in [dict(p) for p in space.start_with]:
            points.append(point)
    return points


def _as_point(row: pd.Series, space: SearchSpace) -> dict[str, Any] | None:
    """One table row as a complete point of ``space`` (in file order, so ``when`` conditions resolve)."""
    point: dict[str, Any] = {}
    for name, dist in space.params.items():
        if not dist.active(point):
            continue
        raw = row.get(f"param.{name}")
        if raw is None or (isinstance(raw, float) and math.isnan(raw)):
            point[name] = default_value(name, dist, space.fixed.get("mode"))
            continue
        value = _typed(raw, dist)
        if value is None:
            return None
        point[name] = value
    return point


def _typed(raw: Any, dist: Any) -> Any:
    """A CSV cell as the distribution's value (CSV reads 128 as 128.0 and True as 'True'), or None."""
    if dist.type == "categorical":
        return next((c for c in dist.choices if c == raw or str(c) == str(raw)), None)
    try:
        number = float(raw)
    except (TypeError, ValueError):
        return None
    value: Any = int(round(number)) if dist.type == "int" else number
    return value if dist.contains(value) else None


__all__ = ["SAMPLERS", "PruningOptunaSearch", "build_searcher", "random_startup", "read_earlier_trials", "tpe_sampler",
           "warm_start_points"]
