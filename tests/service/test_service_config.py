"""Settings precedence, the settings file, `blda serve`'s Prometheus directory, micro-batching."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr, ValidationError

from service.batching import MicroBatcher
from service.cli import MULTIPROC_ENV, prepare_multiprocess_dir, serve_workers
from service.settings import ServiceSettings, SettingsFileError, auto_workers, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_environment_overrides_the_file_and_arguments_override_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "service.toml"
    path.write_text(
        'workers = 2\nmax_image_pixels = 1000\ndefault_model = "a"\npinned_versions = { a = "3" }\n'
    )
    monkeypatch.setenv("BLDA_WORKERS", "4")
    settings = load_settings(path, default_model="b")
    assert settings.workers == 4  # environment over file
    assert settings.max_image_pixels == 1000  # file over default
    assert settings.default_model == "b"  # argument over everything
    assert settings.pinned_versions == {"a": "3"}
    monkeypatch.setenv("BLDA_SETTINGS_FILE", str(path))
    assert load_settings().max_image_pixels == 1000


def test_json_settings_file_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "s.json"
    good.write_text('{"batch_max_size": 4}')
    assert load_settings(good).batch_max_size == 4
    with pytest.raises(SettingsFileError, match=r"s\.yaml: expected a \.toml or \.json"):
        (tmp_path / "s.yaml").write_text("a: 1")
        load_settings(tmp_path / "s.yaml")
    with pytest.raises(SettingsFileError, match="expected valid TOML"):
        (tmp_path / "bad.toml").write_text("workers = = 2")
        load_settings(tmp_path / "bad.toml")
    with pytest.raises(SettingsFileError, match="expected a readable settings file"):
        load_settings(tmp_path / "missing.toml")
    with pytest.raises(ValidationError, match="no_such_setting"):
        (tmp_path / "extra.json").write_text('{"no_such_setting": 1}')
        load_settings(tmp_path / "extra.json")


def test_threads_follow_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.settings.available_cores", lambda: 16)
    assert ServiceSettings(workers=4).onnx_threads() == 4
    assert ServiceSettings(workers=32).onnx_threads() == 1
    assert ServiceSettings(workers=4, intra_op_threads=2).onnx_threads() == 2


def test_serve_runs_one_worker_per_core_unless_told(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--workers, else BLDA_WORKERS or the settings file, else one per core (at most 8)."""
    assert [auto_workers(n) for n in (1, 2, 3, 8, 64)] == [1, 2, 3, 8, 8]
    monkeypatch.setattr("service.settings.available_cores", lambda: 2)
    monkeypatch.delenv("BLDA_WORKERS", raising=False)
    assert serve_workers(None, load_settings()) == 2
    assert serve_workers(1, load_settings()) == 1
    (tmp_path / "s.toml").write_text("workers = 3\n")
    assert serve_workers(None, load_settings(tmp_path / "s.toml")) == 3
    monkeypatch.setenv("BLDA_WORKERS", "1")
    assert serve_workers(None, load_settings()) == 1  # an explicit 1 is not "unset"
    assert ServiceSettings(workers=2).onnx_threads() == 1  # each of the two workers: one thread


def test_admin_key_is_secret() -> None:
    settings = ServiceSettings(admin_api_key=SecretStr("s3cret"))
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())
    assert ServiceSettings().admin_api_key is None


def test_prometheus_directory_only_for_several_workers(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    assert prepare_multiprocess_dir(1, environ) is None and MULTIPROC_ENV not in environ
    created = prepare_multiprocess_dir(2, environ)
    assert created is not None and created.is_dir() and not any(created.iterdir())
    assert environ[MULTIPROC_ENV] == str(created)
    os.rmdir(created)


def test_a_given_prometheus_directory_is_emptied_of_stale_metrics(tmp_path: Path) -> None:
    given = tmp_path / "prometheus"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"stale")
    (given / "keep.txt").write_text("not a metric file")
    preset = {MULTIPROC_ENV: str(given)}
    assert prepare_multiprocess_dir(3, preset) is None and preset[MULTIPROC_ENV] == str(given)
    assert sorted(p.name for p in given.iterdir()) == ["keep.txt"]
    missing = {MULTIPROC_ENV: str(tmp_path / "new" / "dir")}
    prepare_multiprocess_dir(1, missing)
    assert (tmp_path / "new" / "dir").is_dir()


def test_micro_batcher_batches_concurrent_requests_and_returns_each_its_own() -> None:
    batch_sizes: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:  # (N, 3, H, W) -> (N, 2, H, W): a per-sample function
        batch_sizes.append(len(batch))
        return np.concatenate([batch.sum(axis=1, keepdims=True), batch.max(axis=1, keepdims=True)], axis=1)

    inputs = [np.full((1, 3, 4, 4), i, dtype=np.float32) for i in range(7)]
    inputs.append(np.ones((1, 3, 8, 8), dtype=np.float32))  # another shape: another batch

    async def main() -> list[np.ndarray]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(pool, max_batch=4, max_wait_s=0.05)
            return await asyncio.gather(*(batcher.submit(run, x) for x in inputs))

    outputs = asyncio.run(main())
    for x, y in zip(inputs, outputs, strict=True):
        assert np.array_equal(y, run(x))
    assert sorted(batch_sizes[:3]) == [1, 3, 4]  # 7 of one shape: full batch of 4, then 3 on the timer


def test_micro_batcher_propagates_errors() -> None:
    def run(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("inference failed")

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(pool, max_batch=2, max_wait_s=0.01)
            results = await asyncio.gather(
                *(batcher.submit(run, np.zeros((1, 3, 2, 2), np.float32)) for _ in range(3)),
                return_exceptions=True,
            )
            assert all(isinstance(r, RuntimeError) for r in results)

    asyncio.run(main())


def test_the_service_imports_neither_torch_nor_onnx() -> None:
    code = (
        "import sys\n"
        "from service.app import create_app\n"
        "import service.cli, blda.cli\n"
        "create_app()\n"
        "print(sorted(m for m in ('torch', 'onnx', 'training.uda.loop') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


ENVIRONMENTS = {
    "linux-x86_64": {"sys_platform": "linux", "platform_machine": "x86_64", "platform_system": "Linux"},
    "windows-amd64": {"sys_platform": "win32", "platform_machine": "AMD64", "platform_system": "Windows"},
    "macos-arm64": {"sys_platform": "darwin", "platform_machine": "arm64", "platform_system": "Darwin"},
    "macos-x86_64": {"sys_platform": "darwin", "platform_machine": "x86_64", "platform_system": "Darwin"},
    "linux-aarch64": {"sys_platform": "linux", "platform_machine": "aarch64", "platform_system": "Linux"},
}


@pytest.mark.parametrize("extra", ["serve", "train"])
@pytest.mark.parametrize("platform", list(ENVIRONMENTS))
def test_onnxruntime_package_follows_the_platform(extra: str, platform: str) -> None:
    """onnxruntime-gpu where PyPI has wheels for it, onnxruntime elsewhere: exactly one of the two."""
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [Requirement(r) for r in pyproject["project"]["optional-dependencies"][extra]]
    environment = ENVIRONMENTS[platform]
    chosen = {
        r.name
        for r in requirements
        if r.name.startswith("onnxruntime") and (r.marker is None or r.marker.evaluate(environment))
    }
    expected = "onnxruntime-gpu" if platform in ("linux-x86_64", "windows-amd64") else "onnxruntime"
    assert chosen == {expected}


def test_make_serve_installs_the_serving_extra_only(tmp_path: Path) -> None:
    dry = subprocess.run(
        ["make", "-n", "serve", f"VENV={tmp_path / 'v'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    installs = [line for line in dry.stdout.splitlines() if "pip install" in line]
    assert installs and all(
        "torch" not in line and "train" not in line and "dev" not in line for line in installs
    )
    assert any(".[serve" in line for line in installs), dry.stdout
    assert f"{tmp_path / 'v'}-serve/bin/blda serve" in dry.stdout
