"""The segmentation service against in-process onnxruntime on the same image (issue 5's targets).

    .venv/bin/python -m bench service                     # the target table
    .venv/bin/python -m bench.service --variants          # also the batching / concurrency settings

Default bundle (models/: BLDA_DEFAULT_MODEL or the first model, its highest version), one 512x1024 PNG
street scene from the synthetic target domain. A real `blda serve` on 127.0.0.1, started here with its
defaults, is posted the same PNG bytes with httpx. "In-process" runs the same work with no HTTP: decode
the PNG, preprocess, onnxruntime, argmax, resize, encode the PNG mask; the session alone is shown too.
A bundle without calibration tables gets tables fitted on its own logits of a few synthetic target
images (pseudo-labels = argmax), so that the calibrated path can be measured; the table says so.

Targets: HTTP p50 / in-process p50 <= 1.20 (calibration off); calibrated / uncalibrated HTTP p50 <= 1.10;
throughput at 8 concurrent clients >= 0.9x in-process single-stream throughput; peak extra memory of the
calibrated decision of a 1024x2048 image <= 64 MB (tracemalloc; at the default decision size and at the
image's full size). Decisions are the pipeline's: logits upsampled to the decision size (issue 11).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench._timing import timed
from calibration.alignment import candidate_counts
from calibration.bundle import CalibrationSpec, discover_bundles, load_bundle, save_bundle, version_key
from calibration.distributions import fit_pair_gmms
from calibration.segmentation import decision_size, upsample_bilinear
from calibration.tables import build_calibration_tables
from service.imaging import decode_image, preprocess
from service.inference import ServedModel, load_served_model
from service.pipeline import decide_for, options_from, segment_bytes
from service.settings import ServiceSettings, available_cores

REPO = Path(__file__).resolve().parent.parent
HEIGHT, WIDTH = 512, 1024


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
        save_bundle(models_dir, bundle.model_path, bundle.tables, bundle.manifest)
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`blda serve` with its defaults (access log included) on a free port; its output goes to a log file."""

    def __init__(self, models_dir: Path, model: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "blda",
            "serve",
            "--port",
            str(self.port),
            "--models-dir",
            str(models_dir),
        ]
        environment = {**os.environ, "BLDA_DEFAULT_MODEL": model, **env}
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self.process = subprocess.Popen(
            command, cwd=REPO, env=environment, stdout=self.log, stderr=subprocess.STDOUT
        )

    def fail(self, why: str) -> SystemExit:
        self.log.seek(0)
        tail = self.log.read().decode(errors="replace")[-3000:]
        return SystemExit(f"{why}; server output:\n{tail}")

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self.fail(f"the server exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.process.kill()
        raise self.fail("the server was not ready within 120 s")

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()


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
    client: httpx.Client, data: bytes, calibrate: bool, server_s: list[float] | None = None
) -> Callable[[], None]:
    """One POST of the image; the server's own stage seconds are appended to server_s."""
    url = f"/v1/segment?calibrate={str(calibrate).lower()}"

    def call() -> None:
        response = client.post(url, content=data, headers={"content-type": "image/png"})
        response.raise_for_status()
        if server_s is not None:
            server_s.append(server_seconds(response.headers["server-timing"]))

    return call


def throughputs(
    base: str, data: bytes, clients: int, per_round: int, rounds: int, local: Callable[[], object]
) -> tuple[float, float]:
    """Images per second: (HTTP with `clients` concurrent keep-alive connections, in-process single
    stream), measured in alternating rounds of `per_round` images each, calibration off."""
    state = threading.local()
    opened: list[httpx.Client] = []

    def post(_: int) -> None:
        client = getattr(state, "client", None)
        if client is None:
            client = state.client = httpx.Client(base_url=base, timeout=120)
            opened.append(client)
        response = client.post(
            "/v1/segment?calibrate=false", content=data, headers={"content-type": "image/png"}
        )
        response.raise_for_status()

    http_s = local_s = 0.0
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(post, range(clients * 2)))  # connections open, warm
        for _ in range(rounds):
            start = time.perf_counter()
            list(pool.map(post, range(per_round)))
            http_s += time.perf_counter() - start
            time.sleep(0.1)
            start = time.perf_counter()
            for _ in range(per_round):
                local()
            local_s += time.perf_counter() - start
    for client in opened:
        client.close()
    return rounds * per_round / http_s, rounds * per_round / local_s


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


def ms(values: np.ndarray) -> str:
    return f"{np.median(values) * 1000:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--requests", type=int, default=40, help="sequential requests per latency row")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--rounds", type=int, default=4, help="alternating throughput rounds (4 x clients images each)"
    )
    parser.add_argument(
        "--variants", action="store_true", help="also measure batching / concurrency settings"
    )
    parser.add_argument("--quick", action="store_true", help="15 requests per row, 2 throughput rounds")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds = 15, 2

    bundle_dir = default_bundle(args.models_dir)
    settings = ServiceSettings()
    threads = settings.onnx_threads()
    data = png(street_scene(seed=7))
    with tempfile.TemporaryDirectory(prefix="blda-bench-") as tmp:
        models_dir, tables_note = staged_models(bundle_dir, Path(tmp), threads)
        staged = models_dir / bundle_dir.parent.name / bundle_dir.name
        model = load_served_model(staged, threads)
        rgb = decode_image(data, settings.max_image_pixels)
        tensor = preprocess(rgb, model.input_size(HEIGHT, WIDTH), model.norm)
        assert model.bundle.tables is not None
        logits = model.run(tensor)[0]
        counts = candidate_counts(logits, model.bundle.tables.shifts, model.tau_default)
        size = decision_size((HEIGHT, WIDTH), model.input_size(HEIGHT, WIDTH), settings.decision_scale)
        up_counts = candidate_counts(
            upsample_bilinear(logits, size), model.bundle.tables.shifts, model.tau_default
        )
        bound_note = f"{(counts == 1).mean():.0%} of logit pixels decided by the exact bound, " \
            f"{counts.mean():.1f} hypotheses per pixel; at the decision size {size[0]}x{size[1]}: " \
            f"{(up_counts == 1).mean():.1%}, {up_counts.mean():.2f} hypotheses per pixel"  # fmt: skip
        memory = [decision_memory(model, settings, scale) for scale in (settings.decision_scale, 8.0)]

        # In-process calls run on a worker thread, as the server runs them: the comparison is then about HTTP.
        worker = ThreadPoolExecutor(1)

        def local(calibrate: bool) -> Callable[[], object]:
            return lambda: worker.submit(in_process, model, data, calibrate, settings).result()

        stages_s: list[float] = []
        with (
            Server(models_dir, model.name, {}) as server,
            httpx.Client(base_url=server.base, timeout=60) as client,
        ):
            measured = interleaved(
                {
                    "session": lambda: worker.submit(model.run, tensor).result(),
                    "local_raw": local(False),
                    "local_cal": local(True),
                    "http_raw": http_call(client, data, False, stages_s),
                    "http_cal": http_call(client, data, True),
                },
                args.requests,
            )
            throughput, local_throughput = throughputs(
                server.base,
                data,
                args.clients,
                4 * args.clients,
                args.rounds,
                local(False),
            )
        session_only, local_raw, local_cal = measured["session"], measured["local_raw"], measured["local_cal"]
        http_raw, http_cal = measured["http_raw"], measured["http_cal"]
        variants = []
        if args.variants:
            for label, env in (
                ("batch 4, wait 5 ms", {"BLDA_BATCH_MAX_SIZE": "4", "BLDA_BATCH_MAX_WAIT_MS": "5"}),
                ("2 concurrent inferences", {"BLDA_MAX_CONCURRENT_INFERENCES": "2"}),
                ("2 concurrent inferences, 1 onnx thread", {
                    "BLDA_MAX_CONCURRENT_INFERENCES": "2", "BLDA_INTRA_OP_THREADS": "1"}),
            ):  # fmt: skip
                with Server(models_dir, model.name, env) as server:
                    with httpx.Client(base_url=server.base, timeout=60) as client:
                        p50 = ms(timed(http_call(client, data, False), max(10, args.requests // 2)))
                    rate, local_rate = throughputs(
                        server.base,
                        data,
                        args.clients,
                        4 * args.clients,
                        2,
                        local=local(False),
                    )
                    variants.append((label, p50, rate / local_rate))

    raw_ratio = float(np.median(http_raw) / np.median(local_raw))
    cal_ratio = float(np.median(http_cal) / np.median(http_raw))
    tp_ratio = throughput / local_throughput
    print(f"bundle {model.name}/{model.version} ({'trained' if model.bundle.manifest.provenance.trained else 'UNTRAINED'})"
          f", input {HEIGHT}x{WIDTH} PNG ({len(data) // 1024} KiB), model input {tensor.shape[2]}x{tensor.shape[3]}, "
          f"{threads} onnxruntime threads, {available_cores()} cores\ncalibration tables: {tables_note}; {bound_note}")  # fmt: skip
    print(f"{'measure':<58} {'value':>10}  target")
    rows = [
        ("in-process onnxruntime session.run alone, p50 ms", ms(session_only), ""),
        ("in-process pipeline (decode..encode), calibrate off, p50 ms", ms(local_raw), ""),
        ("in-process pipeline, calibrate on, p50 ms", ms(local_cal), ""),
        ("HTTP, calibrate off, p50 ms", ms(http_raw), ""),
        ("HTTP, calibrate on, p50 ms", ms(http_cal), ""),
        ("HTTP, calibrate off: server stages (Server-Timing), p50 ms", ms(np.array(stages_s[3:])), ""),
        ("HTTP / in-process p50 (calibrate off)", f"{raw_ratio:.3f}", "<= 1.20"),
        (
            "HTTP / session.run alone p50 (for reference)",
            f"{np.median(http_raw) / np.median(session_only):.3f}",
            "",
        ),
        ("HTTP calibrated / uncalibrated p50", f"{cal_ratio:.3f}", "<= 1.10"),
        ("in-process single-stream throughput (pipeline), img/s", f"{local_throughput:.1f}", ""),
        (f"HTTP throughput, {args.clients} clients, img/s", f"{throughput:.1f}", ""),
        (f"HTTP {args.clients}-client / in-process throughput", f"{tp_ratio:.3f}", ">= 0.90"),
    ]
    for (peak, (dh, dw)), scale in zip(memory, (settings.decision_scale, 8.0), strict=True):
        label = f"1024x2048 calibrated decision, scale {scale:g} ({dh}x{dw}): peak extra MB"
        rows.append((label, f"{peak / 2**20:.1f}", "<= 64"))
    for label, value, target in rows:
        print(f"{label:<58} {value:>10}  {target}")
    for label, p50, ratio in variants:
        print(f"variant {label:<50} p50 {p50} ms, {args.clients}-client / in-process throughput {ratio:.2f}")


if __name__ == "__main__":
    main()
