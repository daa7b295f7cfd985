"""`ray up cluster.yaml` on a fresh laptop: Ray's own bootstrap of the AWS config, offline.

``ray up`` runs ``ray.autoscaler._private.commands._bootstrap_config``: fill defaults, validate
against the schema, import the AWS node provider (``boto3`` at module level: the
``pip install "agl[aws]"`` extra), then the provider's ``bootstrap_config`` (IAM role, key
pair, subnets: AWS API calls). Without credentials or network the last step cannot run here,
so it is replaced by a recorder; everything before it is Ray's code as ``ray up`` runs it.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_ray_bootstrap_of_the_aws_cluster_yaml_imports_boto3_and_accepts_it(monkeypatch, tmp_path) -> None:
    pytest.importorskip("boto3", reason='the aws extra (pip install "agl[aws]") is not installed')
    from ray.autoscaler._private import commands
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    seen = {}

    def offline_bootstrap(config):  # stands in for the AWS API calls (IAM, EC2 key pairs, subnets)
        seen["config"] = copy.deepcopy(config)
        return config

    monkeypatch.setattr(AWSNodeProvider, "bootstrap_config", staticmethod(offline_bootstrap))
    monkeypatch.setenv("HOME", str(tmp_path))  # Ray's config cache goes to a temporary folder
    monkeypatch.setattr(commands.tempfile, "gettempdir", lambda: str(tmp_path))
    config = commands._bootstrap_config(copy.deepcopy(raw), no_config_cache=True)
    assert seen["config"]["provider"]["type"] == "aws" and config["cluster_name"] == raw["cluster_name"]
    assert set(config["available_node_types"]) == set(raw["available_node_types"])
    assert config["head_node_type"] in config["available_node_types"]
