"""End to end on a real Ray cluster: `ray up cluster-local.yaml` on 127.0.0.1 over ssh, then
`launch/tune.py --address auto --space tiny` on it, then teardown by process id.

Needs Debian's openssh-server and rsync (.ci/run installs them). The test generates its own
ssh key and host key, runs its own sshd on 127.0.0.1:22 when none is listening, and never
calls `ray stop`/`ray down`: it ends the cluster's processes by the PIDs that carry its
unique --temp-dir.
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SSHD = Path("/usr/sbin/sshd")
pytestmark = pytest.mark.cluster


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_with(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (our cluster's unique temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie waiting for its parent's wait() has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_pids(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        while time.time() < deadline and any(_running(p) for p in pids):
            time.sleep(0.3)


@pytest.fixture
def sshd(tmp_path: Path):
    """An sshd on 127.0.0.1:22 accepting a fresh key (ours, or the one already running)."""
    if not shutil.which("rsync"):
        pytest.skip("rsync not installed (apt-get install rsync); ray up syncs files with it")
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    if port_open(22):
        # an sshd is already there (CI): it must accept AGL_SSH_KEY, or we cannot log in
        given = os.environ.get("AGL_SSH_KEY")
        if not given:
            pytest.skip("an sshd already listens on 127.0.0.1:22; set AGL_SSH_KEY to a key it accepts")
        yield Path(given)
        return
    if not SSHD.exists():
        pytest.skip("sshd not installed (apt-get install openssh-server rsync); ray up needs ssh to head_ip")
    host_key = tmp_path / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    shutil.copy(key.with_suffix(".pub"), tmp_path / "authorized_keys")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation directory
    proc = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", "/dev/null", "-o", "ListenAddress=127.0.0.1", "-o", "Port=22",
         "-o", f"HostKey={host_key}", "-o", f"AuthorizedKeysFile={tmp_path / 'authorized_keys'}",
         "-o", "StrictModes=no", "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
         "-o", "PermitRootLogin=prohibit-password", "-o", "UsePAM=no", "-o", f"PidFile={tmp_path / 'sshd.pid'}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sshd.log", "wb"))
    try:
        deadline = time.time() + 20
        while not port_open(22):
            if proc.poll() is not None or time.time() > deadline:
                pytest.skip(f"sshd did not start: {(tmp_path / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.2)
        yield key
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_ray_up_local_cluster_runs_the_sweep(sshd: Path, demo_store: Path, tmp_path: Path) -> None:
    venv_bin = Path(sys.executable).parent
    port = free_port()
    # a short unique temp dir (Unix socket paths are limited to ~107 bytes); it marks our processes
    temp_dir = Path(tempfile.mkdtemp(prefix="aglc-", dir="/tmp"))
    name = f"agl-e2e-{temp_dir.name}"
    config = yaml.safe_load((REPO / "cluster-local.yaml").read_text())
    config["cluster_name"] = name
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(sshd)}
    config["head_start_ray_commands"] = [
        f"{venv_bin}/ray start --head --port={port} --num-cpus=2 --include-dashboard=false "
        f"--temp-dir={temp_dir} --object-store-memory={300 * 1024**2} --autoscaling-config=~/ray_bootstrap_config.yaml"]
    cfg_file = tmp_path / "cluster.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    try:
        up = subprocess.run([str(venv_bin / "ray"), "up", "-y", "--no-config-cache", str(cfg_file)],
                            env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
        assert pids_with(str(temp_dir)), "ray up returned but no head process carries our temp dir"
        # the driver finds the cluster through RAY_ADDRESS (robust when other Ray instances run here)
        out = tmp_path / "sweep"
        sweep = subprocess.run(
            [sys.executable, str(REPO / "launch" / "tune.py"), "--address", "auto", "--space", "tiny",
             "--store", str(demo_store), "--out", str(out)],
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, capture_output=True, text=True, timeout=600)
        assert sweep.returncode == 0, (sweep.stdout + sweep.stderr)[-4000:]
        assert "best trial" in sweep.stdout
        table = pd.read_csv(out / "trials.csv")
        assert len(table) == 2 and set(table["status"]) == {"finished"}
        assert table["val_pcc"].between(-1, 1).all()
    finally:
        stop_pids(pids_with(str(temp_dir)))
        shutil.rmtree(temp_dir, ignore_errors=True)
        Path(f"/tmp/ray/cluster-{name}.state").unlink(missing_ok=True)
        Path(f"/tmp/ray/cluster-{name}.lock").unlink(missing_ok=True)
    assert not pids_with(str(temp_dir))
