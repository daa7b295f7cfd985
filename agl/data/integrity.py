"""A cheap check of a store's files against its manifest, run before training reads them.

``Store.verify`` (``agl info --verify``, ``agl train --verify``) recomputes every file's sha256:
about a second per 400 MB on one core, too slow to repeat before every run of a large store. So
the quick check keeps a stamp in the store's ``cache/`` (which the manifest does not list):
after a file's sha256 has once matched the manifest, the stamp records its size, modification
time and the digest of three 64 KiB samples (start, middle, end). Later runs then only

- stat every listed file: a missing file, or one whose size or modification time differs from
  the stamp, is hashed in full again and refused if its sha256 differs from the manifest;
- re-read the three samples of every file: a change that kept the size and time (bit rot, a
  copy that restored the times) is caught when it falls in a sample; ``--verify`` catches all.

A store never checked before is hashed in full once (as ``--verify``). A read-only store (no
writable ``cache/``) cannot keep the stamp, so every run hashes it in full.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from agl.errors import DataError
from agl.fileio import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

STAMP = Path("cache") / "integrity.json"
SAMPLE_BYTES = 1 << 16
STAMP_VERSION = 1


def sample_digest(path: Path, size: int) -> str:
    """sha256 of three ``SAMPLE_BYTES`` blocks of the file: at its start, middle and end."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
            fh.seek(offset)
            digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _read_stamp(file: Path) -> dict[str, Any]:
    import json

    try:
        stamp = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(stamp, dict) or stamp.get("version") != STAMP_VERSION or not isinstance(stamp.get("files"), dict):
        return {}
    return stamp["files"]


def _changed(f: Path, rel: str) -> DataError:
    return DataError(f, "sha256 differs from manifest.json: the store was modified or corrupted after it was "
                        f"written ({rel}); rebuild it with agl ingest, or restore the file")


def check_store_files(store: Any, full: bool = False) -> dict[str, int]:
    """Check ``store``'s listed files against its manifest (module doc); raise DataError naming the first bad file.

    ``full``: recompute every sha256 (``Store.verify``: also refuses unlisted files). Returns counts
    ``{"files", "hashed", "sampled"}`` of what was done.
    """
    root = Path(store.path)
    if full:
        store.verify()
    listed: dict[str, str] = store.manifest.get("files", {})
    stamp = {} if full else _read_stamp(root / STAMP)
    fresh: dict[str, Any] = {}
    hashed = sampled = 0
    for rel, expected in listed.items():
        f = root / rel  # open_store has refused names that leave the store folder
        try:
            st = f.stat()
        except OSError:
            raise DataError(f, "missing from the store (listed in manifest.json); rebuild it with agl ingest") from None
        seen = stamp.get(rel)
        if (not full and isinstance(seen, dict) and seen.get("sha256") == expected
                and seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns):
            sampled += 1
            if sample_digest(f, st.st_size) != seen.get("sample"):
                raise _changed(f, rel)
            fresh[rel] = seen
            continue
        if not full:  # store.verify() above has hashed it already
            hashed += 1
            if sha256_file(f) != expected:
                raise _changed(f, rel)
        fresh[rel] = {"sha256": expected, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                      "sample": sample_digest(f, st.st_size)}
    if fresh != stamp:
        try:
            (root / STAMP).parent.mkdir(exist_ok=True)
            atomic_write_json(root / STAMP, {"version": STAMP_VERSION, "files": fresh})
        except OSError as err:  # a read-only store: every run hashes in full
            log.debug("could not keep the integrity stamp of %s: %s", root, err)
    if hashed:
        log.info("checked %d of %d store files by sha256 (%s)", hashed, len(listed), root)
    from agl.data.stain import store_record

    store_record(store)  # the manifest's stain record and stain.json agree (a store cut without one: nothing to do)
    return {"files": len(listed), "hashed": hashed if not full else len(listed), "sampled": sampled}

