"""Small file helpers shared by every part of agl: hashing, strict JSON and atomic writes.

Every output file is written to a hidden temporary file in the same folder and then
renamed into place with ``os.replace`` (atomic on one file system), so a crash never
leaves a half-written file under the final name. Temporary names start with "." so that
folder copies which skip hidden files (e.g. MLflow artifact uploads) never pick them up.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks of ``chunk`` bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def jsonable(value: Any, *, max_array: int | None = None) -> Any:
    """Plain JSON values: numpy scalars/arrays to Python, NaN/inf to None (strict JSON).

    Arrays with more than ``max_array`` elements become a short ``"array[shape]"`` note
    (for reports that should record that an array was there, not its contents).
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v, max_array=max_array) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, max_array=max_array) for v in value]
    if isinstance(value, np.ndarray):
        if max_array is not None and value.size > max_array:
            return f"array{list(value.shape)}"
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An advisory lock between the processes of one machine (no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def default_cache_dir() -> Path:
    """Where agl keeps derived files it can rebuild (the demo store, images taken out of .h5ad files):
    ``$AGL_CACHE_DIR`` if set, else ``~/.cache/agl``."""
    env = os.environ.get("AGL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "agl"


def _temp_sibling(path: Path) -> Path:
    """A hidden, unique temporary name beside ``path`` (not ending in its suffix, so globs skip it)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary_path)``, then rename the result to ``path``; the temporary goes on failure."""
    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, value: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``value`` as strict JSON (see :func:`jsonable`) atomically; ``default`` as in ``json.dumps``."""
    text = json.dumps(jsonable(value), indent=indent, allow_nan=False, default=default) + "\n"
    return atomic_write_text(path, text)


def atomic_savefig(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """``fig.savefig(path, **kwargs)`` atomically (the figure is left open).

    The format comes from ``path``'s suffix (PNG without one) unless ``format`` is given,
    since the temporary file name does not carry the suffix.
    """
    kwargs.setdefault("format", Path(path).suffix.lstrip(".") or "png")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, **kwargs))


def swap_folder(tmp: str | Path, out: str | Path) -> Path:
    """Rename the finished folder ``tmp`` to ``out``, replacing an existing ``out`` only once ``tmp`` is in place.

    If the final rename fails the previous ``out`` is put back, so there is never no
    folder or half a folder under ``out``. Callers decide beforehand whether replacing is allowed.
    """
    tmp, out = Path(tmp), Path(out)
    if not out.exists():
        os.rename(tmp, out)
        return out
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- output folders
OUTPUT_MARKER = ".agl-output.json"
# Files that identify an output written before the marker existed (or, for a store, instead of it).
SIGNATURES: dict[str, tuple[str, ...]] = {
    "ingest": ("manifest.json",),
    "tune": ("sweep.json",),
    "evaluate": ("grid.json",),
    "predict": ("predictions.h5ad",),
    "train": ("result.json", "checkpoint"),  # last: the other commands' folders may hold runs
}


def _forms(path: str | Path) -> set[Path]:
    """``path`` as typed (made absolute) and with symlinks resolved: either may be how two paths meet."""
    p = Path(path).expanduser()
    return {Path(os.path.abspath(p)), p.resolve()}


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def output_owner(folder: str | Path) -> str | None:
    """The agl command that wrote ``folder`` (its marker, else a known signature file), or None."""
    folder = Path(folder)
    marker = folder / OUTPUT_MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text())["command"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a damaged marker proves nothing: treat the folder as foreign
    for command, names in SIGNATURES.items():
        if any((folder / name).exists() for name in names):
            return command
    return None


def check_output_folder(out: str | Path, command: str, *, inputs: Sequence[str | Path | None] = (),
                        overwrite: bool = False, reuse: bool = False, what: str | None = None) -> str:
    """Refuse (``DataError`` naming ``out``) to write ``agl COMMAND``'s output where it could destroy data.

    Refused: ``out`` is one of ``inputs`` or a folder above one; ``out`` is a file; ``out`` holds
    files that ``agl COMMAND`` did not write (no marker, or another command's); an earlier output
    of the same command without ``overwrite`` (or ``reuse``, for commands that resume in place).
    ``out`` inside an input folder is allowed (a fresh folder, or an earlier output of this command).
    Returns ``"fresh"`` (absent or empty) or ``"own"`` (an earlier output of this command).
    """
    from agl.errors import DataError, OutputExistsError

    out = Path(out)
    what = what or f"an `agl {command}` output"
    for given in (i for i in inputs if i is not None and str(i) != ""):
        for o in _forms(out):
            for i in _forms(given):
                if o == i:
                    raise DataError(out, f"is the input {given}; refusing to write agl {command}'s output "
                                         "over it (choose another --out)")
                if _within(i, o):
                    raise DataError(out, f"holds the input {given}; refusing to write agl {command}'s output "
                                         "there (choose another --out)")
    if not out.exists() and not out.is_symlink():
        return "fresh"
    if not out.is_dir():
        raise OutputExistsError(out, f"exists and is not a folder; refusing to replace it with {what}")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return "fresh"
    owner = output_owner(out)
    if owner is None:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise OutputExistsError(out, f"already exists and is not {what} (it holds {shown}); refusing to replace it "
                             "(choose another --out)")
    if owner != command:
        raise OutputExistsError(out, f"holds the output of `agl {owner}`, not {what}; refusing to replace it "
                             "(choose another --out)")
    if not (overwrite or reuse):
        raise OutputExistsError(out, f"already exists ({what}); pass --overwrite to replace it")
    return "own"


def write_output_marker(folder: str | Path, command: str, **details: Any) -> Path:
    """Mark ``folder`` as ``agl COMMAND``'s output, so a later ``--overwrite`` may replace it."""
    from agl import __version__

    record = {"command": command, "version": __version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **details}
    return atomic_write_json(Path(folder) / OUTPUT_MARKER, record)


# --------------------------------------------------------------------------- output locations
MIN_FREE_MB = 100  # free space asked of an output location before any work ($AGL_MIN_FREE_MB overrides)
_REFUSALS = {errno.EACCES: "is not writable (permission denied)", errno.EPERM: "is not writable (permission denied)",
             errno.EROFS: "is on a read-only file system", errno.ENOSPC: "has no space left",
             errno.EDQUOT: "is over its disk quota"}


def write_refusal(err: OSError) -> str | None:
    """What an OSError says about an output location ("is on a read-only file system"), or None for
    errors that are not the file system refusing a write."""
    return _REFUSALS.get(err.errno)


def check_output_location(out: str | Path, flag: str = "--out", need_mb: float | None = None) -> Path:
    """Before any work: ``out`` (a folder, made later) can be written, and its file system has room.

    Walks up to the nearest folder that exists, refuses a file in the way, writes and removes a
    hidden probe file there (what the command will do; root passes permission bits, a read-only
    mount still refuses), and asks ``need_mb`` (default :data:`MIN_FREE_MB`) free MiB of it. Raises
    ``DataError`` naming the path and the problem; returns the folder probed.
    """
    from agl.errors import DataError

    out = Path(os.path.abspath(Path(out).expanduser()))
    base = out
    while not base.exists():
        if base.is_symlink():
            raise DataError(base, f"is a broken symbolic link; {flag} {out} cannot be created there")
        base = base.parent
    if not base.is_dir():
        what = "the output" if base == out else f"{flag} {out}"
        raise DataError(base, f"is a file, not a folder; {what} cannot be written there (choose another {flag})")
    probe = base / f".agl-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as fh:
            try:
                fh.write(b"0")
            finally:
                probe.unlink()  # created: remove it (an unlink on a read-only mount fails even when absent)
    except OSError as err:
        problem = write_refusal(err) or f"cannot be written: {err.strerror or err}"
        raise DataError(base, f"{problem}; {flag} {out} cannot be written there (choose another {flag})") from None
    need = float(os.environ.get("AGL_MIN_FREE_MB", MIN_FREE_MB) if need_mb is None else need_mb)
    free = shutil.disk_usage(base).free / 2**20
    if free < need:
        raise DataError(base, f"has only {free:.0f} MiB free, less than the {need:.0f} MiB asked before writing "
                              f"{flag} {out}; free some space or choose another {flag} "
                              "(AGL_MIN_FREE_MB sets the amount asked)")
    return base
