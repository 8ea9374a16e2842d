"""Benchmark TorchServe serving the offline-preset archive: batching off vs on, side by side.

    .venv/bin/python bench/serving.py [--batch-size 8] [--delay-ms 50] [--max-length 16]

For each mode a private TorchServe (serve/config.properties on free loopback ports, token auth
off) serves an archive packaged from the same checkpoint; the same JPEG photos (scikit-image's
samples) are sent as raw bodies at concurrency 1, 4 and 16, and the table reports requests/s
and p50/p95 latency. The checkpoint is model-store/imgtocap.mar's when that was built from the
offline preset, else an untrained offline model (its captions always run to max_length, so
max_length is capped identically in both modes). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import tempfile
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import torch
from PIL import Image

from model import build_captioner, preset, save_checkpoint
from serve.runner import TorchServe
from training.package import ServeParams, build_archive

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = ROOT / "model-store" / "imgtocap.mar"
# urllib would label a body form-urlencoded, which TorchServe then fails to parse (500)
OCTETS = {"Content-Type": "application/octet-stream"}
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "camera",
    "colorwheel",
    "moon",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = ServeParams()  # batching on = params.yaml's defaults
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--delay-ms", type=int, default=defaults.max_batch_delay_ms)
    parser.add_argument("--max-length", type=int, default=16, help="the same in both modes")
    parser.add_argument("--num-beams", type=int, default=defaults.num_beams["default"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=3, help="per client, per level")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="imgtocap-bench-") as tmp:
        checkpoint, source = offline_checkpoint(Path(tmp))
        photos = [jpeg(name) for name in PHOTOS]
        modes = {
            "off": dict(batch_size=1, max_batch_delay_ms=0),
            "on": dict(batch_size=args.batch_size, max_batch_delay_ms=args.delay_ms),
        }
        results: dict[str, dict[int, dict[str, float]]] = {}
        for mode, batching in modes.items():
            params = {
                **batching,
                "num_beams": {"default": args.num_beams, "max": max(5, args.num_beams)},
                "max_length": {"default": args.max_length, "max": max(40, args.max_length)},
            }
            store = Path(tmp) / f"store-{mode}"
            build_archive(checkpoint, store, params)
            workdir = Path(tmp) / f"server-{mode}"
            with TorchServe.private(workdir, store, disable_token_authorization="true") as server:
                url = f"{server.inference}/predictions/imgtocap"
                results[mode] = {}
                for clients in args.concurrency:
                    results[mode][clients] = load(url, photos, clients, args.requests)
                    print(f"batching {mode}, concurrency {clients}: {results[mode][clients]}")
        print(
            f"\n{source}; {args.num_beams} beam(s), max_length {args.max_length}; one worker, "
            f"{os.cpu_count()} CPUs; batching on = batch_size {args.batch_size}, "
            f"max_batch_delay {args.delay_ms} ms; {args.requests} requests per client.\n"
        )
        print(table(results, args.concurrency))


def offline_checkpoint(tmp: Path) -> tuple[Path, str]:
    """The offline-preset checkpoint inside model-store/imgtocap.mar, else an untrained one."""
    if ARCHIVE.is_file():
        with zipfile.ZipFile(ARCHIVE) as mar:
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            path = tmp / "model.pth"
            path.write_bytes(mar.read(manifest["model"]["serializedFile"]))
        config = torch.load(path, map_location="cpu", weights_only=True)["config"]
        if config["encoder"] == "efficientnet_lite0":
            return path, f"the trained offline-preset model in {ARCHIVE.relative_to(ROOT)}"
    path = tmp / "untrained.pth"
    save_checkpoint(build_captioner(preset("offline")), path)
    return path, "an UNTRAINED offline-preset model (no offline archive in model-store/)"


def jpeg(name: str) -> bytes:
    """One of scikit-image's sample photos as JPEG bytes."""
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def load(url: str, photos: list[bytes], clients: int, per_client: int) -> dict[str, float]:
    """`clients` threads each PUT `per_client` photos back to back; throughput and latency."""
    latencies: list[float] = []
    batches: list[int] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(per_client):
            body = photos[(k * per_client + i) % len(photos)]
            request = urllib.request.Request(url, data=body, method="PUT", headers=OCTETS)
            start = time.perf_counter()
            with urllib.request.urlopen(request, timeout=600) as response:
                answer = json.load(response)
            with lock:
                latencies.append(time.perf_counter() - start)
                batches.append(answer["batch_size"])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if len(latencies) != clients * per_client:
        raise RuntimeError(f"{clients * per_client - len(latencies)} requests failed")
    return {
        "rps": len(latencies) / wall,
        "p50": percentile(latencies, 50) * 1000,
        "p95": percentile(latencies, 95) * 1000,
        "batch": statistics.mean(batches),
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def table(results: dict[str, dict[int, dict[str, float]]], levels: list[int]) -> str:
    rows = [
        "| concurrency | batching | requests/s | p50 ms | p95 ms | mean batch |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for clients in levels:
        for mode in results:
            r = results[mode][clients]
            rows.append(
                f"| {clients} | {mode} | {r['rps']:.2f} | {r['p50']:.0f} | {r['p95']:.0f} "
                f"| {r['batch']:.1f} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
