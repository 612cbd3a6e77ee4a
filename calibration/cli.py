"""`blda calibrate fit|apply`: calibration tables from logits files, for any segmentation model.

Sub-commands of `blda` (see blda/cli.py). numpy and the core are imported inside the commands, so that
`blda --help` stays light. Bad input files end the command with one line naming the file and what was
expected, and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    import numpy as np

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)

EXIT_BAD_INPUT = 2
_LABEL_DTYPES = ("uint8", "uint16", "int16", "int32", "int64")


class InputFileError(Exception):
    """An input file that cannot be used: str() = "<file>: <what was expected, what was found>"."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=EXIT_BAD_INPUT)


def load_array(path: Path, key: str) -> np.ndarray:
    """Read a .npy file, or a .npz holding a single array or the array `key`."""
    import zipfile

    import numpy as np

    if not path.is_file():
        raise InputFileError(path, "expected an existing .npy or .npz file, but it does not exist")
    if path.suffix not in (".npy", ".npz"):
        raise InputFileError(path, f"expected a .npy or .npz file, got suffix '{path.suffix}'")
    try:
        if path.suffix == ".npy":
            return np.asarray(np.load(path, allow_pickle=False))
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            if key in names:
                return np.asarray(data[key])
            if len(names) == 1:
                return np.asarray(data[names[0]])
            raise InputFileError(path, f"expected a single array or the key '{key}', got keys {names}")
    except InputFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputFileError(path, f"expected a readable {path.suffix} array file, got {reason}") from None


def load_logits(path: Path, num_classes: int | None = None) -> np.ndarray:
    """-> (N, C, H, W) float32, finite."""
    import numpy as np

    a = load_array(path, "logits")
    if a.ndim != 4:
        raise InputFileError(path, f"expected logits of shape (N, C, H, W), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise InputFileError(path, f"expected float logits (N, C, H, W), got dtype {a.dtype}")
    if num_classes is not None and a.shape[1] != num_classes:
        raise InputFileError(
            path, f"expected logits with C={num_classes} classes (from the tables), got shape {a.shape}"
        )
    if a.shape[1] < 2:
        raise InputFileError(path, f"expected logits with at least 2 classes, got shape {a.shape}")
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        raise InputFileError(path, "expected finite logits, got NaN or inf")
    from calibration.logits import not_logits_reason

    reason = not_logits_reason(a, channel_axis=1)
    if reason is not None:
        # Tables fitted on softmax outputs would shift scores the model never produces.
        raise InputFileError(path, f"expected logits (N, C, H, W) (unnormalised scores), {reason}")
    return a


def load_labels(path: Path, shape: tuple[int, int, int], num_classes: int, ignore_index: int) -> np.ndarray:
    """-> (N, H, W) integer labels in [0, C) or ignore_index, matching the logits' N, H, W."""
    import numpy as np

    a = load_array(path, "labels")
    if not np.issubdtype(a.dtype, np.integer):
        raise InputFileError(path, f"expected integer labels (N, H, W), got dtype {a.dtype}")
    if a.shape != shape:
        raise InputFileError(path, f"expected labels of shape {shape} (N, H, W of the logits), got {a.shape}")
    bad = (a != ignore_index) & ((a < 0) | (a >= num_classes))
    if bad.any():
        raise InputFileError(
            path, f"expected labels in [0, {num_classes}) or {ignore_index}, got {int(a[bad].flat[0])}"
        )
    return a


def _tables_path(path: Path) -> Path:
    from calibration.bundle import CALIBRATION_FILE

    return path / CALIBRATION_FILE if path.is_dir() else path


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    """JSON has no NaN: classes without a measure become null."""
    return [float(v) if v == v else None for v in values]


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if isinstance(value, float) else str(value)


def _bias_table(title: str, rows: dict[str, list[Any]], num_classes: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("class", justify="right")
    for name in rows:
        table.add_column(name, justify="right")
    for c in range(num_classes):
        cells = [
            f"{v[c]:+.3f}" if isinstance(v[c], float) else str(v[c] if v[c] is not None else "-")
            for v in rows.values()
        ]
        table.add_row(str(c), *cells)
    Console(stderr=True).print(table)


@app.command("fit")
def fit(
    logits: Annotated[Path, typer.Option(help="Source logits, .npy or .npz (N, C, H, W) float.")],
    labels: Annotated[
        Path,
        typer.Option(help="Source labels, .npy or .npz (N, H, W) int in [0, C) or the ignore index."),
    ],
    out: Annotated[Path, typer.Option(help="Output directory: writes calibration.npz and summary.json.")],
    target_logits: Annotated[
        Path | None,
        typer.Option(
            help="Unlabelled target logits (N, C, H, W). Their pairs are fitted with pseudo-labels = the raw "
            "argmax over classes. Without it the shift tables align the source pairs themselves."
        ),
    ] = None,
    target_traffic: Annotated[
        Path | None,
        typer.Option(
            help="Or the service's traffic sample (GET /v1/models/NAME/traffic, npz): served pixels as target, "
            "pseudo-labels = their argmax."
        ),
    ] = None,
    k: Annotated[int, typer.Option(min=1, max=32, help="Gaussian components per pair mixture.")] = 5,
    num_knots: Annotated[int, typer.Option(min=2, max=65536, help="Knots of each shift table.")] = 256,
    eps: Annotated[float, typer.Option(min=1e-6, max=0.49, help="Quantile clamp of the shifts.")] = 0.01,
    max_samples: Annotated[
        int, typer.Option(min=1, help="Pixels sampled per true class (and per pseudo-class on target).")
    ] = 20000,
    ignore_index: Annotated[int, typer.Option(help="Label value to skip.")] = 255,
    seed: Annotated[int, typer.Option(help="Seed of the pixel subsampling.")] = 0,
) -> None:
    """Fit source and target logit distributions and the shift tables that align them to source anchors."""
    import numpy as np

    from calibration.bias import label_free_bias
    from calibration.bundle import CALIBRATION_FILE, write_calibration
    from calibration.distributions import fit_pair_gmms
    from calibration.tables import build_calibration_tables

    try:
        src = load_logits(logits)
        n, c, h, w = src.shape
        lab = load_labels(labels, (n, h, w), c, ignore_index)
        tgt = load_logits(target_logits, c) if target_logits is not None else None
    except InputFileError as exc:
        raise _fail(str(exc)) from None
    if target_traffic is not None:
        from calibration.traffic import load_sample

        if tgt is not None:
            raise _fail("expected --target-logits or --target-traffic, got both")
        try:
            pixels = load_sample(target_traffic).pixels  # (C, P)
        except (OSError, ValueError) as exc:
            raise _fail(str(exc)) from None
        if pixels.shape[0] != c:
            raise _fail(
                f"{target_traffic}: expected pixels of {c} classes (the source logits'), got {pixels.shape[0]}"
            )
        tgt = pixels[None, :, None, :]  # (1, C, 1, P): the (N, C, H, W) layout
    if not np.any(lab != ignore_index):
        raise _fail(f"{labels}: expected at least one labelled pixel, got only {ignore_index} (ignore)")

    source, source_counts = fit_pair_gmms(
        src, lab, c, k=k, max_samples=max_samples, ignore_index=ignore_index, seed=seed
    )
    target, target_counts = None, None
    if tgt is not None:
        pseudo = tgt.argmax(axis=1)  # (N, H, W) pseudo-labels
        target, target_counts = fit_pair_gmms(tgt, pseudo, c, k=k, max_samples=max_samples, seed=seed)
    tables = build_calibration_tables(
        source, source_counts, target, target_counts, num_knots=num_knots, eps=eps
    )

    try:
        out.mkdir(parents=True, exist_ok=True)
        path = write_calibration(out / CALIBRATION_FILE, tables)
    except OSError as exc:
        raise _fail(f"{out}: expected a writable output directory, got {exc.strerror or exc}") from None
    rows: dict[str, list[Any]] = {
        "source px": [int(v) for v in np.diag(tables.source_counts)],
        "source bias": _nan_to_none(label_free_bias(tables.source, tables.source_counts)),
    }
    if tgt is not None:
        rows["target px"] = [int(v) for v in np.diag(tables.target_counts)]
        rows["target bias"] = _nan_to_none(label_free_bias(tables.target, tables.target_counts))
    summary = {
        "num_classes": c,
        "k": k,
        "num_knots": num_knots,
        "eps": eps,
        "target": str(target_logits or target_traffic) if (target_logits or target_traffic) else None,
        "max_abs_shift": float(np.abs(tables.shifts.delta).max()),
        "per_class": {name.replace(" ", "_"): values for name, values in rows.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _bias_table("label-free bias per class (> 0: logits run high, over-predicted)", rows, c)
    typer.echo(f"wrote {path} and {out / 'summary.json'}")


@app.command("apply")
def apply(
    tables: Annotated[Path, typer.Option(help="Directory with calibration.npz (from `fit`), or the file.")],
    logits: Annotated[Path, typer.Option(help="Logits, .npy or .npz (N, C, H, W) float.")],
    out: Annotated[Path, typer.Option(help="Output .npy of calibrated labels (N, H, W).")],
    tau: Annotated[float, typer.Option(help="Strength of the shift (official inference value 0.2).")] = 0.2,
    topk: Annotated[
        int, typer.Option(min=0, help="Try only the K largest raw logits as hypotheses (0: the exact rule).")
    ] = 0,
    dtype: Annotated[
        str, typer.Option(help=f"Label dtype of the output, one of {', '.join(_LABEL_DTYPES)}.")
    ] = "uint8",
) -> None:
    """Write calibrated label maps argmax_c softmax_l(z_l + tau * shift_cl(z_l))[c]."""
    import numpy as np

    from calibration.alignment import calibrated_decision, calibrated_decision_topk
    from calibration.bundle import BundleError, read_calibration

    if dtype not in _LABEL_DTYPES:
        raise _fail(f"--dtype: expected one of {', '.join(_LABEL_DTYPES)}, got '{dtype}'")
    try:
        calib = read_calibration(_tables_path(tables))
    except BundleError as exc:
        raise _fail(str(exc)) from None
    c = calib.num_classes
    if np.iinfo(np.dtype(dtype)).max < c - 1:
        raise _fail(f"--dtype: expected a dtype that holds {c} classes, got '{dtype}'")
    if topk > c:
        raise _fail(f"--topk: expected a value in [0, {c}], got {topk}")
    try:
        z = load_logits(logits, c)
    except InputFileError as exc:
        raise _fail(str(exc)) from None
    if topk:
        pred = calibrated_decision_topk(z, calib.shifts, tau=tau, k=topk)
    else:
        pred = calibrated_decision(z, calib.shifts, tau=tau)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("wb") as f:  # np.save(path) would append .npy to other names
            np.save(f, pred.astype(dtype))
    except OSError as exc:
        raise _fail(f"{out}: expected a writable output file, got {exc.strerror or exc}") from None
    changed = float(np.mean(pred != z.argmax(axis=1)))
    typer.echo(f"wrote {out} {pred.shape} {dtype}; {changed:.2%} of pixels differ from the raw argmax")
