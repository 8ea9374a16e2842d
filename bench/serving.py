"""Benchmark TorchServe serving the offline-preset archive: batching off vs on, side by side,
against the bare model call and the compute floor on the same machine in the same run.

    .venv/bin/python bench/serving.py [--batch-size 8] [--delay-ms 50 5] [--max-length 16]
    .venv/bin/python bench/serving.py --cpu-decoder fp32 int8     # the decoders side by side
    .venv/bin/python bench/serving.py --device cuda --batch-size 16 --concurrency 1 16 64

One private TorchServe per mode (batching off, then batching on with each --delay-ms; each
with every --cpu-decoder, the archive's serve.cpu_decoder;
serve/config.properties on free loopback ports, token auth off) serves an archive packaged
from the same checkpoint, all at once; the same JPEG photos (scikit-image's samples) are sent
as raw bodies at concurrency 1, 4 and 16, each level --rounds times with the modes taking
turns, so that a shared machine's changing load weighs on every mode alike. The table reports
requests/s (median over the rounds) and p50/p95 latency. Before each mode's concurrency-1 run,
while every server idles, this process times the bare caption call (`model.load(...).caption`,
preprocessing and decoding) of the same photos (decoded from JPEG beforehand): "p50 / bare" is
served p50 over the bare call's p50 (with the mode's decoder). The compute floor is the FLOPs of one caption
(`torch.utils.flop_counter.FlopCounterMode` around the caption call) divided by the fp32 matmul GFLOP/s this machine reaches. The checkpoint is
model-store/imgtocap.mar's when that was built from the offline preset, else an untrained
offline model (its captions always run to max_length, so max_length is capped identically in
every mode). With --device cuda (bench/gpu.sh) the workers, the bare call and the matmul run on
the first GPU. Prints Markdown tables.
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
from contextlib import ExitStack
from pathlib import Path
from typing import Any

# Before torch loads OpenMP: spinning threads would steal the worker's cores (as serve/ sets it)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from model import Decoding, build_captioner, open_image, preset, save_checkpoint  # noqa: E402
from model import load as load_captioner  # noqa: E402  (load() below is the HTTP load)
from model.options import CPU_DECODER, CPU_DECODERS  # noqa: E402
from serve.runner import TorchServe  # noqa: E402
from training.paths import ARCHIVE_PATH, MODEL_NAME  # noqa: E402
from training.stages.package import ServeConfig, build_archive  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = ROOT / ARCHIVE_PATH
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
    defaults = ServeConfig()  # batching on = params.yaml's defaults
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument(
        "--delay-ms", type=int, nargs="+", default=[defaults.max_batch_delay_ms],
        help="max_batch_delay_ms of the batching modes, one server each",
    )  # fmt: skip
    parser.add_argument("--max-length", type=int, default=16, help="the same in every mode")
    parser.add_argument("--num-beams", type=int, default=defaults.num_beams["default"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=3, help="per client, per level")
    parser.add_argument("--min-requests", type=int, default=24, help="per level, at least")
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="each level runs this often per mode, the modes taking turns (a shared machine's "
        "load then weighs on all of them alike)",
    )  # fmt: skip
    parser.add_argument(
        "--cpu-decoder", nargs="+", choices=CPU_DECODERS, default=[CPU_DECODER],
        help="serve.cpu_decoder of the archives, one server per decoder and batching mode",
    )  # fmt: skip
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="where the workers, the bare call and the matmul run (cuda: the first GPU)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here")
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    # TorchServe gives each worker a gpu_id when it sees GPUs; on the CPU, none
    gpus = {"number_of_gpu": 1 if args.device == "cuda" else 0}

    batchings = {"off": dict(batch_size=1, max_batch_delay_ms=1)}  # (a delay of 0: 100 ms)
    for delay in args.delay_ms:
        batchings[f"on, {delay} ms"] = dict(batch_size=args.batch_size, max_batch_delay_ms=delay)
    decoders = args.cpu_decoder if args.device == "cpu" else ["fp32"]  # a GPU runs fp32
    modes = {  # the label: the batching, and the decoder when there is more than one
        name + (f", {decoder}" if len(decoders) > 1 else ""): {**batching, "cpu_decoder": decoder}
        for decoder in decoders
        for name, batching in batchings.items()
    }
    with tempfile.TemporaryDirectory(prefix="imgtocap-bench-") as tmp, ExitStack() as servers:
        checkpoint, source = offline_checkpoint(Path(tmp))
        photos = [jpeg(name) for name in PHOTOS]
        bares = {
            decoder: Bare(checkpoint, photos, args.num_beams, args.max_length, device, decoder)
            for decoder in decoders
        }
        gflops = matmul_gflops(device)  # before the servers start, and again after the rounds
        urls = {}
        for n, (mode, batching) in enumerate(modes.items()):  # all up at once; idle ones wait
            params = {
                **batching,
                "num_beams": {"default": args.num_beams, "max": max(5, args.num_beams)},
                "max_length": {"default": args.max_length, "max": max(40, args.max_length)},
            }
            store = build_archive(checkpoint, Path(tmp) / f"store-{n}", params).parent
            server = servers.enter_context(
                TorchServe.private(
                    Path(tmp) / f"server-{n}", store, disable_token_authorization="true", **gpus
                )
            )
            urls[mode] = f"{server.inference}/predictions/{MODEL_NAME}"
            load(urls[mode], photos, 1, 2)  # the first requests pay for lazy set-up
        served = {mode: {c: Level() for c in args.concurrency} for mode in modes}
        bare_ms: dict[str, list[float]] = {mode: [] for mode in modes}
        for r in range(args.rounds):
            for clients in args.concurrency:
                per_client = max(args.requests, math.ceil(args.min_requests / clients))
                order = list(modes) if r % 2 == 0 else list(modes)[::-1]
                for mode in order:
                    if clients == 1:  # every server idles: the bare call on the same photos
                        sent = [i % len(photos) for i in range(per_client)]
                        bare_ms[mode] += bares[modes[mode]["cpu_decoder"]].times(sent)
                    served[mode][clients].add(load(urls[mode], photos, clients, per_client))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        gflops = max(gflops, matmul_gflops(device))  # a shared machine: the better of the two
        flops = Bare(checkpoint, photos, args.num_beams, args.max_length, device, "fp32").flops()
        print(
            f"\n{source}; {args.num_beams} beam(s), max_length {args.max_length}; one worker on "
            f"{_device_name(device)}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
            f"threads; batching on = "
            f"batch_size {args.batch_size}; each level {args.rounds} times per mode, the modes "
            f"in turn, at least {args.min_requests} requests each time.\n"
        )
        all_bare = [t for times in bare_ms.values() for t in times]
        floor_ms = flops / (gflops * 1e9) * 1000
        print(
            f"bare caption call, one photo at a time: p50 {percentile(all_bare, 50):.0f} ms; "
            f"compute floor {floor_ms:.1f} ms per caption ({flops / 1e9:.2f} GFLOP per caption, "
            f"mean over the photos, at {gflops:.0f} GFLOP/s: fp32 matmul 2048^3 on "
            f"{_device_name(device)})\n"
        )
        bare_p50 = {mode: percentile(times, 50) for mode, times in bare_ms.items()}
        print(table(served, bare_p50, args.concurrency))


class Level:
    """One (mode, concurrency) level over its rounds: latencies pooled, requests/s per round."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.batches: list[int] = []
        self.rps: list[float] = []

    def add(self, run: dict[str, Any]) -> None:
        self.latencies += run["latencies"]
        self.batches += run["batches"]
        self.rps.append(len(run["latencies"]) / run["wall"])


class Bare:
    """The checkpoint in this process, the photos decoded once: what the served model does per
    request minus HTTP, TorchServe and the handler."""

    def __init__(
        self,
        checkpoint: Path,
        photos: list[bytes],
        num_beams: int,
        max_length: int,
        device: torch.device,
        cpu_decoder: str,
    ):
        self.captioner = load_captioner(checkpoint, device, cpu_decoder=cpu_decoder)
        self.device = device
        self.images = [open_image(data) for data in photos]
        self.decoding = Decoding(num_beams=num_beams, max_length=max_length)
        for image in self.images[:2]:
            self._caption(image)  # lazy set-up, as the handler's initialize() pays it

    def _caption(self, image: Image.Image) -> None:
        self.captioner.caption([image], self.decoding)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the time until the caption exists

    def times(self, sequence: list[int]) -> list[float]:
        """ms of the caption call for each photo of this sequence, one call each."""
        times = []
        for index in sequence:
            start = time.perf_counter()
            self._caption(self.images[index])
            times.append((time.perf_counter() - start) * 1000)
        return times

    def flops(self) -> float:
        """FLOPs of one caption, the mean over the photos (a caption stops at [SEP]); count
        them on an fp32 decoder (the counter does not see the int8 kernel)."""
        total = 0
        for image in self.images:
            counter = FlopCounterMode(display=False)
            with counter:
                self._caption(image)
            total += counter.get_total_flops()
        return total / len(self.images)


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """fp32 GFLOP/s of an n x n x n matmul on `device` (on the CPU with this process's torch
    threads; on a GPU as torch's default matmul precision has it), the best run."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"


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


def load(url: str, photos: list[bytes], clients: int, per_client: int) -> dict[str, Any]:
    """`clients` threads each PUT `per_client` photos back to back (client k starts at photo
    k * per_client); every latency (ms), the batch size each answer reports, the wall time."""
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
                latencies.append((time.perf_counter() - start) * 1000)
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
    return {"latencies": latencies, "batches": batches, "wall": wall}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def table(
    served: dict[str, dict[int, Level]], bare_p50: dict[str, float], levels: list[int]
) -> str:
    rows = [
        "| concurrency | batching | requests/s | p50 ms | p95 ms | mean batch | p50 / bare |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for clients in levels:
        for mode, by_level in served.items():
            level = by_level[clients]
            p50 = percentile(level.latencies, 50)
            ratio = f"{p50 / bare_p50[mode]:.2f}" if clients == 1 else ""
            rows.append(
                f"| {clients} | {mode} | {statistics.median(level.rps):.2f} | {p50:.0f} "
                f"| {percentile(level.latencies, 95):.0f} | {statistics.mean(level.batches):.1f} "
                f"| {ratio} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
