"""Where a sweep's files live on a cluster: the storage path, and the store that each node's trials read.

A multi-node sweep shares nothing through local disks (a worker node sees none of the head's
files), so:

- Ray's results and checkpoints go to a storage URI (``s3://...``, ``gs://...``) or a mount that
  every node shares (NFS, EFS, Lustre); :func:`check_storage_path` refuses a local folder on a
  multi-node cluster before anything starts. :func:`storage_filesystem` gives the pyarrow
  filesystem of a storage path: checkpoint paths reported by Ray Train come back without their
  scheme (``bucket/key``) and can only be opened with it.
- The store each trial opens is located on its own node (:func:`node_store`): the bundled demo is
  built there (a minute, once per node), a store at a storage URI is staged into the node's cache
  once (temp folder, then rename; the node's trials share it), and a local path must exist on every
  node. :func:`prepare_nodes` does this on every node that can run a trial before the first trial
  starts, so a missing store is one error that names the node and the path, not every trial failing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from agl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SHARED_MOUNT_TYPES = ("nfs", "nfs4", "cifs", "smb3", "lustre", "efs", "glusterfs", "ceph", "beegfs", "gpfs",
                      "fuse.s3fs", "fuse.mountpoint-s3", "fuse.gcsfuse", "fuse.juicefs", "9p")
STAGED_DIR = "stores"  # under the node's agl cache: stores staged from a storage URI


def is_uri(path: str | os.PathLike | None) -> bool:
    """True for a storage URI with a remote scheme (``s3://bucket/key``); False for a local path or ``file://``."""
    text = "" if path is None else str(path)
    return "://" in text and not text.startswith("file://")


def storage_filesystem(storage_path: str) -> Any:
    """The pyarrow filesystem of ``storage_path`` (for S3, pyarrow reads ``AWS_ENDPOINT_URL`` and the usual
    credential chain, as Ray does)."""
    import pyarrow.fs

    if not is_uri(storage_path):
        return pyarrow.fs.LocalFileSystem()
    return pyarrow.fs.FileSystem.from_uri(storage_path)[0]


def fs_path(uri: str) -> str:
    """The path inside its filesystem of a storage URI (``s3://bucket/key`` -> ``bucket/key``)."""
    return uri.split("://", 1)[1].rstrip("/") if is_uri(uri) else str(uri)


def mount_type(path: str | Path) -> str | None:
    """The filesystem type of the mount that holds ``path`` (Linux ``/proc/mounts``), None if unknown."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    target = Path(path).resolve()
    best: tuple[int, str] | None = None
    for point, kind in mounts:
        point = point.replace("\\040", " ")
        if target == Path(point) or target.is_relative_to(point):
            if best is None or len(point) > best[0]:
                best = (len(point), kind)
    return best[1] if best else None


def is_shared_mount(path: str | Path) -> bool:
    kind = mount_type(path)
    return kind is not None and (kind in SHARED_MOUNT_TYPES or kind.startswith("fuse."))


def check_storage_path(storage_path: str, address: str | None, nodes: int, flag: str = "--storage-path") -> None:
    """Refuse a local storage folder on a multi-node cluster: Ray writes checkpoints from each trial's node, and
    the driver (and a restored sweep) could not read what workers wrote to their own disks."""
    if is_uri(storage_path) or address in (None, "", "local") or nodes <= 1:
        return
    if is_shared_mount(Path(storage_path).parent if not Path(storage_path).exists() else storage_path):
        return
    raise ConfigError(flag, f"{storage_path!r} is a local folder, but the cluster at {address} has {nodes} nodes that "
                            f"share no disk: pass a storage URI every node can reach (--storage-path "
                            f"s3://BUCKET/agl-sweeps) or a shared mount (NFS/EFS) present on every node")


# --------------------------------------------------------------------------- the store on each node
def trial_store_spec(spec: str | None, head_path: str | Path) -> str:
    """What a trial is told to open: ``demo`` (built on its node), a storage URI (staged on its node), or the
    store's absolute path (which must then exist on every node)."""
    from agl.data.locate import DEMO

    if spec is None or str(spec) == DEMO:
        return DEMO
    return str(spec) if is_uri(spec) else str(head_path)


def node_store(spec: str | None) -> str:
    """The local folder of the store ``spec`` names, on the node this runs on (see the module docstring)."""
    if is_uri(spec):
        return str(stage_store(str(spec)))
    from agl.data.locate import resolve_store

    return str(resolve_store(spec))


def stage_store(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Copy the store at ``uri`` into this node's cache once and return the local folder.

    The folder's name carries a hash of the URI and of the remote manifest.json (which holds every file's
    sha256), so a changed store is staged afresh and never mixed with an old copy. The copy goes to a
    temporary sibling and is renamed into place under a lock: concurrent trials on a node copy once, and
    a crash never leaves a half-copied store behind the final name.
    """
    from agl.data.store import MANIFEST, open_store
    from agl.fileio import default_cache_dir, exclusive_lock

    fs, remote = storage_filesystem(uri), fs_path(uri)
    try:
        with fs.open_input_stream(f"{remote}/{MANIFEST}") as stream:
            manifest = stream.read()
    except (OSError, FileNotFoundError) as err:
        raise DataError(f"{uri.rstrip('/')}/{MANIFEST}", f"cannot read it ({type(err).__name__}: {err}); "
                                                         f"not an agl store, or not reachable from this node") from None
    key = hashlib.sha256(uri.rstrip("/").encode() + b"\0" + manifest).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / STAGED_DIR / f"{Path(remote).name}-{key}"
    with exclusive_lock(root / STAGED_DIR / f".{target.name}.lock"):  # a node's trials stage it once
        if not (target / MANIFEST).is_file():
            temp = target.with_name(f".{target.name}.part-{os.getpid()}")
            shutil.rmtree(temp, ignore_errors=True)
            log.info("staging the store %s into %s (once per node)", uri, target)
            download_tree(fs, remote, temp)
            if json.loads((temp / MANIFEST).read_bytes()) != json.loads(manifest):
                shutil.rmtree(temp, ignore_errors=True)
                raise DataError(f"{uri.rstrip('/')}/{MANIFEST}", "changed while it was being copied; run again")
            os.replace(temp, target)
    open_store(target)  # a copy that does not open fails here, naming the file
    return target


def download_tree(fs: Any, source: str, dest: Path) -> int:
    """Copy every file under ``source`` on ``fs`` to the local folder ``dest`` (object stores have no real folders,
    so each file's parent is made here); returns the number of files."""
    import pyarrow.fs

    count = 0
    for info in fs.get_file_info(pyarrow.fs.FileSelector(source, recursive=True)):
        if info.type != pyarrow.fs.FileType.File:
            continue
        target = Path(dest) / info.path[len(source.rstrip("/")) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as stream, open(target, "wb") as handle:
            while chunk := stream.read(8 * 1024 * 1024):
                handle.write(chunk)
        count += 1
    return count


def _prepare_here(spec: str, warm: Callable[[str], Any] | None) -> dict[str, str]:
    """On one node: locate (build, stage or check) the store, then ``warm(path)`` (its frozen-feature cache)."""
    import socket

    import ray

    where = {"node_ip": ray.util.get_node_ip_address(), "host": socket.gethostname()}
    try:
        path = node_store(spec)
        if warm is not None:
            warm(path)
    except Exception as err:  # reported per node by the driver, with the node named
        return {**where, "error": f"{type(err).__name__}: {err}"}
    return {**where, "path": path}


def trial_nodes(request: Mapping[str, float]) -> list[dict[str, Any]]:
    """The alive Ray nodes with room for one trial's ``request`` (Ray resource names: CPU, GPU, custom)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")
            and all(float(n.get("Resources", {}).get(k, 0.0)) >= v for k, v in request.items() if v > 0)]


def prepare_nodes(spec: str, request: Mapping[str, float], warm: Callable[[str], Any] | None = None,
                  timeout_s: float = 1800) -> dict[str, str]:
    """Make the store ``spec`` names ready on every node that can run a trial, before any trial starts
    (``warm``: run there on the node's store path, e.g. to compute the frozen-feature cache once per node).

    Returns node id -> local store path. Raises DataError naming each node that failed and why (e.g. the
    path that is missing there), so a sweep never starts trials that can only fail.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = trial_nodes(request)
    if not nodes:
        raise ConfigError("--trial-resource", f"no alive Ray node has the resources of one trial {dict(request)}")
    prepare = ray.remote(num_cpus=0, max_retries=0)(_prepare_here)
    refs = {n["NodeID"]: prepare.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(spec, warm) for n in nodes}
    found = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    failed = [f"node {r['node_ip']} ({r['host']}, id {node[:8]}): {r['error']}" for node, r in found.items()
              if "error" in r]
    if failed:
        hint = ("copy it to the same path on every node, or upload it (aws s3 sync STORE s3://BUCKET/stores/NAME) "
                "and pass --store s3://BUCKET/stores/NAME (staged once per node)")
        raise DataError(spec, f"the store is not usable on {len(failed)} of {len(found)} nodes that run trials "
                              f"({'; '.join(failed)}); no trial was started. {hint}")
    for node, r in found.items():
        log.info("store ready on node %s (%s): %s", r["node_ip"], node[:8], r["path"])
    return {node: r["path"] for node, r in found.items()}


# --------------------------------------------------------------------------- the sweep's own files in the bucket
STATE_SUFFIX = ".agl"  # <storage>/<name>.agl/: sweep.json, the trial table, summary, champion, beside Tune's folder


def state_uri(storage_path: str, name: str) -> str:
    """Where a sweep named ``name`` keeps its own files on a storage URI (beside Tune's experiment folder)."""
    return f"{storage_path.rstrip('/')}/{name}{STATE_SUFFIX}"


def mirror_to_storage(out: Path, storage_path: str, name: str, entries: list[str]) -> None:
    """Copy ``entries`` of the sweep folder (files or folders) to :func:`state_uri`, so a lost head loses nothing.

    A no-op for a local storage path (the files are then in ``out`` on the same disk)."""
    import pyarrow.fs

    if not is_uri(storage_path):
        return
    fs, target = storage_filesystem(storage_path), fs_path(state_uri(storage_path, name))
    local = pyarrow.fs.LocalFileSystem()
    for entry in entries:
        source = Path(out) / entry
        if source.is_dir():
            pyarrow.fs.copy_files(str(source), f"{target}/{entry}", source_filesystem=local, destination_filesystem=fs)
        elif source.is_file():
            with fs.open_output_stream(f"{target}/{entry}") as stream:
                stream.write(source.read_bytes())


def fetch_from_storage(out: Path, storage_path: str, name: str, state_file: str = "sweep.json") -> bool:
    """A fresh head's ``--resume``: copy the sweep's files from :func:`state_uri` into ``out`` (``state_file`` last,
    so a half copy is never taken for a sweep). Returns False when the storage holds no such sweep."""
    import pyarrow.fs

    if not is_uri(storage_path):
        return False
    fs, source = storage_filesystem(storage_path), fs_path(state_uri(storage_path, name))
    if fs.get_file_info(f"{source}/{state_file}").type != pyarrow.fs.FileType.File:
        return False
    out.mkdir(parents=True, exist_ok=True)
    for info in fs.get_file_info(pyarrow.fs.FileSelector(source, recursive=False)):
        entry = info.path.rsplit("/", 1)[-1]
        if entry == state_file:
            continue
        if info.type == pyarrow.fs.FileType.Directory:
            download_tree(fs, info.path, out / entry)
        else:
            with fs.open_input_stream(info.path) as stream:
                (out / entry).write_bytes(stream.read())
    from agl.fileio import atomic_write_text

    with fs.open_input_stream(f"{source}/{state_file}") as stream:
        atomic_write_text(out / state_file, stream.read().decode())
    log.info("restored the sweep's files from %s into %s", state_uri(storage_path, name), out)
    return True


__all__ = ["STATE_SUFFIX", "fetch_from_storage", "mirror_to_storage", "state_uri", "check_storage_path", "fs_path", "is_shared_mount", "is_uri", "mount_type", "node_store",
           "prepare_nodes", "stage_store", "storage_filesystem", "trial_nodes", "trial_store_spec"]
