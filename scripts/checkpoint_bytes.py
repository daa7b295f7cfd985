"""Checkpoint bytes per trial of a demo sweep: what Tune uploads to --storage-path, and what it keeps there.

Runs ``launch/tune.py`` from ``--repo`` (so a baseline checkout can be measured the same way) on the demo
store with a local storage path in a fresh folder: the tiny space with ``--epochs`` epochs (patience as
long), one trial. Then reads the trial's folder: Tune numbers every checkpoint it takes
(checkpoint_000000, ...), so the highest number + 1 is the count uploaded, even of those deleted since;
the kept ones are measured file by file (optimiser state: the files whose name holds ``opt``). The sweep's
MLflow artifacts (``OUT/mlartifacts``) are measured the same way, per run: the trial's ``checkpoint/``
artifact and the registered pyfunc ``model/`` (the champion's run).

    python scripts/checkpoint_bytes.py --label after [--repo PATH] [--epochs 6] [-- extra launch/tune.py args]

Prints the figures and adds the label's row to results/bench_checkpoint_bytes.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parents[1]


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(all bytes, optimiser-state bytes) of the files under ``folder``."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_size for p in files if "opt" in p.name.lower())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--repo", default=str(HERE), help="the checkout whose launch/tune.py runs (default: this one)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default=str(HERE / "results" / "bench_checkpoint_bytes.json"))
    parser.add_argument("extra", nargs="*", help="more launch/tune.py arguments (after --)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="agl-ckpt-bytes-"))
    sys.path.insert(0, str(HERE))
    from agl.distributed.spaces import resolve_space_path

    space = yaml.safe_load(resolve_space_path("tiny").read_text())
    space["fixed"].update(epochs=args.epochs, patience=args.epochs)
    space["num_samples"] = 1
    (work / "space.yaml").write_text(yaml.safe_dump(space))
    storage = work / "ray"
    command = [sys.executable, str(Path(args.repo) / "launch" / "tune.py"), "--space", str(work / "space.yaml"),
               "--out", str(work / "sweep"), "--storage-path", str(storage), "--num-cpus", "1", *args.extra]
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": args.repo, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    if done.returncode != 0:
        print((done.stdout + done.stderr)[-4000:], file=sys.stderr)
        return done.returncode
    trials = [p for p in (storage / "agl-sweep").iterdir() if p.is_dir() and (p / "result.json").exists()]
    rows = []
    for trial in trials:
        kept = sorted(trial.glob("checkpoint_*"))
        uploaded = 1 + max(int(re.sub(r"\D", "", p.name)) for p in kept)
        sizes = [folder_bytes(p) for p in kept]
        rows.append({"trial": trial.name, "checkpoints_uploaded": uploaded, "checkpoints_kept": len(kept),
                     "kept_bytes": sum(s[0] for s in sizes), "kept_optimiser_bytes": sum(s[1] for s in sizes),
                     "bytes_per_checkpoint": [s[0] for s in sizes],
                     "uploaded_bytes_estimate": int(uploaded * sum(s[0] for s in sizes) / max(1, len(sizes)))})
    mlflow = []
    # MLflow puts a run's files at <experiment artifact location>/<run id>/artifacts
    for run in sorted((work / "sweep" / "mlartifacts").glob("*/artifacts")):
        row = {"run": run.parent.name}
        for part in ("checkpoint", "model"):
            total, optimiser = folder_bytes(run / part) if (run / part).is_dir() else (0, 0)
            row.update({f"{part}_bytes": total, f"{part}_optimiser_bytes": optimiser})
        row["files"] = sorted(str(p.relative_to(run)) for p in run.rglob("*.safetensors"))
        mlflow.append(row)
    result = {"label": args.label, "repo": args.repo, "epochs": args.epochs, "extra_args": args.extra,
              "wall_s": round(time.perf_counter() - started, 1), "trials": rows, "mlflow_runs": mlflow}
    print(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else []
    previous = [r for r in previous if r.get("label") != args.label] + [result]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(previous, indent=1))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
