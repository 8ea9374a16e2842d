"""What a Flickr8k run costs, from measured step times: encoding, training, beam-search decoding.

    .venv/bin/python bench/train_speed.py [--preset base] [--device auto]

The architecture of a preset with random weights (speed does not depend on their values, and
nothing downloads), run the way the pipeline runs it: the transform stage's traced, frozen
encoder; the train stage's step (AdamW, gradient clipping; `--precision auto fp32` times both
of train.precision's modes, taking turns) on batches of `--batch-size` captions of `--tokens`
tokens over a `--output-vocab`-word output vocabulary; the evaluate stage's beam search. Then
multiplies by Flickr8k's sizes: 8,091 images to encode, 6,000 training images x 5 captions per
epoch, 1,000 test images. Prints a table with each phase's peak memory (allocated on a GPU;
on a CPU, the process's peak RSS so far).

    .venv/bin/python bench/train_speed.py --scaling 2 [--preset offline] [--threads 1]

Instead: DDP's scaling. The train stage's step (`training.stages.train.train_step`, DDP, the batch
sharded as the stage shards it) under real torchrun with 1 process and with N, each process
limited to `--threads` threads (gloo on a CPU, NCCL with `--device cuda`, one GPU each), the
same global batch; the two take turns for `--rounds` rounds so that a shared machine's load
weighs on both alike. Prints ms per global step and the efficiency: speedup over N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

from model import build_captioner, preset  # noqa: E402
from training.params import pick_device  # noqa: E402
from training.runtime import distributed  # noqa: E402
from training.runtime.distributed import World  # noqa: E402
from training.runtime.precision import PRECISIONS, uses_bf16  # noqa: E402
from training.stages.train import TrainConfig, train_step  # noqa: E402

FLICKR8K = {"images": 8091, "train_captions": 6000 * 5, "test_images": 1000}


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(device: torch.device, reset: bool = True) -> str:
    """The peak memory since the last reset: allocated on the GPU, else the process's RSS."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return f"{peak / 2**30:.2f} GiB"
    import resource  # the CPU: the process's peak resident set (KiB on Linux), never reset

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


def random_batch(config, spec, batch_size: int, tokens: int, output_vocab: int, device):
    """(grid (B, N, C) fp16 on `device`, tokens (B, T), rows (B,)): one caption per image."""
    grid = torch.randn(batch_size, spec.grid**2, spec.channels, device=device).half()
    ids = torch.randint(1000, 1000 + output_vocab - 10, (batch_size, tokens))
    ids[:, 0], ids[:, -1] = config.bos_id, config.eos_id
    return grid, ids, torch.arange(batch_size)


def scaling_worker(args, out: Path) -> None:
    """One rank under torchrun: time the train stage's DDP step; rank 0 writes ms per step."""
    torch.set_num_threads(args.threads)
    world = World.from_env()
    device = distributed.device_for(pick_device(args.device), world)
    distributed.join(world, device, 300)
    torch.manual_seed(0)  # every rank: the same model and the same global batch
    config = preset(args.preset, output_vocab=list(range(args.output_vocab)))
    model = build_captioner(config, pretrained=False).to(device).train()
    batch = random_batch(
        config, model.encoder.spec, args.batch_size, args.tokens, args.output_vocab, device
    )
    net = model
    if world.size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    cfg = TrainConfig(batch_size=args.batch_size, precision=args.precision[0])

    def step() -> None:
        train_step(net, optimizer, scheduler, batch, cfg, device, world, config.pad_id)

    step()  # warm-up
    distributed.barrier(world)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    distributed.barrier(world)  # a global step ends when the slowest rank's ends
    seconds = (time.perf_counter() - start) / args.steps
    if world.main:
        out.write_text(json.dumps({"ms_per_step": 1000 * seconds}))
    distributed.leave(world)


def scaling(args) -> None:
    """1 process vs `args.scaling`, taking turns: the table of ms per step and efficiency."""
    forwarded = ["--preset", args.preset, "--device", args.device, "--threads", str(args.threads)]
    forwarded += ["--batch-size", str(args.batch_size), "--tokens", str(args.tokens)]
    forwarded += ["--output-vocab", str(args.output_vocab), "--steps", str(args.steps)]
    forwarded += ["--precision", args.precision[0]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    times: dict[int, list[float]] = {1: [], args.scaling: []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        for _ in range(args.rounds):
            for n in times:
                torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
                cmd = [sys.executable, *torchrun, __file__, *forwarded, "--worker", str(out)]
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
                times[n].append(json.loads(out.read_text())["ms_per_step"])
    one = statistics.median(times[1])
    where = "GPU each" if args.device == "cuda" else f"{args.threads} thread(s) each, CPU"
    print(
        f"\n`{args.preset}` preset, DDP under torchrun, global batch {args.batch_size} captions "
        f"of {args.tokens} tokens, {where}; median of {args.rounds} rounds of {args.steps} steps"
        "\n"
    )
    print("| processes | ms / step | steps / s | speedup | efficiency |")
    print("|---:|---:|---:|---:|---:|")
    for n, measured in times.items():
        ms = statistics.median(measured)
        print(f"| {n} | {ms:.0f} | {1000 / ms:.2f} | {one / ms:.2f}x | {one / ms / n:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64, help="captions per training step")
    parser.add_argument("--tokens", type=int, default=16, help="[CLS] + caption + [SEP]")
    parser.add_argument("--output-vocab", type=int, default=7000, help="Flickr8k: ~7k WordPieces")
    parser.add_argument(
        "--precision", nargs="+", default=["auto"], choices=PRECISIONS, help="train.precision(s)"
    )
    parser.add_argument("--encode-batch", type=int, default=32, help="the transform stage's")
    parser.add_argument("--eval-batch", type=int, default=32, help="params.yaml evaluate")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scaling", type=int, default=0, help="processes to compare with 1")
    parser.add_argument("--threads", type=int, default=1, help="--scaling: per process")
    parser.add_argument("--steps", type=int, default=5, help="--scaling: timed per round")
    parser.add_argument("--rounds", type=int, default=3, help="--scaling: turns of each")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a rank of --scaling
    args = parser.parse_args()
    if args.worker:
        return scaling_worker(args, args.worker)
    if args.scaling:
        return scaling(args)
    device = pick_device(args.device)
    torch.manual_seed(0)

    config = preset(args.preset, output_vocab=list(range(args.output_vocab)))  # holds the specials
    model = build_captioner(config, pretrained=False)
    with torch.no_grad():  # random weights could end a caption anywhere: time the full length
        bias = model.fuse.bias if config.fusion == "concat" else model.head.bias
        bias[config.eos_id] = -1e4
    model.to(device)
    spec = model.encoder.spec
    on_cuda = device.type == "cuda"
    peak_memory(device)  # from here: the model's weights count in every phase

    # transform: the traced, frozen encoder, as training/stages/transform.py builds it
    pixels = torch.randn(args.encode_batch, 3, spec.image_size, spec.image_size, device=device)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # as in the transform stage
        warnings.simplefilter("ignore", FutureWarning)
        frozen = torch.jit.optimize_for_inference(torch.jit.trace(model.encoder, pixels[:2]))
        encode_s = timed(lambda: frozen(pixels), device, args.repeats) / args.encode_batch
    encode_peak = peak_memory(device)

    # train: one optimizer step, as training/stages/train.py takes it
    B = args.batch_size
    batch = random_batch(config, spec, B, args.tokens, args.output_vocab, device)
    grid = batch[0]
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model.train()
    step_s: dict[str, list[float]] = {p: [] for p in args.precision}
    for _ in range(args.repeats):  # the precisions take turns: the machine's load hits all alike
        for precision in args.precision:
            cfg = TrainConfig(batch_size=B, precision=precision)

            def step(cfg: TrainConfig = cfg) -> None:  # features on the device, captions on the CPU
                train_step(model, optimizer, scheduler, batch, cfg, device, pad_id=config.pad_id)

            step_s[precision].append(timed(step, device, 1))
    train_peak = peak_memory(device)
    model.eval()

    # evaluate: beam search from precomputed features, every caption max_length long
    eval_grid = grid[: args.eval_batch]
    decode_s = timed(
        lambda: model.generate(
            grid=eval_grid, num_beams=args.num_beams, max_length=args.max_length
        ),
        device,
        args.repeats,
    ) / len(eval_grid)
    decode_peak = peak_memory(device)

    name = (
        torch.cuda.get_device_name(device) if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    )
    total = sum(p.numel() for p in model.parameters())
    print(
        f"\n`{args.preset}` preset ({config.encoder} + {config.num_layers}-layer decoder, "
        f"{config.fusion}, {total / 1e6:.0f}M parameters) on {name}\n"
    )
    print("| stage | measured | Flickr8k | peak memory |")
    print("|---|---|---|---|")
    epoch_steps = FLICKR8K["train_captions"] / B
    print(
        f"| transform (encode once, batches of {args.encode_batch}) | "
        f"{1000 * encode_s:.1f} ms / image | "
        f"{FLICKR8K['images'] * encode_s / 60:.1f} min for {FLICKR8K['images']:,} images | "
        f"{encode_peak} |"
    )
    for precision, times in step_s.items():
        seconds = statistics.median(times)
        mode = "bf16 autocast" if uses_bf16(device, precision) else "fp32"
        print(
            f"| train (`{precision}`: {mode}) | {1000 * seconds:.0f} ms / step of {B} captions | "
            f"{epoch_steps * seconds / 60:.1f} min / epoch ({epoch_steps:.0f} steps) | "
            f"{train_peak} |"
        )
    print(
        f"| evaluate (beam {args.num_beams}, {args.max_length} tokens, batches of "
        f"{len(eval_grid)}) | {1000 * decode_s:.1f} ms / image | "
        f"{FLICKR8K['test_images'] * decode_s / 60:.1f} min for "
        f"{FLICKR8K['test_images']:,} test images | {decode_peak} |"
    )


if __name__ == "__main__":
    main()
