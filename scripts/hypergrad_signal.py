"""Does DkGSB's hypergradient carry signal on the real demo? Sign agreement and SNR per estimator.

Trains the shared model AGL-all style for ``--epochs`` (near-stationary weights, as the
warmstart schedule does), then estimates dL_val/dt on ``--pairs`` (training batch,
validation batch) pairs with each estimator, with the loss normaliser P + sum(w) detached
(the default gate) and differentiated. A sign that flips with the normaliser convention is
an artefact, not a measurement (issue 13). Writes results/hypergrad_signal.json.

    python scripts/hypergrad_signal.py --store demo --split loso-B4 --pairs 12
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from agl.fileio import atomic_write_json
from agl.selection.dkgsb import DkGSBGate
from agl.training.bilevel import hypergradient
from agl.training.loop import _Trainer, hypergradient_stats


class DifferentiatedNormaliser(DkGSBGate):
    """The same gate with the normaliser P + sum(w) differentiated."""

    def loss(self, l_primary: torch.Tensor, l_aux: torch.Tensor) -> torch.Tensor:
        w = self.weights().to(l_aux)
        return (l_primary.sum() + (w * l_aux).sum()) / (l_primary.numel() + w.sum())


VARIANTS = {
    "unroll H=2 adam warm": dict(method="unroll", inner_state="warm"),
    "unroll H=2 adam fresh": dict(method="unroll", inner_state="fresh"),
    "ift_cg": dict(method="ift_cg", estimator_options={"iters": 10, "damping": 1e-3}),
}


def main() -> None:
    from agl.data.store import open_store
    from agl.datasets import her2st_demo_store
    from agl.training.bundles import make_bundle
    from agl.config import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="demo")
    ap.add_argument("--split", default="loso-B4")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default="results/hypergrad_signal.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    store = open_store(her2st_demo_store() if args.store == "demo" else args.store)
    cfg = TrainConfig.from_dict({"method": "dkgsb", "device": "cpu", "t_init": 0.5, "seed": 0,
                                 "bilevel_batch_size": args.batch})
    data = make_bundle(store, args.split, cfg)
    tr = _Trainer(cfg, data)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        loss, _ = tr.train_epoch(epoch, all_genes=True)
        print(f"warm-up epoch {epoch + 1}/{args.epochs}: train loss {loss:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    gates = {"detached": tr.gate, "differentiated": DifferentiatedNormaliser(tr.gate.n_aux, data.prior_ranks, t_init=0.5)}
    gates["differentiated"].load_state_dict(tr.gate.state_dict())
    train = list(data.train_batches(args.batch, 999))[: args.pairs]
    val = list(data.val_batches(args.batch, 999))
    n_out = tr.n_out
    report: dict = {"split": args.split, "epochs": args.epochs, "pairs": len(train), "batch": args.batch, "variants": {}}
    for name, options in VARIANTS.items():
        for convention, gate in gates.items():
            t0 = time.perf_counter()
            values = []
            for i, (xt, yt) in enumerate(train):
                xv, yv = val[i % len(val)]
                torch.manual_seed(i)
                out = hypergradient(tr.model, gate, tr.loss_fn, (xt, yt[:, :n_out]), (xv, yv[:, :n_out]), tr.n_primary,
                                    cfg.inner_steps, cfg.lr, optimizer=tr.opt, accumulate=False, **options)
                values.append(out["hypergrad"][0].reshape(1))
            stats = hypergradient_stats(values)
            key = f"{name}, normaliser {convention}"
            report["variants"][key] = {**stats, "towards_more_genes": int(sum(float(v) < 0 for v in values)),
                                       "values": [float(v) for v in values], "seconds": time.perf_counter() - t0}
            print(f"{key:55s} mean {stats['hypergrad_mean']:+.3e}  sign agreement {stats['hypergrad_sign_agreement']:.2f}  "
                  f"SNR {stats['hypergrad_snr']:+.2f}  more genes {report['variants'][key]['towards_more_genes']}/{len(values)}"
                  f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
