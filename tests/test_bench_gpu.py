"""`agl bench gpu`: one line and exit 0 without CUDA; `--device cpu --quick` runs every section (the CI
check that keeps the GPU command working where no GPU is)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from agl.cli import main


def test_without_cuda_one_line_and_exit_0(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "CUDA is not available" in out[0]
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written


def test_quick_cpu_run_has_every_section(tmp_path: Path) -> None:
    from agl.bench.gpu import JSON_NAME, PNG_NAME

    assert main(["bench", "gpu", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / JSON_NAME).read_text())
    sections = ["environment", "feature_cache", "finetune_steps", "hypergradient_accuracy", "ddp_two_workers",
                "serving", "train_ray", "sweep", "demo_job"]
    failed = {name: report[name].get("error") for name in sections if "error" in report[name]}
    assert not failed, failed
    assert all("error" not in row for row in report["feature_cache"]["rows"] + report["finetune_steps"]["rows"]
               + report["hypergradient_accuracy"]["rows"])
    assert all(report[name]["returncode"] == 0 for name in ("train_ray", "sweep", "demo_job"))
    assert (tmp_path / PNG_NAME).stat().st_size > 0
