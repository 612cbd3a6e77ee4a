"""`blda bundle create|validate|inspect|recalibrate`: bring your own ONNX model. torch-free; heavy imports (onnxruntime)
go inside the commands. A bad bundle or input ends in one line naming the file and field, exit code 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from calibration.bundle import Bundle

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)

EXIT_BAD_INPUT = 2


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=EXIT_BAD_INPUT)


def _floats(text: str | None, option: str, count: int = 3) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise _fail(f"{option}: expected {count} numbers (e.g. 0.485,0.456,0.406), got {text!r}") from None
    if len(values) != count:
        raise _fail(f"{option}: expected {count} numbers, got {len(values)} in {text!r}")
    return values


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None or text.lower() in {"", "none", "native"}:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise _fail(f"--size: expected HEIGHTxWIDTH (e.g. 512x1024) or 'none', got {text!r}") from None
    if h <= 0 or w <= 0:
        raise _fail(f"--size: expected positive sides, got {text!r}")
    return h, w


Folder = Annotated[Path | None, typer.Option(file_okay=False)]


@app.command("create")
def create(
    onnx: Annotated[Path, typer.Option(help="The ONNX segmentation model (one N×3×H×W float input).")],
    name: Annotated[str, typer.Option(help="Model name (the service's models/NAME/).")],
    out: Annotated[Path, typer.Option(help="Models directory; the bundle goes to OUT/NAME/VERSION/.")],
    version: Annotated[
        str | None, typer.Option(help="Bundle version [default: the next after the highest in OUT/NAME].")
    ] = None,
    classes: Annotated[
        str | None, typer.Option(help="'cityscapes' or a JSON file of names (or {name, color} objects).")
    ] = None,
    input_name: Annotated[str | None, typer.Option(help="Graph input [default: the only one].")] = None,
    output_name: Annotated[
        str | None, typer.Option(help="Graph output of the logits [default: the only one].")
    ] = None,
    mean: Annotated[
        str | None, typer.Option(help="Per-channel mean after --pixel-scale [ImageNet's].")
    ] = None,
    std: Annotated[str | None, typer.Option(help="Per-channel std after --pixel-scale [ImageNet's].")] = None,
    pixel_scale: Annotated[float, typer.Option(help="Pixels are divided by this first.")] = 255.0,
    size: Annotated[
        str | None,
        typer.Option(help="HxW images are resized to [default: the graph's fixed size, else native]."),
    ] = None,
    multiple_of: Annotated[
        int, typer.Option(min=1, help="At native size, sides are rounded to a multiple of this.")
    ] = 32,
    source_images: Folder = None,
    source_labels: Folder = None,
    target_images: Folder = None,
    target_labels: Annotated[
        Path | None,
        typer.Option(
            file_okay=False,
            help="Labels of the target images: every 5th image is then held out to choose the default.",
        ),
    ] = None,
    label_format: Annotated[
        str, typer.Option(help="train-ids | cityscapes-ids (label PNG values).")
    ] = "train-ids",
    tau: Annotated[
        list[float] | None,
        typer.Option(help="Calibration strengths τ tried on held-out images (repeatable)."),
    ] = None,
    pixels_per_image: Annotated[
        int, typer.Option(min=16, help="Pixels sampled per image (bounds memory).")
    ] = 4096,
    keep_fraction: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="Most confident share of target pixels per class kept.")
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the pixel sampling and EM.")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads.")] = 2,
    description: Annotated[str, typer.Option(help="Free text for the manifest.")] = "",
    force: Annotated[bool, typer.Option(help="Replace an existing version.")] = False,
) -> None:
    """Bundle an ONNX model; with image folders, fit calibration tables and choose the default.

    Source images with labels give the source pairs and anchors, target images (unlabelled) the shifts.
    Without folders the bundle has no calibration: served raw, and monitored.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from calibration.bundle import BundleError, next_version
    from calibration.refit import RefitConfig
    from service.bundling import IMAGENET_MEAN, IMAGENET_STD, CreateOptions, Folders, create_bundle

    console = Console(stderr=True)
    options = CreateOptions(
        onnx=onnx,
        name=name,
        version=version or next_version(out, name),
        out=out,
        classes=classes,
        input_name=input_name,
        output_name=output_name,
        mean=_floats(mean, "--mean") or IMAGENET_MEAN,  # type: ignore[arg-type]
        std=_floats(std, "--std") or IMAGENET_STD,  # type: ignore[arg-type]
        pixel_scale=pixel_scale,
        size=_size(size),
        multiple_of=multiple_of,
        folders=Folders(source_images, source_labels, target_images, target_labels, label_format),
        taus=tuple(tau) if tau else (0.1, 0.2, 0.4),
        pixels_per_image=pixels_per_image,
        refit=RefitConfig(keep_fraction=keep_fraction, seed=seed),
        threads=threads,
        description=description,
        force=force,
    )
    with Progress(
        TextColumn("running the model"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:

        def progress(total: int) -> Any:
            task = bar.add_task("images", total=total)
            return lambda: bar.advance(task)

        try:
            summary = create_bundle(options, progress)
        except BundleError as exc:
            raise _fail(str(exc)) from None
    _print_created(summary, options.name, options.version, out)


def _print_created(summary: dict[str, Any], name: str, version: str, out: Path) -> None:
    from calibration.bundle import served_note

    graph = summary["graph"]
    typer.echo(f"wrote {summary['bundle']}")
    typer.echo(
        f"  graph: input {graph['input']['name']!r} {graph['input']['shape']}, output "
        f"{graph['output']['name']!r} {graph['output']['shape']}; {summary['num_classes']} classes, "
        f"stride {summary['stride']}"
    )
    choice = summary["calibration"]
    if choice is None:
        typer.echo("  calibration: none (no image folders): served raw, monitored")
    else:
        state = "on" if choice["enabled"] else "off"
        typer.echo(f"  calibration: tables fitted; default {state}, τ={choice['tau']:g}: {choice['reason']}")
    typer.echo(f"{served_note(out, name, version)}: blda serve --models-dir {out}")


def _load(directory: Path) -> Bundle:
    from calibration.bundle import BundleError, load_bundle

    try:
        return load_bundle(directory)
    except BundleError as exc:
        raise _fail(str(exc)) from None


@app.command("validate")
def validate(
    directory: Annotated[Path, typer.Argument(help="A bundle directory MODELS/NAME/VERSION.")],
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads.")] = 1,
) -> None:
    """Check a bundle as the service loads it: schema, checksums, calibration arrays, a run on a dummy
    input, output channels vs classes. Exit 2 with the file and field on failure."""
    from calibration.bundle import BundleError
    from service.inference import load_served_model

    try:
        model = load_served_model(directory, threads, provider="cpu")
    except BundleError as exc:
        raise _fail(str(exc)) from None
    m = model.bundle.manifest
    calibration = "none (served raw)"
    if model.has_calibration:
        calibration = f"tables, default {'on' if model.calibrate_default else 'off'}, τ={model.tau_default:g}"
    typer.echo(f"ok: {m.name}/{m.version}")
    typer.echo(f"  files: {', '.join(f'{k} (sha256 ok)' for k in m.files)}")
    typer.echo(
        f"  input {m.input.name!r} size {list(m.input.size) if m.input.size else 'native'}, output "
        f"{m.output.name!r} {m.output.num_classes} channels = {len(m.classes)} classes, stride {m.output.stride}"
    )
    typer.echo(f"  calibration: {calibration}")


def table_figures(bundle: Bundle) -> dict[str, Any]:
    """What `inspect` reports: the manifest's key fields and the tables' figures."""
    import numpy as np

    m = bundle.manifest
    choice = m.provenance.metrics.get("calibration_choice") if m.provenance.metrics else None
    figures: dict[str, Any] = {
        "name": m.name,
        "version": m.version,
        "description": m.description,
        "classes": m.class_names,
        "input": m.input.model_dump(mode="json"),
        "output": m.output.model_dump(mode="json"),
        "calibration": None if m.calibration is None else m.calibration.model_dump(mode="json"),
        "calibration_reason": choice.get("reason") if isinstance(choice, dict) else None,
        "provenance": {
            "trained": m.provenance.trained,
            "network": m.provenance.network,
            "created": m.provenance.created,
            "data": m.provenance.data,
        },
        "tables": None,
        "calibrators": list(bundle.calibrators),
        "default_calibrator": bundle.default_calibrator,
    }
    t = bundle.tables
    if t is not None:
        delta = t.shifts.delta  # (C, C, M)
        c = t.num_classes
        refit = m.provenance.metrics.get("refit", {}) if m.provenance.metrics else {}
        figures["tables"] = {
            "source_pairs_fitted": int((t.source_counts > 0).sum()),
            "target_pairs_fitted": int((t.target_counts > 0).sum()),
            "pairs": c * c,
            "fallback_rows": refit.get("fallback_rows"),
            "delta_range": [round(float(delta.min()), 4), round(float(delta.max()), 4)],
            "delta_max_abs_per_class": [round(float(v), 4) for v in np.abs(delta).max(axis=(1, 2))],
            "eps": t.eps,
            "knots": int(delta.shape[-1]),
            "pit": choice.get("pit") if isinstance(choice, dict) else None,
        }
    return figures


@app.command("inspect")
def inspect(
    directory: Annotated[Path, typer.Argument(help="A bundle directory MODELS/NAME/VERSION.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Print the manifest and the calibration tables' figures (classes, τ default, pairs fitted, Δ, PIT)."""
    figures = table_figures(_load(directory))
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
        return
    f = figures
    typer.echo(f"{f['name']}/{f['version']}: {f['description']}")
    typer.echo(f"  classes ({len(f['classes'])}): {', '.join(f['classes'])}")
    i, o = f["input"], f["output"]
    typer.echo(
        f"  input {i['name']!r}: (x / {i['pixel_scale']:g} - {i['mean']}) / {i['std']}, size "
        f"{i['size'] or 'native (multiple of ' + str(i['multiple_of']) + ')'}"
    )
    typer.echo(f"  output {o['name']!r}: {o['num_classes']} channels, stride {o['stride']}")
    p = f["provenance"]
    typer.echo(f"  provenance: {p['network']}, trained={p['trained']}, created {p['created']}")
    cal = f["calibration"]
    if cal is None:
        typer.echo("  calibration: none (served raw)")
        return
    typer.echo(
        f"  calibration: default {'on' if cal['enabled_default'] else 'off'}, τ default {cal['tau_default']:g}"
        + (f" ({f['calibration_reason']})" if f["calibration_reason"] else "")
    )
    typer.echo(f"  calibrators: {', '.join(f['calibrators'])}; default {f['default_calibrator']}")
    if cal.get("tuning_table"):
        from calibration.calibrators.evaluation import format_table

        typer.echo("  on the tuning split (x100; the default is the best mIoU there):")
        typer.echo("\n".join("    " + line for line in format_table(cal["tuning_table"]).splitlines()))
    t = f["tables"]
    typer.echo(
        f"  tables: pairs fitted source {t['source_pairs_fitted']}/{t['pairs']}, target "
        f"{t['target_pairs_fitted']}/{t['pairs']}; rows kept from source: {t['fallback_rows']}"
    )
    typer.echo(
        f"  Δ range [{t['delta_range'][0]:+.3f}, {t['delta_range'][1]:+.3f}], max |Δ| per class {t['delta_max_abs_per_class']}"
    )
    pit = t["pit"]
    if pit:
        typer.echo(
            f"  PIT (held-out): mean |u - 0.5| = {pit['mean_abs_deviation']}, per-class mean u in {pit['range']}"
        )
    else:
        typer.echo("  PIT: not measured (no labelled held-out images)")


@app.command("recalibrate")
def recalibrate(
    bundle: Annotated[
        Path, typer.Option(help="The base bundle MODELS/NAME/VERSION whose tables are refitted.")
    ],
    traffic: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help="A traffic sample from GET /v1/models/NAME/traffic (npz)."),
    ] = None,
    images: Annotated[
        list[Path] | None,
        typer.Option(help="Or image files / folders, run through the model here (repeatable)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Models directory [default: the bundle's].")] = None,
    version: Annotated[str | None, typer.Option(help="[default: the next after the highest].")] = None,
    min_row_pixels: Annotated[int, typer.Option(min=1, help="Fewer pixels of a class keep its row.")] = 500,
    pixels_per_image: Annotated[int, typer.Option(min=1, help="--images: pixels sampled per image.")] = 4096,
    decision_scale: Annotated[
        float, typer.Option(help="--images: as the service's BLDA_DECISION_SCALE.")
    ] = 2.0,
    seed: Annotated[int, typer.Option(help="Sampling and refit seed.")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads (--images).")] = 2,
) -> None:
    """Refit a bundle's target tables from a traffic sample (the service's, or one computed here from
    images) with the service's own refit, into a new version beside it."""
    from dataclasses import replace

    from calibration.bundle import BundleError
    from calibration.refit import RefitConfig
    from calibration.traffic import load_sample, refit_from_traffic
    from service.inference import load_served_model
    from service.predict import collect_inputs
    from service.recalibration.candidate import recalibration_provenance, write_candidate
    from service.recalibration.offline import sample_images

    if (traffic is None) == (not images):
        raise _fail("expected --traffic FILE or --images PATH, got " + ("both" if traffic else "neither"))
    base = _load(bundle)
    if base.tables is None:
        raise _fail(f"{bundle}: expected a bundle with calibration tables to refit, got none")
    if traffic is not None:
        try:
            sample = load_sample(traffic)
        except (OSError, ValueError) as exc:
            raise _fail(str(exc)) from None
        source = f"traffic file {traffic.name}"
    else:
        found, missing = collect_inputs(images or [])
        for path, why in missing:
            typer.echo(f"error: {path}: {why}", err=True)
        if missing or not found:
            raise _fail("--images: expected existing image files or folders")
        try:
            model = load_served_model(bundle, threads, provider="cpu")
        except BundleError as exc:
            raise _fail(str(exc)) from None
        sample = sample_images(model, [p for p, _ in found], pixels_per_image, seed, decision_scale)
        source = f"{len(found)} images, {pixels_per_image} pixels each"
    config = replace(RefitConfig(seed=seed), min_row_pixels=min_row_pixels)
    try:
        tables, refit = refit_from_traffic(sample.pixels, base.tables, config)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    provenance = recalibration_provenance(base, sample, refit, config, source)
    models_dir = out if out is not None else bundle.parent.parent
    path = write_candidate(models_dir, base, tables, provenance, version)
    typer.echo(
        f"wrote {path}: {sample.num_pixels} pixels, PIT deviation {refit.pit_before.deviation:.4f} -> "
        f"{refit.pit_after.deviation:.4f}, rows kept from {base.version}: "
        f"{provenance['kept_current_rows'] or 'none'}"
    )
