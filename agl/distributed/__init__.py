"""Cluster-scale training and search: Ray Train, Ray Tune + Optuna, MLflow tracking.

- :mod:`agl.distributed.train`: ``train_func`` / ``run_train`` (TorchTrainer running ``agl.training.loop.fit``)
- :mod:`agl.distributed.tune`: ``run_sweep`` (Tune + OptunaSearch, ASHA or in-loop early stopping)
- :mod:`agl.distributed.spaces`: search-space YAML files (``search_spaces/``)
- :mod:`agl.distributed.results`: the trial table, best trial, PGL comparison, summary
- :mod:`agl.distributed.sync`: sends the tracker (:mod:`agl.tracking`) what it missed; ``agl tune-sync``
- :mod:`agl.distributed.cv`: the cross-validated trial objective and the refit champion
- :mod:`agl.distributed.runtime`: ``init_ray`` (stores are located by :mod:`agl.data.locate`)
- :mod:`agl.distributed.commands`: ``agl tune``, ``agl train-ray``, ``agl predict``, ``agl bench ray``

Submodules import Ray lazily, so ``import agl.distributed`` is cheap.
"""
