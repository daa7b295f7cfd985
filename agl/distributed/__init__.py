"""Cluster-scale training and search: Ray Train, Ray Tune + Optuna, MLflow tracking.

- :mod:`agl.distributed.train`: ``train_func`` / ``run_train`` (TorchTrainer running ``agl.training.loop.fit``)
- :mod:`agl.distributed.tune`: ``run_sweep`` (Tune + OptunaSearch, ASHA or in-loop early stopping)
- :mod:`agl.distributed.spaces`: search-space YAML files (``search_spaces/``)
- :mod:`agl.distributed.tracking`: MLflow parent/child runs, artifacts, the ``champion`` alias
- :mod:`agl.distributed.runtime`: ``init_ray`` and store resolution
- :mod:`agl.distributed.commands`: ``agl tune``, ``agl train-ray``, ``agl predict``, ``agl bench ray``

Submodules import Ray lazily, so ``import agl.distributed`` is cheap.
"""
