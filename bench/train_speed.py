"""What a Flickr8k run costs, from measured step times: encoding, training, beam-search decoding.

    .venv/bin/python bench/train_speed.py [--preset base] [--device auto]

The architecture of a preset with random weights (speed does not depend on their values, and
nothing downloads), run the way the pipeline runs it: the transform stage's traced, frozen
encoder; the train stage's step (bf16 autocast on CUDA, AdamW, gradient clipping) on batches
of `--batch-size` captions of `--tokens` tokens over a `--output-vocab`-word output vocabulary;
the evaluate stage's beam search. Then multiplies by Flickr8k's sizes: 8,091 images to
encode, 6,000 training images x 5 captions per epoch, 1,000 test images. Prints a table with
each phase's peak memory (allocated on a GPU; on a CPU, the process's peak RSS so far).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

from model import build_captioner, preset  # noqa: E402
from training.params import pick_device  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64, help="captions per training step")
    parser.add_argument("--tokens", type=int, default=16, help="[CLS] + caption + [SEP]")
    parser.add_argument("--output-vocab", type=int, default=7000, help="Flickr8k: ~7k WordPieces")
    parser.add_argument("--encode-batch", type=int, default=32, help="the transform stage's")
    parser.add_argument("--eval-batch", type=int, default=32, help="params.yaml evaluate")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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

    # transform: the traced, frozen encoder, as training/transform.py builds it
    pixels = torch.randn(args.encode_batch, 3, spec.image_size, spec.image_size, device=device)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # as in the transform stage
        warnings.simplefilter("ignore", FutureWarning)
        frozen = torch.jit.optimize_for_inference(torch.jit.trace(model.encoder, pixels[:2]))
        encode_s = timed(lambda: frozen(pixels), device, args.repeats) / args.encode_batch
    encode_peak = peak_memory(device)

    # train: one optimizer step, as training/train.py takes it
    B = args.batch_size
    grid = torch.randn(B, spec.grid**2, spec.channels, device=device).half()
    tokens = torch.randint(1000, 1000 + args.output_vocab - 10, (B, args.tokens), device=device)
    tokens[:, 0], tokens[:, -1] = config.bos_id, config.eos_id
    rows = torch.arange(B, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=on_cuda):
            _, loss = model(grid, tokens, 0.1, rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    step_s = timed(step, device, args.repeats)
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
    print(
        f"| train | {1000 * step_s:.0f} ms / step of {B} captions | "
        f"{epoch_steps * step_s / 60:.1f} min / epoch ({epoch_steps:.0f} steps) | {train_peak} |"
    )
    print(
        f"| evaluate (beam {args.num_beams}, {args.max_length} tokens, batches of "
        f"{len(eval_grid)}) | {1000 * decode_s:.1f} ms / image | "
        f"{FLICKR8K['test_images'] * decode_s / 60:.1f} min for "
        f"{FLICKR8K['test_images']:,} test images | {decode_peak} |"
    )


if __name__ == "__main__":
    main()
