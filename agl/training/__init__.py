"""Training: the one loop (``loop.fit``), bi-level hypergradients, data bundles, losses, checkpoints.

- :mod:`agl.training.loop`: ``TrainConfig``, ``fit`` (runs in-process, in a Ray Train worker, in a Tune trial)
- :mod:`agl.training.bilevel`: torch.func hypergradients of a gate's outer parameters
- :mod:`agl.training.bundles`: what ``fit`` reads from a store for one split
- :mod:`agl.training.losses`: 1-PCC and MSE
- :mod:`agl.training.checkpoint`: safetensors + JSON checkpoints, resume, loading a model
"""
