"""CPU and GPU give the same captions: a tiny captioner, generate() and the TorchServe handler.

    .venv/bin/python bench/gpu_check.py [--device auto]

A tiny model is fitted (on the CPU, seeded) to give each of eight pictures its own caption, so
its next-token distributions are peaked and CPU and GPU arithmetic must pick the same words.
Then greedy and beam-3 captions of those pictures, and of eight it never saw, are compared:
`generate()` on the CPU vs on the device, and the archive's TorchServe handler (loaded in this
process, given the GPU as TorchServe gives one: `gpu_id` 0) vs the CPU. Exits 1 when a
memorised picture's caption differs. Without CUDA the device is the CPU: the script still runs
end to end (a check of the script, not of a GPU).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout, and the tests' model helpers (tests.helpers)

import torch  # noqa: E402
from ts.context import RequestProcessor  # noqa: E402

from model import (  # noqa: E402
    CaptionPipeline,
    Decoding,
    load_checkpoint,
    load_tokenizer,
    save_checkpoint,
)
from tests.helpers.model import (  # noqa: E402
    PICTURE_CAPTIONS,
    archive_handler,
    caption_tokens,
    fit,
    picture,
    tiny,
)
from training.params import pick_device  # noqa: E402
from training.stages.package import build_archive  # noqa: E402


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    picture(i, size=64).save(buffer, format="PNG")
    return buffer.getvalue()


def captions(model, pictures: list, device: torch.device, tokenizer, beams: int) -> list:
    captioner = CaptionPipeline(model.to(device), tokenizer)
    return [r.caption for r in captioner.caption(pictures, Decoding(beams, max_length=12))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    cpu = torch.device("cpu")
    tokenizer = load_tokenizer("packaged")

    torch.manual_seed(0)
    model = tiny()
    pictures = [picture(i, size=64) for i in range(16)]
    pixels = torch.stack([model.preprocess(p) for p in pictures[:8]])  # (8, 3, S, S)
    tokens = caption_tokens(tokenizer, PICTURE_CAPTIONS, max_tokens=8)  # (8, T)
    grid = model.encode_image(pixels)
    fit(
        model,
        grid,
        tokens,
        lr=1e-2,
        steps=800,
        until=lambda m: captions(m, pictures[:8], cpu, tokenizer, 1) == PICTURE_CAPTIONS,
    )

    failed = False
    print(
        f"\ncaptions on the CPU vs on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'no CUDA'}):\n"
    )
    print("| path | pictures | greedy agree | beam 3 agree |")
    print("|---|---|---|---|")
    rows = {}
    for beams in (1, 3):
        reference = captions(model, pictures, cpu, tokenizer, beams)
        rows[beams] = (reference, captions(model, pictures, device, tokenizer, beams))
        model.to(cpu)
    for name, part in (("memorised", slice(0, 8)), ("unseen", slice(8, 16))):
        agree = [sum(a == b for a, b in zip(ref[part], got[part])) for ref, got in rows.values()]
        print(f"| generate() | {name} | {agree[0]}/8 | {agree[1]}/8 |")
        failed |= name == "memorised" and agree != [8, 8]

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, Path(tmp) / "model.pth")
        load_checkpoint(Path(tmp) / "model.pth")  # the archive's checkpoint loads on its own
        serve = {"num_beams": {"default": 1, "max": 3}, "max_length": {"default": 12, "max": 40}}
        archive = build_archive(Path(tmp) / "model.pth", Path(tmp) / "store", serve)
        gpu_id = 0 if device.type == "cuda" else None
        handler, context, _ = archive_handler(archive, Path(tmp), batch_size=8, gpu_id=gpu_id)
        bodies = [{"body": png(i)} for i in range(16)]
        context.request_processor = [RequestProcessor({}) for _ in bodies]
        answers = [json.loads(a)["caption"] for a in handler.handle(bodies, context)]
    served = rows[1][0]  # the handler's default: greedy
    for name, part in (("memorised", slice(0, 8)), ("unseen", slice(8, 16))):
        agree = sum(a == b for a, b in zip(answers[part], served[part]))
        print(f"| TorchServe handler on {handler.device} | {name} | {agree}/8 | |")
        failed |= name == "memorised" and agree != 8
    if failed:
        print("\nFAILED: a memorised picture got another caption on the device than on the CPU")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
