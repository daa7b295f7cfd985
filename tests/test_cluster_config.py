"""cluster.yaml (AWS GPU) and cluster-local.yaml validated offline with Ray's own config code."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


def prepared(raw: dict) -> dict:
    """What `ray up` does before launching: fill defaults (prepare_config), then validate against the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def start_commands(config: dict) -> list[str]:
    return config["head_start_ray_commands"] + config["worker_start_ray_commands"]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_valid_for_ray_and_safe(name: str) -> None:
    raw = load(name)
    config = prepared(raw)
    assert config["head_node_type"] in config["available_node_types"]
    text = (REPO / name).read_text()
    # no credentials in the file
    assert not re.search(r"AKIA[0-9A-Z]{12,}|aws_secret_access_key|aws_access_key_id|BEGIN [A-Z ]*PRIVATE KEY", text)
    # never `ray stop` in the cluster's own commands (it ends every Ray process of the user)
    assert not any(re.search(r"\bray stop\b", c) for c in start_commands(config))
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])


def test_aws_cluster_has_gpu_workers_and_installs_the_project() -> None:
    config = prepared(load("cluster.yaml"))
    assert config["provider"]["type"] == "aws"
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert any(v["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p3.", "p4", "p5")) for v in workers.values())
    setup = "\n".join(config["setup_commands"])
    assert re.search(r"pip install .*-e ~/agl", setup) and "~/agl" in config["file_mounts"]
    # torch/torchvision pinned as in pyproject.toml
    pyproject = (REPO / "pyproject.toml").read_text()
    for pin in re.findall(r'"(torch(?:vision)?==[0-9.]+)"', pyproject):
        assert pin in setup, pin
    # token auth: the same token file on every node, and token mode on head and workers
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert all("RAY_AUTH_MODE=token" in c for c in start_commands(config) if "ray start" in c)


def test_local_cluster_is_this_machine() -> None:
    from ray.autoscaler._private.commands import _bootstrap_config

    raw = load("cluster-local.yaml")
    assert raw["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    config = _bootstrap_config(prepared(raw), no_config_cache=True)  # the local provider's own bootstrap
    assert config["provider"]["head_ip"] == "127.0.0.1"


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_broken_configs_are_rejected(name: str) -> None:
    raw = load(name)
    bad_key = {**copy.deepcopy(raw), "setup_comands": []}
    with pytest.raises(jsonschema.ValidationError, match="setup_comands"):
        prepared(bad_key)
    bad_head = copy.deepcopy(raw)
    bad_head["head_node_type"] = "nope"
    if "available_node_types" in raw:
        with pytest.raises(ValueError, match="head_node_type"):
            prepared(bad_head)


def test_aws_cluster_as_an_operator_wants_it() -> None:
    """One zone, SSH limited to a range, workers without the head's EC2 rights, installs from the lock file."""
    raw = load("cluster.yaml")
    config = prepared(raw)
    provider = config["provider"]
    assert "," not in provider["availability_zone"]  # one availability zone
    ssh = [p for p in provider["security_group"]["IpPermissions"] if p["FromPort"] <= 22 <= p["ToPort"]]
    assert ssh and all(r["CidrIp"] != "0.0.0.0/0" for p in ssh for r in p["IpRanges"])  # SSH never open to all
    types = config["available_node_types"]
    head_profile = types[config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    worker_profiles = {v["node_config"]["IamInstanceProfile"]["Name"] for k, v in types.items()
                       if k != config["head_node_type"]}
    assert head_profile not in worker_profiles
    installs = [c for c in config["setup_commands"] if "pip install" in c and "-U pip" not in c and "--no-deps" not in c]
    assert installs and all("-c ~/agl/requirements-lock.txt" in c for c in installs)
