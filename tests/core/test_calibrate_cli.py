"""`blda calibrate fit|apply`: a round trip, and one clear line with exit code 2 per kind of bad file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from calibration.alignment import calibrated_decision, calibrated_decision_topk
from calibration.bundle import read_calibration
from calibration.cli import app

C, N, H, W = 19, 2, 12, 16
runner = CliRunner()
_SCORES = np.random.default_rng(5).normal(0, 2, (N, C, H, W))
_PROBS = np.exp(_SCORES) / np.exp(_SCORES).sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C, (N, H, W)).astype(np.uint8)
    labels[0, 0, :4] = 255
    offset = rng.normal(0, 1, C)
    logits = rng.normal(0, 1, (N, C, H, W)) + offset[None, :, None, None]
    logits += 4 * np.eye(C)[np.where(labels == 255, 0, labels)].transpose(0, 3, 1, 2)
    target = logits + rng.normal(0, 0.5, C)[None, :, None, None]
    paths = {
        "logits": d / "src.npz",
        "labels": d / "labels.npy",
        "target": d / "tgt.npy",
        "out": d / "calib",
    }
    np.savez(paths["logits"], logits=logits.astype(np.float16))
    np.save(paths["labels"], labels)
    np.save(paths["target"], target.astype(np.float32))
    return paths


def _no_nan(name: str) -> float:
    raise AssertionError(f"summary.json holds {name}, which strict JSON readers reject")


def _fit(files: dict[str, Path], *extra: str) -> Result:
    return runner.invoke(
        app,
        [
            "fit",
            "--logits",
            str(files["logits"]),
            "--labels",
            str(files["labels"]),
            "--out",
            str(files["out"]),
            "--k",
            "2",
            "--num-knots",
            "32",
            *extra,
        ],
    )


def test_fit_then_apply_round_trip(files: dict[str, Path], tmp_path: Path) -> None:
    result = _fit(files, "--target-logits", str(files["target"]))
    assert result.exit_code == 0, result.output
    assert (files["out"] / "calibration.npz").is_file() and (files["out"] / "summary.json").is_file()
    summary = json.loads((files["out"] / "summary.json").read_text(), parse_constant=_no_nan)
    assert summary["num_classes"] == C and len(summary["per_class"]["target_bias"]) == C
    tables = read_calibration(files["out"] / "calibration.npz")
    assert tables.num_classes == C and tables.shifts.delta.shape == (C, C, 32)
    assert int(tables.source_counts[0, 0]) == int((np.load(files["labels"]) == 0).sum())

    out = tmp_path / "pred.labels"  # not .npy: the name is kept as given
    z = np.load(files["target"])
    result = runner.invoke(
        app,
        [
            "apply",
            "--tables",
            str(files["out"]),
            "--logits",
            str(files["target"]),
            "--out",
            str(out),
            "--tau",
            "0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    pred = np.load(out)
    assert pred.shape == (N, H, W) and pred.dtype == np.uint8
    np.testing.assert_array_equal(pred, calibrated_decision(z, tables.shifts, tau=0.5))

    out2 = tmp_path / "pred_top2.npy"
    result = runner.invoke(
        app,
        [
            "apply",
            "--tables",
            str(files["out"] / "calibration.npz"),
            "--logits",
            str(files["target"]),
            "--out",
            str(out2),
            "--topk",
            "2",
            "--dtype",
            "int32",
        ],
    )
    assert result.exit_code == 0, result.output
    pred2 = np.load(out2)
    assert pred2.dtype == np.int32
    np.testing.assert_array_equal(pred2, calibrated_decision_topk(z, tables.shifts, tau=0.2, k=2))


def _bad(tmp_path: Path, name: str, array: object) -> Path:
    path = tmp_path / name
    if isinstance(array, bytes):
        path.write_bytes(array)
    elif isinstance(array, dict):
        np.savez(path, **array)
    else:
        np.save(path, np.asarray(array))
    return path


def _assert_clean_error(result: Result, path: Path, expected: str) -> None:
    assert result.exit_code == 2, result.output
    out = result.output
    assert str(path) in out and expected in out, out
    assert "Traceback" not in out
    assert len([line for line in out.splitlines() if line.startswith("error:")]) == 1


@pytest.mark.parametrize(
    ("which", "name", "content", "expected"),
    [
        ("logits", "missing.npy", None, "does not exist"),
        ("logits", "three_d.npy", np.zeros((C, H, W), np.float32), "expected logits of shape (N, C, H, W)"),
        ("logits", "ints.npy", np.zeros((N, C, H, W), np.int32), "expected float logits"),
        ("logits", "nan.npy", np.full((N, C, H, W), np.nan, np.float32), "expected finite logits"),
        (
            "logits",
            "two_keys.npz",
            {"a": np.zeros(1), "b": np.zeros(1)},
            "expected a single array or the key",
        ),
        ("logits", "corrupt.npy", b"not an array at all", "expected a readable .npy array file"),
        # Softmax outputs in float16 (sums off by ~1e-3) and log-softmax outputs are told apart from logits.
        ("logits", "probs.npy", _PROBS.astype(np.float16), "got probabilities: every value is in [0, 1]"),
        ("target", "logprobs.npy", np.log(_PROBS).astype(np.float32), "got log-probabilities"),
        ("logits", "wrong.txt", b"1 2 3", "expected a .npy or .npz file"),
        (
            "labels",
            "labels_shape.npy",
            np.zeros((N, H, W + 1), np.uint8),
            f"expected labels of shape {(N, H, W)}",
        ),
        ("labels", "labels_float.npy", np.zeros((N, H, W), np.float32), "expected integer labels"),
        (
            "labels",
            "labels_range.npy",
            np.full((N, H, W), 40, np.uint8),
            "expected labels in [0, 19) or 255, got 40",
        ),
        (
            "labels",
            "labels_ignored.npy",
            np.full((N, H, W), 255, np.uint8),
            "expected at least one labelled pixel",
        ),
        (
            "target",
            "target_classes.npy",
            np.zeros((N, 5, H, W), np.float32),
            "expected logits with C=19 classes",
        ),
    ],
)
def test_fit_bad_files(
    files: dict[str, Path], tmp_path: Path, which: str, name: str, content: object, expected: str
) -> None:
    path = tmp_path / name if content is None else _bad(tmp_path, name, content)
    args = {"logits": str(files["logits"]), "labels": str(files["labels"]), "target": str(files["target"])}
    args[which] = str(path)
    result = runner.invoke(
        app,
        [
            "fit",
            "--logits",
            args["logits"],
            "--labels",
            args["labels"],
            "--target-logits",
            args["target"],
            "--out",
            str(tmp_path / "o"),
            "--k",
            "2",
        ],
    )
    _assert_clean_error(result, path, expected)


def test_apply_bad_files(files: dict[str, Path], tmp_path: Path) -> None:
    assert _fit(files).exit_code == 0
    out = str(tmp_path / "p.npy")
    cases = [
        (tmp_path / "nowhere", str(files["target"]), "does not exist"),
        (_bad(tmp_path, "calibration.npz", b"PK\x03\x04 broken zip"), str(files["target"]), "corrupted"),
    ]
    for tables, logits, expected in cases:
        result = runner.invoke(app, ["apply", "--tables", str(tables), "--logits", logits, "--out", out])
        _assert_clean_error(result, tables, expected)
    wrong_c = _bad(tmp_path, "c5.npy", np.zeros((N, 5, H, W), np.float32))
    result = runner.invoke(
        app, ["apply", "--tables", str(files["out"]), "--logits", str(wrong_c), "--out", out]
    )
    _assert_clean_error(result, wrong_c, "expected logits with C=19 classes (from the tables)")
    result = runner.invoke(
        app,
        [
            "apply",
            "--tables",
            str(files["out"]),
            "--logits",
            str(files["target"]),
            "--out",
            out,
            "--dtype",
            "float32",
        ],
    )
    assert result.exit_code == 2 and "--dtype" in result.output
    result = runner.invoke(
        app,
        ["apply", "--tables", str(files["out"]), "--logits", str(files["target"]), "--out", str(tmp_path)],
    )
    _assert_clean_error(result, tmp_path, "expected a writable output file")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = _fit({**files, "out": blocker})
    _assert_clean_error(result, blocker, "expected a writable output directory")


def test_fit_takes_the_service_traffic_sample_as_target(files: dict[str, Path], tmp_path: Path) -> None:
    """The same target pixels as a traffic sample (C, P) or as logits (1, C, 1, P) give the same tables."""
    from calibration.traffic import TrafficSample, save_sample

    pixels = np.load(files["target"]).transpose(1, 0, 2, 3).reshape(C, -1).astype(np.float32)  # (C, P)
    traffic = save_sample(tmp_path / "traffic.npz", TrafficSample(pixels, 0.0, 1.0, N))
    as_logits = tmp_path / "as_logits.npy"
    np.save(as_logits, pixels[None, :, None, :])
    tables = []
    for option, path in (("--target-traffic", traffic), ("--target-logits", as_logits)):
        out = tmp_path / option.strip("-")
        result = _fit({**files, "out": out}, option, str(path))
        assert result.exit_code == 0, result.output
        tables.append(read_calibration(out / "calibration.npz"))
    np.testing.assert_array_equal(tables[0].target.means, tables[1].target.means)
    np.testing.assert_array_equal(tables[0].shifts.delta, tables[1].shifts.delta)
    assert not np.array_equal(tables[0].target.means, tables[0].source.means)  # the target was used
    both = _fit(
        {**files, "out": tmp_path / "both"},
        "--target-traffic",
        str(traffic),
        "--target-logits",
        str(as_logits),
    )
    assert both.exit_code == 2 and "got both" in both.output
