"""Drift scenario of live recalibration (issue 12): stale tables vs refitted from traffic vs offline.

    flock /tmp/blda-cpu.lock python -m bench drift [--variant=strong|--variant=labels]   # ~8 min, 2 cores

1. A shifted variant of the synthetic benchmark (another seed, stronger appearance and label shift;
   300 target-train + 100 target-val images at 256x512; VARIANTS) is generated under runs/drift/ once.
2. The shipped bundle (tables fitted for the default target domain) is copied to a fresh models dir and
   served by `blda serve --workers 2` with a SQLite state file.
3. The variant's target-train images are sent as traffic (unlabelled; 2 clients).
4. While 2 load clients keep posting (``record=false``, so the traffic sample stays those images), the
   script calls recalibrate, reads the shadow figures, activates the candidate, rolls back, activates
   again, and counts every failed request; then it restarts the server and checks that the candidate
   still serves.
5. Offline arm: `blda bundle recalibrate --images` on the same target-train images, computed in-process
   (same sampling, same core refit, same fallback tables).
6. `blda evaluate --bundle` on the variant's target-val images with their ground truth (τ = the
   bundle's 0.2, tables of each bundle): raw, stale (shipped), live (from traffic), offline.

Prints the table and writes runs/drift/<variant>/drift.json. gap recovered = (live - stale) / (offline - stale).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench._server import Server

REPO = Path(__file__).resolve().parent.parent
ADMIN_KEY = "bench-drift-key"
PNG = {"content-type": "image/png"}
# The shifted variants (blda synth options), fixed before any was measured; every run reports its own.
VARIANTS = {
    # A new camera and city at once: appearance and labels both shifted past the held-out benchmark's 1.5.
    "strong": ["--seed", "2", "--shift-strength", "2.0", "--appearance-shift", "2.5", "--label-shift", "2.5"],
    # A new city seen by a similar camera: the label distribution moves most.
    "labels": ["--seed", "3", "--shift-strength", "1.5", "--appearance-shift", "1.5", "--label-shift", "3.0"],
}
SERVE_OPTIONS = ("--workers", "2", "--no-access-log", "--log-level", "warning")
SYNTH_COUNTS = ["--count", "20", "--source-val-count", "10", "--target-count", "300", "--val-count", "100"]


def blda(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "blda", *args], cwd=REPO, check=True)


def images_of(data: Path, split: str) -> list[Path]:
    return sorted((data / "target" / "leftImg8bit" / split).rglob("*.png"))


def evaluate(bundle: Path, data: Path, out: Path, tau: float) -> dict[str, Any]:
    blda("evaluate", "--bundle", str(bundle), "--data", str(data), "--out", str(out), "--tau", str(tau),
         "--tables", "bundle", "--threads", "2")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    target = metrics["target"]
    return {
        "raw": target["raw"]["miou"],
        "calibrated": target["calibrated"][f"{tau:g}"]["miou"],
        "iou_calibrated": target["calibrated"][f"{tau:g}"]["iou"],
        "pit": target.get("pit"),
        "images": target["num_images"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="strong")
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "blda-synth" / "2.0.0")
    parser.add_argument("--load-clients", type=int, default=2)
    args = parser.parse_args()
    synth = VARIANTS[args.variant]
    data = REPO / "runs" / "drift" / f"data-{args.variant}"  # generated once, kept
    work = REPO / "runs" / "drift" / args.variant  # one run's models, logs and scores
    if not (data / "synth.json").is_file():
        blda("synth", "--out", str(data), *SYNTH_COUNTS, *synth)
    for stale in (
        "models",
        "offline-models",
        "state.sqlite",
        "state.sqlite-shm",
        "state.sqlite-wal",
        "server.log",
    ):
        path = work / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    models = work / "models"
    name, base_version = args.bundle.parent.name, args.bundle.name
    shutil.copytree(args.bundle, models / name / base_version)
    tau = float(json.loads((args.bundle / "manifest.json").read_text())["calibration"]["tau_default"])
    env = {
        **os.environ,
        "BLDA_ADMIN_API_KEY": ADMIN_KEY,
        "BLDA_STATE_URL": f"sqlite:///{work / 'state.sqlite'}",
        "BLDA_RECALIBRATION_SHADOW_FRACTION": "1.0",
        "PYTHONPATH": str(REPO),
    }
    traffic = images_of(data, "train")
    report: dict[str, Any] = {
        "data": str(data),
        "traffic_images": len(traffic),
        "variant": args.variant,
        "synth": synth,
    }

    server = Server(models, env, SERVE_OPTIONS, work / "server.log").wait_ready()
    try:
        statuses: Counter[str] = Counter()
        lock = threading.Lock()

        def post(client: httpx.Client, path: Path, record: bool) -> None:
            try:
                params = {} if record else {"record": "false"}
                status = str(
                    client.post(
                        "/v1/segment", content=path.read_bytes(), headers=PNG, params=params
                    ).status_code
                )
            except httpx.TransportError as exc:
                status = type(exc).__name__
            with lock:
                statuses[status] += 1

        started = time.perf_counter()
        with (
            httpx.Client(base_url=server.base, timeout=120) as c1,
            httpx.Client(base_url=server.base, timeout=120) as c2,
            ThreadPoolExecutor(2) as pool,
        ):
            list(pool.map(lambda ip: post((c1, c2)[ip[0] % 2], ip[1], True), enumerate(traffic)))
        report["traffic"] = {"statuses": dict(statuses), "seconds": round(time.perf_counter() - started, 1)}
        print(f"traffic: {len(traffic)} images, statuses {dict(statuses)}", flush=True)
        time.sleep(3.0)  # every worker flushes its buffer within BLDA_RECALIBRATION_FLUSH_S (1 s)

        load_statuses: Counter[str] = Counter()
        stop = threading.Event()

        def load(index: int) -> None:
            with httpx.Client(base_url=server.base, timeout=120) as client:
                i = index
                while not stop.is_set():
                    try:
                        answer = client.post(
                            "/v1/segment", content=traffic[i % len(traffic)].read_bytes(), headers=PNG,
                            params={"record": "false"},
                        )  # fmt: skip
                        status = str(answer.status_code)
                    except httpx.TransportError as exc:
                        status = type(exc).__name__
                    with lock:
                        load_statuses[status] += 1
                    i += args.load_clients

        loaders = [threading.Thread(target=load, args=(k,)) for k in range(args.load_clients)]
        for t in loaders:
            t.start()
        admin_calls: list[dict[str, Any]] = []
        with httpx.Client(base_url=server.base, timeout=600, headers={"X-API-Key": ADMIN_KEY}) as admin:

            def call(label: str, method: str, path: str) -> dict[str, Any]:
                t0 = time.perf_counter()
                answer = admin.request(method, path)
                body = answer.json() if answer.headers.get("content-type", "").endswith("json") else {}
                entry = {"call": label, "status": answer.status_code, "seconds": round(time.perf_counter() - t0, 2),
                         "active": body.get("active_version"), "all_switched": body.get("sync", {}).get("all_switched")}  # fmt: skip
                admin_calls.append(entry)
                print(f"  {entry}", flush=True)
                return body

            recal = call("recalibrate", "POST", f"/v1/models/{name}/recalibrate")
            candidate = recal["candidate_version"]
            report["recalibration"] = recal["recalibration"]
            time.sleep(20.0)  # the load runs in shadow
            report["shadow"] = admin.get(f"/v1/models/{name}/bias").json()["shadow"]
            call("activate", "POST", f"/v1/models/{name}/versions/{candidate}/activate")
            time.sleep(3.0)
            call("rollback", "POST", f"/v1/models/{name}/rollback")
            time.sleep(3.0)
            call("activate again", "POST", f"/v1/models/{name}/versions/{candidate}/activate")
            time.sleep(3.0)
        stop.set()
        for t in loaders:
            t.join()
        report["load"] = {"statuses": dict(load_statuses)}
        report["admin_calls"] = admin_calls
        print(f"load during the admin calls: {dict(load_statuses)}", flush=True)
    finally:
        server.stop()

    server = Server(models, env, SERVE_OPTIONS, work / "server.log").wait_ready()
    try:
        served = httpx.get(f"{server.base}/v1/models/{name}", timeout=30).json()
        answer = httpx.post(
            f"{server.base}/v1/segment", content=traffic[0].read_bytes(), headers=PNG, timeout=120
        )
        report["after_restart"] = {
            "active": served["active_version"],
            "segment_version": answer.headers.get("x-model-version"),
        }
        print(f"after restart: {report['after_restart']}", flush=True)
    finally:
        server.stop()

    offline_models = work / "offline-models"
    blda("bundle", "recalibrate", "--bundle", str(models / name / base_version), "--images",
         str(data / "target" / "leftImg8bit" / "train"), "--out", str(offline_models), "--version", "offline")  # fmt: skip
    arms = {
        "stale (shipped tables)": models / name / base_version,
        "live (refitted from traffic)": models / name / candidate,
        "offline (refitted on the variant's target train)": offline_models / name / "offline",
    }
    scores = {
        arm: evaluate(path, data, work / f"eval-{i}", tau) for i, (arm, path) in enumerate(arms.items())
    }
    report["scores"] = scores
    stale, live, offline = (s["calibrated"] for s in scores.values())
    recovered = (live - stale) / (offline - stale) if offline != stale else float("nan")
    report["gap_recovered"] = recovered
    raw = next(iter(scores.values()))["raw"]

    print(f"\nDrift: {data.name} target val ({next(iter(scores.values()))['images']} images), tau {tau:g}\n")
    print("| tables | mIoU calibrated | vs raw | PIT deviation on val (true classes) |")
    print("| --- | --- | --- | --- |")
    print(f"| none (raw) | {raw:.4f} | | |")
    for arm, s in scores.items():
        pit = s["pit"]["mean_abs_deviation"] if s.get("pit") else float("nan")
        print(f"| {arm} | {s['calibrated']:.4f} | {s['calibrated'] - raw:+.4f} | {pit:.4f} |")
    print(f"\ngap recovered (live - stale) / (offline - stale): {recovered:.3f}")
    failed = sum(n for status, n in {**statuses, **load_statuses}.items() if status != "200")
    print(f"failed requests (traffic + load during admin calls): {failed} of "
          f"{sum(statuses.values()) + sum(load_statuses.values())}")  # fmt: skip
    rec = report["recalibration"]
    print(f"PIT deviation on held-out traffic (argmax classes): {rec['pit_before']['mean_abs_deviation']} -> "
          f"{rec['pit_after']['mean_abs_deviation']}; rows kept from {base_version}: {rec['kept_current_rows']}")  # fmt: skip
    out = work / "drift.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
