"""Sub-commands of `blda` (see blda/cli.py). Heavy imports go inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command("synth")
def synth(
    out: Annotated[
        Path,
        typer.Option(help="Output folder (source/ in the GTA5 or SYNTHIA layout, target/ in Cityscapes')."),
    ],
    count: Annotated[int, typer.Option(help="Source (training) images.")] = 2000,
    target_count: Annotated[
        int, typer.Option(help="Target training images (unlabelled for adaptation).")
    ] = 1000,
    val_count: Annotated[int, typer.Option(help="Target validation images.")] = 200,
    source_val_count: Annotated[
        int, typer.Option(help="Held-out source images (source_val/, GTA5 layout).")
    ] = 200,
    seed: Annotated[int, typer.Option(help="Seed; with the options it fixes every byte.")] = 0,
    height: Annotated[int, typer.Option(help="Image height in pixels.")] = 256,
    width: Annotated[int, typer.Option(help="Image width in pixels.")] = 512,
    shift_strength: Annotated[
        float, typer.Option(help="Domain shift: 0 = none, 1 = default, up to 3 = harder.")
    ] = 1.0,
    appearance_shift: Annotated[
        float | None, typer.Option(help="Override the shift of the appearance only.")
    ] = None,
    label_shift: Annotated[
        float | None, typer.Option(help="Override the shift of the label distribution only.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Processes (the output does not depend on it).")] = 2,
    source_layout: Annotated[
        str,
        typer.Option(
            help="Source layout: gta5, or synthia (SYNTHIA-RAND-CITYSCAPES: 16-bit labels, its 16 classes); "
            "train it with --set data.source_format=synthia."
        ),
    ] = "gta5",
) -> None:
    """Generate the synthetic domain-adaptation benchmark (source like GTA5 or SYNTHIA, target like
    Cityscapes)."""
    from tqdm import tqdm

    from training.data.synth.config import SceneConfig, ShiftConfig, SynthConfig
    from training.data.synth.writer import generate

    try:
        config = SynthConfig(
            scene=SceneConfig(height=height, width=width),
            shift=ShiftConfig(strength=shift_strength, appearance=appearance_shift, labels=label_shift),
            seed=seed,
            source_count=count,
            target_count=target_count,
            val_count=val_count,
            source_val_count=source_val_count,
            source_layout=source_layout,
        )
    except ValueError as e:
        _fail(str(e))
        return
    if workers < 1:
        _fail(f"--workers: expected >= 1, got {workers}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(f"{out}: expected a writable folder, got {e}")
    bar = tqdm(total=1, unit="img", desc="synth")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    generate(config, out, workers=workers, progress=progress)
    bar.close()
    typer.echo(
        f"wrote {out} ({count} source, {source_val_count} source val, "
        f"{target_count} target train, {val_count} target val)"
    )


@app.command("contact-sheet")
def contact_sheet(
    data: Annotated[Path, typer.Option(help="A folder written by `blda synth` (source/ and target/).")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("contact_sheet.png"),
    count: Annotated[int, typer.Option(help="Samples per domain.")] = 4,
    seed: Annotated[int, typer.Option(help="Which samples.")] = 0,
    split: Annotated[str, typer.Option(help="Target split: train or val.")] = "val",
    source_format: Annotated[
        str, typer.Option(help="Format of data/source: gta5|synthia|cityscapes|folder.")
    ] = "gta5",
    target_format: Annotated[
        str, typer.Option(help="Format of data/target: gta5|synthia|cityscapes|folder.")
    ] = "cityscapes",
) -> None:
    """Source and target samples with their labels overlaid, side by side."""
    from training.data.contact_sheet import benchmark_sheet
    from training.data.datasets import DatasetError

    if count < 1:
        _fail(f"--count: expected >= 1, got {count}")
    try:
        image = benchmark_sheet(data, count, seed, split, source_format, target_format)
    except (DatasetError, ValueError) as e:
        _fail(str(e))
        return
    image.save(out)
    typer.echo(f"wrote {out} ({image.width}x{image.height})")
