"""Secure defaults, checked by behaviour or by scanning what the project ships: a local Ray and an
`mlflow server` listen on loopback only, documented commands bind 127.0.0.1, checkpoints and
weights are never unpickled, cluster configs hold no credentials, and a store manifest cannot
address files outside the store. Each scanner first proves it sees a planted or documented case."""
from __future__ import annotations

import ast
import io
import ipaddress
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest
import torch
import yaml

from agl.errors import CheckpointError, DataError

REPO = Path(__file__).resolve().parents[1]
Socket = tuple[str, str, int]  # (process command line, address, port)


def describe(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()).strip() or p.name()
    except psutil.Error:  # ended meanwhile
        return ""


def listening(procs: list[psutil.Process]) -> list[Socket]:
    found: list[Socket] = []
    for p in procs:
        try:
            found += [(describe(p)[:160], c.laddr.ip, c.laddr.port) for c in p.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.Error:  # ended meanwhile
            pass
    return found


def exposed(sockets: list[Socket]) -> list[Socket]:
    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%")[0])
        return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback  # ::ffff:127.0.0.1 too
    return [s for s in sockets if not loopback(s[1])]


# --------------------------------------------------------------------------- 1. local Ray
RAY_SCRIPT = """
import json, os, sys, ray
from agl.distributed.runtime import init_ray
init_ray(num_cpus=1, dashboard=sys.argv[2] == "1", object_store_memory=100 * 1024**2)
node, ip = ray._private.worker.global_worker.node, ray.remote(lambda: ray.util.get_node_ip_address())
info = {"dashboard": ray._private.worker.get_dashboard_url() or None, "gcs": node.gcs_address,
        "node_ip": node.node_ip_address, "worker_ip": ray.get(ip.remote())}  # a worker process stays up
open(sys.argv[1] + ".tmp", "w").write(json.dumps(info))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
sys.stdin.readline()
ray.shutdown()
"""


@contextmanager
def local_ray(tmp_path: Path, dashboard: bool) -> Iterator[tuple[dict[str, Any], list[Socket], list[str]]]:
    """``init_ray`` in a subprocess: its info, and the listening sockets and command lines of its processes."""
    info_file, log = tmp_path / "ray.json", tmp_path / "ray.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", RAY_SCRIPT, str(info_file), str(int(dashboard))], cwd=REPO,
                                env=env, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    procs: list[psutil.Process] = []
    try:
        deadline = time.time() + 240
        while not info_file.exists():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"local Ray did not start: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        yield json.loads(info_file.read_text()), listening(procs), [describe(p) for p in procs]
    finally:
        try:
            proc.communicate(b"\n", timeout=60)  # the script calls ray.shutdown() and exits
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        for p in psutil.wait_procs([p for p in procs[1:] if p.is_running()], timeout=15)[1]:
            p.kill()  # a leftover of this session, by PID (psutil refuses a reused PID)


@pytest.mark.reliability(kind="secure default", case="local Ray from init_ray() (no dashboard)",
                         outcome="no dashboard; GCS, raylet, object manager, workers, agents listen on loopback only")
def test_local_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    with local_ray(tmp_path, dashboard=False) as (info, sockets, cmdlines):
        assert info["dashboard"] is None
        heads = [c for c in cmdlines if "ray/dashboard/dashboard.py" in c]  # Ray 2.60 keeps one, for usage stats
        ui_ports = {int(port) for c in heads for port in re.findall(r"--port=(\d+)", c)}
        assert all("--disable-frontend" in c for c in heads) and not [s for s in sockets if s[2] in ui_ports], heads
        assert int(info["gcs"].rsplit(":", 1)[1]) in {port for *_, port in sockets}, sockets  # the scan sees Ray
        assert not exposed(sockets), f"local Ray listens beyond loopback: {exposed(sockets)}"
        assert info["node_ip"] == info["worker_ip"] == "127.0.0.1"


@pytest.mark.reliability(kind="secure default", case="local Ray from init_ray(dashboard=True)",
                         outcome="the dashboard and every other Ray server listen on loopback only")
def test_dashboard_listens_on_loopback_only(tmp_path: Path) -> None:
    with local_ray(tmp_path, dashboard=True) as (info, sockets, _):
        port = int(info["dashboard"].rsplit(":", 1)[1])
        assert [s for s in sockets if s[2] == port], f"nothing listens on dashboard port {port}: {sockets}"
        assert not exposed(sockets), f"local Ray listens beyond loopback: {exposed(sockets)}"


# --------------------------------------------------------------------------- 2. MLflow, Ray CLI, wildcard address
def commands(path: Path, head: str) -> list[str]:
    """Invocations of ``head`` followed by options (a mention such as "`mlflow server` on ..." is none),
    in lines (continuations joined) or Python string literals (f-string fields as {}) and argv lists."""
    text = path.read_text()
    texts = text.replace("\\\n", " ").splitlines()
    if path.suffix == ".py":
        tree, texts = ast.parse(text), []
        parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts:
                texts.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                texts.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
            elif isinstance(node, (ast.List, ast.Tuple)) and "mlflow" in text:  # argv: [exe, "server", ...]
                argv = [str(e.value) if isinstance(e, ast.Constant) else "{}" for e in node.elts]
                texts += [" ".join(["mlflow", *argv[argv.index("server"):]])] if "server" in argv else []
    found = []
    for line in texts:
        for m in re.finditer(head, line):
            rest = re.split(r"[`'\"#;|)]|&&", line[m.end():], maxsplit=1)[0]
            found += [m.group(0) + rest] if re.match(r"\s+-", rest) else []
    return found


@pytest.mark.reliability(kind="secure default", case="mlflow server / ray start --head in docs, configs, code, tests",
                         outcome="all pass --host 127.0.0.1; every head disables or loopback-binds the dashboard")
def test_documented_commands_bind_loopback() -> None:
    files = sorted({p for g in ("README.md", "docs/*.md", "cluster*.yaml", "agl/**/*.py", "launch/*.py", "scripts/*",
                                "tests/*.py") for p in REPO.glob(g)})
    mlflow = {p.relative_to(REPO).as_posix(): commands(p, r"\bmlflow\s+(?:server|ui)\b") for p in files}
    heads = {p.relative_to(REPO).as_posix(): commands(p, r"\bray\s+start\s+--head\b") for p in files}
    assert {"README.md", "docs/distributed.md", "tests/servers.py"} <= {n for n, c in mlflow.items() if c}, mlflow
    assert {"cluster.yaml", "cluster-local.yaml"} <= {n for n, c in heads.items() if c}, heads
    bad = [f"{n}: {c}" for n, cs in mlflow.items() for c in cs if not re.search(r"(--host|-h)[= ]127\.0\.0\.1\b", c)]
    bad += [f"{n}: {c}" for n, cs in heads.items() for c in cs
            if not re.search(r"--include-dashboard[= ]false\b|--dashboard-host[= ]127\.0\.0\.1\b", c)]
    assert not bad, "commands that listen beyond loopback:\n" + "\n".join(bad)


@pytest.mark.reliability(kind="secure default", case="wildcard address in any tracked file",
                         outcome="appears only on lines that warn against binding it")
def test_no_wildcard_address_in_tracked_files() -> None:
    # git grep: the tracked files as they are in the working tree, binary files (-I) skipped
    found = subprocess.run(["git", "grep", "-n", "-I", "-E", r"(^|[^0-9.])0\.0\.0\.0($|[^0-9.])"], cwd=REPO,
                           capture_output=True, text=True)
    if found.returncode not in (0, 1):  # 1: no match
        pytest.skip(f"git grep failed (not a git checkout?): {found.stderr}")
    bad = [hit for hit in found.stdout.splitlines()
           if not re.search(r"(?i)\b(never|not|avoid|insecure)\b", hit.split(":", 2)[-1])]
    assert not bad, "\n".join(bad)


@pytest.mark.reliability(kind="secure default", case="mlflow server started as documented (--host 127.0.0.1)",
                         outcome="its listening sockets are loopback only")
def test_mlflow_server_listens_on_loopback_only(tmp_path: Path) -> None:
    from servers import MlflowServer  # runs in its own session; stop() ends it by process group id

    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        sockets = listening([psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)])
    finally:
        server.stop()
    assert server.port in {port for *_, port in sockets} and not exposed(sockets), sockets


# --------------------------------------------------------------------------- 3. never unpickle
def unsafe_loads(source: str) -> list[str]:
    """Calls that can unpickle (or build objects from YAML tags), import aliases resolved."""
    tree, alias, bad = ast.parse(source), {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            alias.update({a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0] for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            alias.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    for node in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        parts, f = [], node.func
        while isinstance(f, ast.Attribute):
            parts, f = [f.attr, *parts], f.value
        name = ".".join([alias.get(f.id, f.id), *parts]) if isinstance(f, ast.Name) else ""
        mods, last, kw = name.split(".")[:-1], name.rsplit(".", 1)[-1], {k.arg: k.value for k in node.keywords}
        if (({"pickle", "_pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"} & set(mods)
             and last in {"load", "loads", "Unpickler", "open"}) or last in {"read_pickle", "unsafe_load", "full_load"}
                or (name == "torch.load" and getattr(kw.get("weights_only"), "value", None) is not True)
                or (name == "numpy.load" and "allow_pickle" in kw and getattr(kw["allow_pickle"], "value", 1) is not False)
                or (name == "yaml.load" and not ast.unparse(kw.get("Loader", ast.Constant(""))).endswith("SafeLoader"))):
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    return bad


@pytest.mark.reliability(kind="secure default", case="load calls in agl/ (pickle, torch.load, np.load, yaml, joblib, pandas)",
                         outcome="none can unpickle: torch.load only with weights_only=True, yaml only safe loaders")
def test_package_never_unpickles() -> None:
    planted = ("import numpy as np, torch, yaml\nfrom pickle import loads as l\n"
               "l(b); torch.load(f); np.load(f, allow_pickle=True); yaml.load(s)")
    assert len(unsafe_loads(planted)) == 4 and not unsafe_loads("import torch\ntorch.load(f, weights_only=True)")
    bad = {str(p.relative_to(REPO)): found for p in sorted((REPO / "agl").rglob("*.py"))
           if (found := unsafe_loads(p.read_text()))}
    assert not bad, bad


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def live_payloads(marker: Path) -> dict[str, bytes]:
    """A plain pickle and a torch.save zip that create ``marker`` when unpickled (shown here, then reset)."""
    buf = io.BytesIO()
    torch.save({"weight": _Payload(marker)}, buf)
    blobs = {"pickle": pickle.dumps({"weight": _Payload(marker)}), "torch.save": buf.getvalue()}
    unsafe = {"pickle": pickle.loads, "torch.save": lambda b: torch.load(io.BytesIO(b), weights_only=False)}
    for kind, blob in blobs.items():
        unsafe[kind](blob)
        assert marker.exists(), f"the {kind} payload does not run when unpickled: the test would prove nothing"
        marker.unlink()
    return blobs


@pytest.fixture(scope="module")
def checkpoint(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint: one epoch on the demo store with cheap real features (see trainkit)."""
    from agl.training.bundles import make_bundle
    from agl.training.loop import fit
    from trainkit import first_split, small_config, use_cheap_features

    mp = pytest.MonkeyPatch()
    use_cheap_features(mp)
    try:
        cfg, out = small_config(epochs=1), tmp_path_factory.mktemp("run")
        fit(cfg, make_bundle(demo_store, first_split(demo_store), cfg), out_dir=out)
    finally:
        mp.undo()
    return out / "checkpoint"


@pytest.mark.reliability(kind="secure default", case="code-running pickle as model.safetensors or best.safetensors",
                         outcome="load_checkpoint raises CheckpointError naming the file; the code never runs")
def test_checkpoint_pickle_never_runs(checkpoint: Path, tmp_path: Path) -> None:
    from agl.training.checkpoint import load_checkpoint

    load_checkpoint(checkpoint)  # the untouched checkpoint loads
    marker = tmp_path / "pickle-ran"
    for kind, blob in live_payloads(marker).items():
        for name in ("model.safetensors", "best.safetensors"):
            bad = shutil.copytree(checkpoint, tmp_path / f"{kind}-{name}")
            (bad / name).write_bytes(blob)
            with pytest.raises(CheckpointError, match=re.escape(name)):
                load_checkpoint(bad)
            assert not marker.exists(), f"{kind} as {name} ran"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch, before it refuses the file
@pytest.mark.reliability(kind="secure default", case="code-running pickle as backbone weights (.pth, .safetensors)",
                         outcome="create_backbone raises CheckpointError; the code never runs")
def test_backbone_weights_pickle_never_runs(tmp_path: Path) -> None:
    from agl.models.backbones import create_backbone

    marker = tmp_path / "pickle-ran"
    for kind, blob in live_payloads(marker).items():
        for suffix in (".pth", ".safetensors"):
            weights = tmp_path / f"{kind.replace('.', '-')}{suffix}"
            weights.write_bytes(blob)
            with pytest.raises(CheckpointError, match="cannot read weights safely"):
                create_backbone("torchvision/resnet18", weights=weights)
            assert not marker.exists(), f"{kind} as {suffix} ran"


# --------------------------------------------------------------------------- 4. cluster configs
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET_KEY = re.compile(r"(?i)access_key|secret|passw|token|api_key|private_key|credential")
INLINE = re.compile(r"(?i)(secret|passw\w*|token|access_key\w*)\s*[=:]\s*['\"]?[A-Za-z0-9/+_-]{8,}")


def literal_secrets(node: Any, where: str = "") -> list[str]:
    """Secret-looking keys with literal values (a ~/, / path or $VAR is a reference), and key-like strings."""
    if isinstance(node, dict):
        return [f for k, v in node.items() for f in
                ([f"{where}.{k}"] if SECRET_KEY.search(str(k)) and not str(k).startswith(("~", "/"))
                 and not isinstance(v, (dict, list)) and v not in (None, "")
                 and not (isinstance(v, str) and v.startswith(("~", "/", "./", "$"))) else [])
                + literal_secrets(v, f"{where}.{k}")]
    if isinstance(node, list):
        return [f for i, v in enumerate(node) for f in literal_secrets(v, f"{where}[{i}]")]
    text = str(node)
    return [where] if AWS_KEY_ID.search(text) or "-----BEGIN" in text or INLINE.search(text) else []


@pytest.mark.reliability(kind="secure default", case="cluster.yaml and cluster-local.yaml",
                         outcome="no keys, passwords, tokens or private keys; AWS nodes use an IAM instance profile")
def test_cluster_configs_hold_no_credentials() -> None:
    planted = {"provider": {"aws_secret_access_key": "x" * 40}, "auth": {"ssh_private_key": "~/.ssh/k"},
               "setup_commands": ["export AWS_ACCESS_KEY_ID=" + "AKIA" + "Q" * 16]}
    assert literal_secrets(planted) == [".provider.aws_secret_access_key", ".setup_commands[0]"]
    for name in ("cluster.yaml", "cluster-local.yaml"):
        text = (REPO / name).read_text()  # comments included
        assert not AWS_KEY_ID.search(text) and "-----BEGIN" not in text, name
        assert not literal_secrets(yaml.safe_load(text)), (name, literal_secrets(yaml.safe_load(text)))
    aws = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert aws["provider"]["type"] == "aws" and "aws_credentials" not in aws["provider"]
    for node_type, spec in aws["available_node_types"].items():
        profile = spec["node_config"].get("IamInstanceProfile") or {}
        assert profile.get("Name") or profile.get("Arn"), f"{node_type} has no IAM instance profile"


# --------------------------------------------------------------------------- 5. store manifest paths
@pytest.fixture
def store_copy(small_store: Path, tmp_path: Path) -> Path:
    return shutil.copytree(small_store, tmp_path / "store")


def edit_manifest(store: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    change(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("entry", ["../outside.txt", "ABSOLUTE"])
@pytest.mark.reliability(kind="secure default", case="manifest 'files' entry ../outside.txt or an absolute path",
                         outcome="opening/verifying the store raises DataError: the entry escapes the store")
def test_manifest_file_outside_the_store_is_refused(store_copy: Path, entry: str) -> None:
    from agl.data.store import open_store
    from agl.fileio import sha256_file

    outside = store_copy.parent / "outside.txt"
    outside.write_text("not part of the store")
    rel = str(outside) if entry == "ABSOLUTE" else entry
    open_store(store_copy).verify()  # the untouched copy verifies
    edit_manifest(store_copy, lambda m: m["files"].update({rel: sha256_file(outside)}))  # a matching digest
    with pytest.raises(DataError) as err:
        open_store(store_copy).verify()
    assert rel in str(err.value) and "escapes" in str(err.value)


@pytest.mark.reliability(kind="secure default", case="split name ../../x in the manifest",
                         outcome="the store refuses it with DataError naming it; nothing outside is read")
def test_split_name_outside_the_store_is_refused(store_copy: Path) -> None:
    from agl.data.store import open_store

    first = open_store(store_copy).split_names[0]
    shutil.copy(store_copy / "gene_sets" / f"{first}.parquet", store_copy.parent / "x.parquet")  # readable if reached
    edit_manifest(store_copy, lambda m: m["splits"].append("../../x"))
    with pytest.raises(DataError, match=re.escape("../../x")):
        open_store(store_copy).gene_set("../../x")
