"""Sub-commands of `blda` (see blda/cli.py): evaluate, export, diagnose. Heavy imports go inside the
commands, so `blda --help` stays fast and a serving install without torch still has a working `blda`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True)


@contextmanager
def _errors_exit() -> Iterator[None]:
    """Bad input ends in one line on stderr and exit code 2, never a traceback."""
    from calibration.bundle import BundleError

    try:
        yield
    except (BundleError, FileNotFoundError, ValueError, KeyError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:
        # ExportError and the data loaders' errors: imported lazily, matched by name to keep imports light.
        if type(exc).__name__ in {"ExportError", "DatasetError", "ConfigError"}:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        raise


def _refit_config(keep_fraction: float | None) -> Any:
    from calibration.refit import RefitConfig

    return RefitConfig() if keep_fraction is None else RefitConfig(keep_fraction=keep_fraction)


def _parse_size(text: str) -> tuple[int, int] | None:
    if text.lower() in {"", "none", "native"}:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected HEIGHTxWIDTH (e.g. 256x512) or 'none', got {text!r}") from None
    if h <= 0 or w <= 0:
        raise typer.BadParameter(f"expected positive sides, got {text!r}")
    return h, w


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(payload, indent=2, allow_nan=False, default=_json_default) + "\n", encoding="utf-8"
    )


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"expected JSON-serialisable values, got {type(value).__name__}")


Threads = Annotated[int, typer.Option(help="torch / onnxruntime threads.")]
SourceFormat = Annotated[
    str | None,
    typer.Option(
        help="Source format: gta5|synthia|cityscapes|folder (default: the checkpoint's, else gta5)."
    ),
]
TargetFormat = Annotated[
    str | None,
    typer.Option(
        help="Target format: gta5|synthia|cityscapes|folder (default: the checkpoint's, else cityscapes)."
    ),
]
DataSet = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Data setting: data.key=value (repeatable), e.g. data.target=cs; on top of the checkpoint's.",
    ),
]


def _data_overrides(
    source_format: str | None, target_format: str | None, items: list[str] | None
) -> list[str]:
    """The data settings of a command: --set items, then the format options (which win)."""
    out = list(items or [])
    if source_format is not None:
        out.append(f"data.source_format={source_format}")
    if target_format is not None:
        out.append(f"data.target_format={target_format}")
    return out


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option(help="Models directory; the bundle goes to OUT/NAME/VERSION/.")] = Path(
        "models"
    ),
    name: Annotated[str, typer.Option(help="Bundle (model) name.")] = "blda-synth",
    version: Annotated[
        str | None,
        typer.Option(
            help="Bundle version [default: the next after the highest in OUT/NAME, so it is served]."
        ),
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Training checkpoint or plain state dict.")] = None,
    network: Annotated[
        str | None, typer.Option(help="Network name (plain state dicts, --untrained).")
    ] = None,
    untrained: Annotated[bool, typer.Option(help="Export a randomly initialised network.")] = False,
    teacher: Annotated[
        bool, typer.Option(help="Export the EMA teacher's weights of the checkpoint.")
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(help="Data root: fit calibration tables (when the checkpoint has no GMM state)."),
    ] = None,
    limit: Annotated[int, typer.Option(help="Images per domain for offline calibration tables.")] = 200,
    input_size: Annotated[
        str,
        typer.Option(help="HxW the service resizes images to, 'none', or 'auto' (data size x eval scale)."),
    ] = "auto",
    tau: Annotated[
        list[float] | None,
        typer.Option(help="Calibration strengths τ tried on the target tuning split (repeatable)."),
    ] = None,
    tables_from_checkpoint: Annotated[
        bool, typer.Option(help="Ship the checkpoint's training-time GMM tables instead of refitting.")
    ] = False,
    keep_fraction: Annotated[
        float | None,
        typer.Option(
            help="Refit: share of each predicted class's pixels used as pseudo-labels [default: 1, every pixel]."
        ),
    ] = None,
    tolerance: Annotated[float, typer.Option(help="Max |torch - onnxruntime| logit difference.")] = 1e-3,
    metrics: Annotated[Path | None, typer.Option(help="metrics.json of `blda evaluate` to record.")] = None,
    description: Annotated[str, typer.Option(help="Free text for the manifest.")] = "",
    seed: Annotated[int, typer.Option(help="Seed of --untrained initialisation.")] = 0,
    threads: Threads = 2,
    source_format: SourceFormat = None,
    target_format: TargetFormat = None,
    set_: DataSet = None,
) -> None:
    """Export a model to a bundle: ONNX (checked, parity-tested), calibration tables, manifest."""
    from calibration.bundle import next_version, served_note

    size: tuple[int, int] | str | None = "auto" if input_size == "auto" else _parse_size(input_size)
    # A fixed default (1.0.0) beside a newer shipped version would be written and silently not served.
    version = version or next_version(out, name)
    with _errors_exit():
        from training.export import run_export

        result = run_export(
            out=out,
            name=name,
            version=version,
            checkpoint=checkpoint,
            network=network,
            untrained=untrained,
            teacher=teacher,
            data=data,
            limit=limit,
            input_size=size,
            taus=tuple(tau) if tau else (0.1, 0.2, 0.4),
            tolerance=tolerance,
            tables_from_checkpoint=tables_from_checkpoint,
            refit=_refit_config(keep_fraction),
            metrics_file=metrics,
            description=description,
            seed=seed,
            threads=threads,
            data_overrides=_data_overrides(source_format, target_format, set_),
        )
    typer.echo(json.dumps(result, indent=2))
    typer.echo(served_note(out, name, version), err=True)


@app.command("evaluate")
def evaluate_command(
    data: Annotated[
        Path, typer.Option(help="Data root holding the target domain (and the source for --source).")
    ],
    out: Annotated[Path, typer.Option(help="Output directory for metrics.json and metrics.png.")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="Training checkpoint (or state dict + --network).")
    ] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle directory (evaluated with onnxruntime).")
    ] = None,
    network: Annotated[str | None, typer.Option(help="Network name for a plain state dict.")] = None,
    teacher: Annotated[bool, typer.Option(help="Evaluate the EMA teacher of the checkpoint.")] = False,
    split: Annotated[
        str, typer.Option(help="Target split: val (reported), tuning (choices), or train.")
    ] = "val",
    tau: Annotated[list[float] | None, typer.Option(help="Calibration strengths τ (repeatable).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many images (0: all).")] = 0,
    source: Annotated[bool, typer.Option(help="Also evaluate on the source domain.")] = False,
    input_scale: Annotated[
        float | None,
        typer.Option(help="Resize images by this factor (default: bundle size / checkpoint eval scale)."),
    ] = None,
    tables: Annotated[
        str,
        typer.Option(
            help="Calibration tables: refit (the exporter's refit on train splits; written to OUT/tables.npz), "
            "checkpoint (training-time GMMs), bundle, auto (a bundle's own, else refit), or a tables .npz file."
        ),
    ] = "auto",
    keep_fraction: Annotated[
        float | None,
        typer.Option(
            help="Refit: share of each predicted class's pixels used as pseudo-labels [default: 1, every pixel]."
        ),
    ] = None,
    threads: Threads = 2,
    classes: Annotated[
        int | None,
        typer.Option(
            help="Classes the mIoU averages (default: all): 19, or the SYNTHIA protocol's 16 / 13 of a "
            "19-way model; every subset's mIoU is in metrics.json."
        ),
    ] = None,
    source_format: SourceFormat = None,
    target_format: TargetFormat = None,
    set_: DataSet = None,
    calibrators: Annotated[
        str | None,
        typer.Option(
            help="Compare calibrators, e.g. none,logit-adjust,em-prior,bcts-em,blda,blda+em-prior (or all): "
            "strengths chosen on the tuning split; prints one table."
        ),
    ] = None,
) -> None:
    """mIoU, per-class IoU, class-IoU std and Bias(l), raw and calibrated at each τ (τ = 0: raw only), and
    the PIT check of the tables on the evaluated split; JSON + PNG."""
    if (checkpoint is None) == (bundle is None):
        typer.echo("error: expected exactly one of --checkpoint or --bundle", err=True)
        raise typer.Exit(2)
    with _errors_exit():
        from training.evaluation.evaluate import run_evaluate

        metrics = run_evaluate(
            data=data,
            out=out,
            checkpoint=checkpoint,
            bundle=bundle,
            network=network,
            teacher=teacher,
            split=split,
            taus=tuple(tau) if tau else (0.2,),
            limit=limit,
            with_source=source,
            input_scale=input_scale,
            threads=threads,
            tables=tables,
            refit=_refit_config(keep_fraction),
            classes=classes,
            data_overrides=_data_overrides(source_format, target_format, set_),
            calibrators=calibrators.split(",") if calibrators else (),
        )
    _print_summary(metrics)
    if "calibrators" in metrics:
        from calibration.calibrators.evaluation import format_table

        compared = metrics["calibrators"]
        typer.echo(f"calibrators on target {compared['split']} (strengths chosen on tuning):")
        typer.echo(format_table(compared[compared["split"]]))
        typer.echo(f"default on the tuning split: {compared['default']}")
    typer.echo(f"wrote {out / 'metrics.json'} and {out / 'metrics.png'}")


def _print_summary(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    target = metrics["target"]
    table = Table(
        title=f"target {metrics['split']} ({target['num_images']} images, "
        f"mIoU over {metrics['classes_averaged']} classes)"
    )
    table.add_column("variant")
    for col in ("mIoU", "IoU std", "pixel acc"):
        table.add_column(col, justify="right")
    rows: list[tuple[str, dict[str, Any]]] = [("raw", target["raw"])]
    rows += [(f"calibrated τ={t}", m) for t, m in target["calibrated"].items()]
    for label, m in rows:
        table.add_row(
            label, f"{100 * m['miou']:.2f}", f"{100 * m['iou_std']:.2f}", f"{100 * m['pixel_accuracy']:.2f}"
        )
    Console().print(table)
    pit = target.get("pit")
    if pit:
        lo, hi = pit["range"]
        typer.echo(
            f"PIT check of the tables on this split: mean |mean u - 0.5| = {pit['mean_abs_deviation']:.3f} "
            f"(per-class mean u from {lo} to {hi}; 0.5 when the tables describe these logits)"
        )


@app.command("diagnose")
def diagnose_command(
    data: Annotated[Path, typer.Option(help="Data root holding the source and target domains.")],
    checkpoint: Annotated[Path | None, typer.Option(help="Source-only checkpoint (else train one).")] = None,
    network: Annotated[
        str | None, typer.Option(help="Network name for a plain state dict / training.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output directory for diagnose.json and diagnose.png.")] = Path(
        "runs/diagnose"
    ),
    limit: Annotated[int, typer.Option(help="At most this many images per split (0: all).")] = 0,
    iterations: Annotated[
        int, typer.Option(help="Source-only training iterations when no checkpoint.")
    ] = 600,
    seed: Annotated[int, typer.Option(help="Seed of the source-only training when no checkpoint.")] = 0,
    threads: Threads = 2,
    source_format: SourceFormat = None,
    target_format: TargetFormat = None,
    set_: DataSet = None,
) -> None:
    """Is the benchmark a real problem? Source-only model on target val: mIoU, per-class IoU and Bias(l),
    and the rank correlation between Bias(l) and the label-free positive/negative logit spread."""
    with _errors_exit():
        from training.evaluation.diagnose import print_report, run_diagnose

        report = run_diagnose(
            data=data,
            out=out,
            checkpoint=checkpoint,
            network=network,
            limit=limit,
            iterations=iterations,
            seed=seed,
            threads=threads,
            data_overrides=_data_overrides(source_format, target_format, set_),
        )
    print_report(report)
    typer.echo(f"wrote {out / 'diagnose.json'} and {out / 'diagnose.png'}")
