"""Serving speed against the floor: each stage of a request beside the fastest way to do it (issue 16).

    .venv/bin/python -m bench service            # the stage table, request table and targets (~3 min)
    .venv/bin/python -m bench service --quick    # fewer turns (~1.5 min)
    .venv/bin/python -m bench service --variants # also the throughput of other worker / thread settings

Default bundle (models/: BLDA_DEFAULT_MODEL or the first model, its highest version); one synthetic street
scene of the target domain at 512x1024, upscaled bilinearly to 1024x2048, as PNG, JPEG (quality 90) and
WebP (quality 90): fixed inputs. A real `blda serve` with its defaults runs on 127.0.0.1.

Stage table: the service's own functions (service.imaging, service.pipeline) timed in-process beside the
stage's floor (bench/floors.py): decoding to the model's size the fastest way Pillow offers (DCT-scaled
JPEG, box reduction, reducing_gap), session.run alone, the argmax on the logit grid, the mask upsampled
and encoded the fastest way (index gather or np.repeat; Pillow PNG level 1 or zlib RLE of the pixels
alone). "HTTP + framework" is HTTP p50 minus the in-process pipeline p50, beside a GET /healthz round
trip. The plain pipeline is the script anyone could write (bench.floors.plain_pipeline).

Targets: 1024x2048 JPEG over HTTP >= 1.5x faster (p50) than the plain pipeline; 512x1024 PNG over HTTP
<= 1.15x the plain pipeline; 16-client HTTP throughput >= 1.7x one client's (512x1024 PNG); calibrated /
raw HTTP p50 <= 1.10 at both sizes. A bundle without calibration tables gets tables fitted on its own
logits of a few synthetic target images (pseudo-labels = argmax), and the header says so.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench import floors
from bench._server import Server
from calibration.bundle import (
    CalibrationSpec,
    discover_bundles,
    load_bundle,
    save_bundle,
    stored_calibrators,
    version_key,
)
from calibration.distributions import fit_pair_gmms
from calibration.segmentation import resize_nearest
from calibration.tables import build_calibration_tables
from service.imaging import load_resized, normalise, open_image, preprocess
from service.inference import ServedModel, load_served_model
from service.pipeline import decide_for, encode, options_from, segment_bytes
from service.settings import ServiceSettings, auto_workers, available_cores

REPO = Path(__file__).resolve().parent.parent
HEIGHT, WIDTH = 512, 1024  # the rendered scene
SIZES = ((512, 1024), (1024, 2048))
FORMATS: dict[str, dict[str, object]] = {"PNG": {}, "JPEG": {"quality": 90}, "WEBP": {"quality": 90}}
MEDIA = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# --variants: (label, `blda serve` options, environment) of other settings, throughput only.
VARIANTS: tuple[tuple[str, tuple[str, ...], dict[str, str]], ...] = (
    ("1 worker, 2 onnx threads (the default before)", ("--workers", "1"), {}),
    ("1 worker, 1 onnx thread, 2 concurrent inferences", ("--workers", "1"), {
        "BLDA_INTRA_OP_THREADS": "1", "BLDA_MAX_CONCURRENT_INFERENCES": "2"}),
    ("1 worker, 4 CPU-pool threads", ("--workers", "1"), {"BLDA_CPU_THREADS": "4"}),
)  # fmt: skip


def default_bundle(models_dir: Path) -> Path:
    bundles = discover_bundles(models_dir)
    if not bundles:
        raise SystemExit(f"no bundle under {models_dir}: export one first (see README)")
    wanted = os.environ.get("BLDA_DEFAULT_MODEL") or min(b.parent.name for b in bundles)
    versions = [b for b in bundles if b.parent.name == wanted]
    return max(versions, key=lambda b: version_key(b.name))


def street_scene(seed: int) -> np.ndarray:
    """(512, 1024, 3) uint8 from the synthetic target domain (numpy + Pillow only)."""
    from training.data.synth.config import SceneConfig, ShiftConfig, domain_configs
    from training.data.synth.scene import render_scene

    _, target = domain_configs(ShiftConfig())
    rgb, _ = render_scene(np.random.default_rng(seed), SceneConfig(height=HEIGHT, width=WIDTH), target)
    return rgb


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def staged_models(bundle_dir: Path, root: Path, threads: int) -> tuple[Path, str]:
    """A models directory holding the bundle, with calibration tables added when it has none."""
    bundle = load_bundle(bundle_dir)
    models_dir = root / "models"
    if bundle.tables is not None:
        save_bundle(models_dir, bundle.model_path, bundle.tables, bundle.manifest, stored_calibrators(bundle))
        return models_dir, "the bundle's own"
    model = load_served_model(bundle_dir, threads)
    logits = []
    for seed in range(100, 104):
        image = street_scene(seed)
        logits.append(model.run(preprocess(image, model.input_size(HEIGHT, WIDTH), model.norm)))
    z = np.concatenate(logits)  # (4, C, h, w)
    pairs, counts = fit_pair_gmms(z, z.argmax(axis=1), model.num_classes, k=5, max_samples=20000)
    tables = build_calibration_tables(pairs, counts)
    manifest = bundle.manifest.model_copy(update={"calibration": CalibrationSpec(enabled_default=False)})
    save_bundle(models_dir, bundle.model_path, tables, manifest)
    return models_dir, "fitted here on the model's own logits (the bundle has none)"


def in_process(model: ServedModel, data: bytes, calibrate: bool, settings: ServiceSettings) -> bytes:
    """What the service does for one request, minus HTTP: the same pipeline functions (service.pipeline)."""
    return segment_bytes(model, data, options_from(settings, calibrate, model.tau_default)).body


def interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 3, settle_s: float = 0.03
) -> dict[str, np.ndarray]:
    """Seconds per call of each function, measured in rotating turns so that load drift (other processes on
    the machine) affects every measure alike: the ratios compare like with like. A pause after each call
    lets work a call leaves behind (the server's observers run after its response) end before the next."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
            time.sleep(settle_s)
    return {name: np.array(values) for name, values in times.items()}


def server_seconds(server_timing: str) -> float:
    """Sum of the stage durations of a Server-Timing header ("decode;dur=3.1, infer;dur=9.0, ...")."""
    return sum(float(part.split("dur=")[1]) for part in server_timing.split(",")) / 1000


def http_call(
    client: httpx.Client,
    data: bytes,
    media: str,
    calibrate: bool,
    multipart: bool = False,
    mask_size: str = "image",
) -> Callable[[], None]:
    """One POST of the image: a raw body of its media type, or a multipart form with a `file` part."""
    url = f"/v1/segment?calibrate={str(calibrate).lower()}&mask_size={mask_size}"

    def call() -> None:
        if multipart:
            response = client.post(url, files={"file": ("image", data, media)})
        else:
            response = client.post(url, content=data, headers={"content-type": media})
        response.raise_for_status()

    return call


def throughputs(
    base: str, data: bytes, media: str, clients: int, per_round: int, rounds: int
) -> tuple[float, float]:
    """Images per second over HTTP: (`clients` concurrent keep-alive connections, one client's sequential
    stream), measured in alternating rounds of `per_round` images each, calibration off. The clients run
    in this process, on the same cores as the server: their cost is part of both figures."""
    state = threading.local()
    opened: list[httpx.Client] = []

    def post(_: int) -> None:
        client = getattr(state, "client", None)
        if client is None:
            client = state.client = httpx.Client(base_url=base, timeout=120)
            opened.append(client)
        client.post(
            "/v1/segment?calibrate=false", content=data, headers={"content-type": media}
        ).raise_for_status()

    many_s = one_s = 0.0
    with ThreadPoolExecutor(clients) as pool, ThreadPoolExecutor(1) as single:
        list(pool.map(post, range(clients * 2)))  # connections open, warm
        list(single.map(post, range(2)))
        for _ in range(rounds):
            start = time.perf_counter()
            list(pool.map(post, range(per_round)))
            many_s += time.perf_counter() - start
            time.sleep(0.2)  # observers of the last requests finish
            start = time.perf_counter()
            list(single.map(post, range(per_round)))
            one_s += time.perf_counter() - start
            time.sleep(0.2)
    for client in opened:
        client.close()
    return rounds * per_round / many_s, rounds * per_round / one_s


def decision_memory(
    model: ServedModel, settings: ServiceSettings, scale: float
) -> tuple[int, tuple[int, int]]:
    """Peak bytes allocated by the calibrated decision (service.pipeline.decide_for) of a 1024 x 2048
    image beyond its inputs, under tracemalloc (numpy reports its buffers to it), and the decision size."""
    big = np.asarray(Image.fromarray(street_scene(seed=8)).resize((2048, 1024), Image.Resampling.BILINEAR))
    logits = model.run(preprocess(big, model.input_size(1024, 2048), model.norm))[0]
    opts = replace(options_from(settings, True, model.tau_default), decision_scale=scale)
    decide_for(model, logits, (1024, 2048), opts)  # warm: the prepared tables are cached, not counted
    tracemalloc.start()
    try:
        made = decide_for(model, logits, (1024, 2048), opts)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, (int(made.raw.shape[0]), int(made.raw.shape[1]))


def p50(values: np.ndarray) -> float:
    return float(np.median(values)) * 1000


def test_images() -> dict[tuple[str, tuple[int, int]], bytes]:
    """One synthetic street scene (512 x 1024, upscaled bilinearly to 1024 x 2048) in each format."""
    scene = street_scene(seed=7)
    images = {}
    for size in SIZES:
        rgb = Image.fromarray(scene).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        for fmt, save in FORMATS.items():
            buffer = io.BytesIO()
            rgb.save(buffer, format=fmt, **save)
            images[fmt, size] = buffer.getvalue()
    return images


@dataclass(frozen=True)
class StageRow:
    stage: str
    ours_ms: float
    floor_ms: float | None
    floor_by: str


def fastest(measured: dict[str, np.ndarray], ways: Mapping[str, object]) -> tuple[float, str]:
    """The fastest of the named ways (p50 ms) and its name."""
    best = min(ways, key=lambda name: p50(measured[name]))
    return p50(measured[best]), best


def stage_profile(
    model: ServedModel, data: bytes, settings: ServiceSettings, repeats: int
) -> tuple[list[StageRow], dict[str, float]]:
    """In-process stage times of the service's own functions beside each stage's floor (bench.floors),
    measured in interleaved turns. The rows and the p50s (ms) of a few single measures."""
    opts = options_from(settings, False, model.tau_default)
    cal_opts = options_from(settings, True, model.tau_default)
    size = open_image(data, opts.max_pixels).size
    in_size = model.input_size(*size)
    resized = load_resized(open_image(data, opts.max_pixels), in_size, opts.scaled_decode)  # (h, w, 3)
    tensor = normalise(resized, model.norm)
    logits = model.run(tensor)[0]  # (C, h, w)
    decision = decide_for(model, logits, size, opts)
    full_mask = resize_nearest(decision.served, *size)
    decode_ways_ = {f"decode: {k}": v for k, v in floors.decode_ways(data, in_size).items()}
    upsample_ways_ = {f"upsample: {k}": v for k, v in floors.upsample_ways(decision.served, size).items()}
    encode_ways_ = {f"encode: {k}": v for k, v in floors.encode_ways(full_mask, model.palette).items()}
    ours: dict[str, Callable[[], object]] = {
        "decode": lambda: load_resized(open_image(data, opts.max_pixels), in_size, opts.scaled_decode),
        "normalise": lambda: normalise(resized, model.norm),
        "infer": lambda: model.run(tensor),
        "decide": lambda: decide_for(model, logits, size, opts),
        "decide calibrated": lambda: decide_for(model, logits, size, cal_opts),
        "upsample + encode": lambda: encode(model, decision, size, opts),
        "argmax on the logit grid": lambda: logits.argmax(axis=0).astype(np.uint8),
    }
    measured = interleaved({**ours, **decode_ways_, **upsample_ways_, **encode_ways_}, repeats, settle_s=0.0)
    decode_floor, decode_by = fastest(measured, decode_ways_)
    up_floor, up_by = fastest(measured, upsample_ways_)
    enc_floor, enc_by = fastest(measured, encode_ways_)
    m = {name: p50(values) for name, values in measured.items()}
    rows = [
        StageRow("decode to the model's size", m["decode"], decode_floor, decode_by.split(": ")[1]),
        StageRow("normalise", m["normalise"], None, ""),
        StageRow("infer", m["infer"], m["infer"], "session.run alone"),
        StageRow(
            "decide (raw, upsampled logits)",
            m["decide"],
            m["argmax on the logit grid"],
            "argmax on the logit grid",
        ),
        StageRow("decide calibrated", m["decide calibrated"], m["decide"], "the raw decision"),
        StageRow(
            "upsample + encode (PNG)",
            m["upsample + encode"],
            up_floor + enc_floor,
            f"{up_by.split(': ')[1]} + {enc_by.split(': ')[1]}",
        ),
    ]
    return rows, m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved turns per measure")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds")
    parser.add_argument(
        "--variants", action="store_true", help="also the throughput of other worker / thread settings"
    )
    parser.add_argument("--quick", action="store_true", help="8 turns per measure, 2 throughput rounds")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.rounds = 8, 2

    bundle_dir = default_bundle(args.models_dir)
    settings = ServiceSettings()
    threads = settings.onnx_threads()
    images = test_images()
    with tempfile.TemporaryDirectory(prefix="blda-bench-") as tmp:
        models_dir, tables_note = staged_models(bundle_dir, Path(tmp), threads)
        staged = models_dir / bundle_dir.parent.name / bundle_dir.name
        model = load_served_model(staged, threads)
        memory = [decision_memory(model, settings, scale) for scale in (settings.decision_scale, 8.0)]
        # In-process calls run on a worker thread, as the server runs them: the comparison is then about HTTP.
        worker = ThreadPoolExecutor(1)

        def on_worker(fn: Callable[..., object], *a: object) -> Callable[[], object]:
            return lambda: worker.submit(fn, *a).result()

        profiles: dict[tuple[str, tuple[int, int]], tuple[list[StageRow], dict[str, float]]] = {}
        with (
            Server(models_dir, {"BLDA_DEFAULT_MODEL": model.name}, ready_timeout_s=120) as server,
            httpx.Client(base_url=server.base, timeout=60) as client,
        ):
            for (fmt, size), data in images.items():
                media = MEDIA[fmt]
                rows, m = stage_profile(model, data, settings, args.repeats)
                measured = interleaved(
                    {
                        "plain": on_worker(floors.plain_pipeline, model, data),
                        "local": on_worker(in_process, model, data, False, settings),
                        "local_cal": on_worker(in_process, model, data, True, settings),
                        "http": http_call(client, data, media, False),
                        "http_cal": http_call(client, data, media, True),
                        "http_multipart": http_call(client, data, media, False, multipart=True),
                        "http_small_mask": http_call(client, data, media, False, mask_size="decision"),
                        "ping": lambda: client.get("/healthz").raise_for_status(),
                    },
                    args.repeats,
                )
                m.update({name: p50(values) for name, values in measured.items()})
                rows.append(StageRow("HTTP + framework", m["http"] - m["local"], m["ping"], "GET /healthz"))
                rows.append(
                    StageRow(
                        "request (HTTP, raw body)", m["http"], m["plain"], "the plain in-process pipeline"
                    )
                )
                profiles[fmt, size] = rows, m
            png_small = images["PNG", SIZES[0]]
            rate, single = throughputs(
                server.base, png_small, "image/png", args.clients, 4 * args.clients, args.rounds
            )
        variants = []
        if args.variants:
            for label, cli, env in VARIANTS:
                with Server(
                    models_dir, {"BLDA_DEFAULT_MODEL": model.name, **env}, cli, ready_timeout_s=120
                ) as server:
                    rate_v, single_v = throughputs(
                        server.base, png_small, "image/png", args.clients, 4 * args.clients, 2
                    )
                    variants.append((label, rate_v, single_v))

    print(
        f"bundle {model.name}/{model.version} ({'trained' if model.bundle.manifest.provenance.trained else 'UNTRAINED'}), "
        f"model input {model.input_size(*SIZES[0])}, in-process {threads} onnxruntime threads, {available_cores()} cores, "
        f"server: `blda serve` defaults ({auto_workers(available_cores())} workers); calibration tables: {tables_note}"
    )
    print(
        "\nstage p50 ms, in-process (the service's own functions) beside the stage's floor; HTTP rows over 127.0.0.1"
    )
    print(f"{'image':<16} {'stage':<32} {'ours':>7} {'floor':>7} {'ratio':>6}  floor by")
    for (fmt, size), (rows, _) in profiles.items():
        for row in rows:
            floor = f"{row.floor_ms:7.2f}" if row.floor_ms is not None else f"{'':>7}"
            ratio = f"{row.ours_ms / row.floor_ms:6.2f}" if row.floor_ms else f"{'':>6}"
            print(
                f"{fmt + f' {size[0]}x{size[1]}':<16} {row.stage:<32} {row.ours_ms:7.2f} {floor} {ratio}  {row.floor_by}"
            )
    print(
        "\nrequest p50 ms: plain = bench.floors.plain_pipeline in-process; in-proc = service.pipeline in-process; "
        "HTTP = raw body, calibrate=false; multipart = a form; small mask = mask_size=decision"
    )
    print(
        f"{'image':<16} {'plain':>7} {'in-proc':>8} {'HTTP':>7} {'HTTP cal':>9} {'multipart':>10} "
        f"{'small mask':>11} {'plain/HTTP':>11} {'cal/raw':>8}"
    )
    for (fmt, size), (_, m) in profiles.items():
        print(
            f"{fmt + f' {size[0]}x{size[1]}':<16} {m['plain']:7.1f} {m['local']:8.1f} {m['http']:7.1f} "
            f"{m['http_cal']:9.1f} {m['http_multipart']:10.1f} {m['http_small_mask']:11.1f} "
            f"{m['plain'] / m['http']:11.2f} "
            f"{m['http_cal'] / m['http']:8.2f}"
        )
    big_jpeg, small_png = profiles["JPEG", SIZES[1]][1], profiles["PNG", SIZES[0]][1]
    targets = [
        ("1024x2048 JPEG: plain in-process / HTTP p50", big_jpeg["plain"] / big_jpeg["http"], ">= 1.50"),
        ("512x1024 PNG: HTTP / plain in-process p50", small_png["http"] / small_png["plain"], "<= 1.15"),
        (f"{args.clients}-client / single-stream HTTP throughput", rate / single, ">= 1.70"),
    ]
    for size in SIZES:
        m = profiles["PNG", size][1]
        targets.append(
            (f"{size[0]}x{size[1]} PNG: HTTP calibrated / raw p50", m["http_cal"] / m["http"], "<= 1.10")
        )
    print(f"\n{'target':<58} {'value':>7}  target")
    for label, value, target in targets:
        print(f"{label:<58} {value:7.2f}  {target}")
    print(
        f"HTTP throughput, 512x1024 PNG: {rate:.1f} img/s with {args.clients} clients, {single:.1f} img/s single-stream"
    )
    for (peak, (dh, dw)), scale in zip(memory, (settings.decision_scale, 8.0), strict=True):
        print(
            f"1024x2048 calibrated decision, scale {scale:g} ({dh}x{dw}): peak extra {peak / 2**20:.1f} MB (<= 64)"
        )
    for label, rate_v, single_v in variants:
        print(
            f"variant {label:<48} {rate_v:6.1f} img/s, single-stream {single_v:5.1f}: {rate_v / single_v:.2f}x"
        )


if __name__ == "__main__":
    main()
