"""Decoding speed, side by side in one run: imgtocap's generate() vs a naive decoder vs HF generate().

    python bench/decode.py [--max-length 20] [--repeats 3]

Offline preset (EfficientNet-Lite0 + MiniLM-L6), CPU. The weights are the untrained starting
point, so every method decodes the full max_length: equal work for all three.
- imgtocap: image encoded once, KV cache, batched beams; and the same with the decoder's
  int8 weights (model/int8.py, serve.cpu_decoder's default; "same tokens" vs fp32 imgtocap).
- naive: how the original project decoded: at every step the whole model runs again, the
  encoder and the whole prefix, logits for every position, and the last one is kept.
- transformers: BertLMHeadModel.generate() on the same decoder weights, fed our image memory.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# this checkout's model/ (as pytest imports it), and tests/helpers/hf_bert.py: the transformers
# reference, kept out of model/ so that it does not ship in every .mar
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from model import Decoding, build_captioner, preset  # noqa: E402
from model.decoding import Generation, beam_search, greedy, strip  # noqa: E402
from model.int8 import quantize_decoder  # noqa: E402
from tests.helpers.hf_bert import to_hf_bert_lm  # noqa: E402

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "coins", "horse"]


def photos(model, batch: int) -> torch.Tensor:
    images = []
    for i in range(batch):
        array = getattr(data, PHOTOS[i % len(PHOTOS)])()
        images.append(model.preprocess(Image.fromarray(array).convert("RGB")))
    return torch.stack(images)  # (B, 3, 224, 224)


class NaiveState:
    """A DecodeState that decodes as the original project did: at every step the whole model
    runs again, the encoder and the whole prefix, and keeps the last position's logits."""

    def __init__(self, model, pixels: torch.Tensor):
        self.model, self.pixels = model, pixels
        self.batch_size, self.device = pixels.shape[0], pixels.device

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        px = self.pixels.repeat_interleave(tokens.shape[0] // self.pixels.shape[0], dim=0)
        # forward() predicts tokens[:, 1:]: a dummy last token makes it read the whole prefix
        logits, _ = self.model(self.model.encode_image(px), torch.cat([tokens, tokens[:, :1]], 1))
        return F.log_softmax(logits[:, -1].float(), dim=-1)  # (B, V): every position computed

    def select(self, rows: torch.Tensor, image: bool = False) -> None:
        pass  # nothing kept between steps: the prefix is re-run


def naive_generate(
    model, pixels, num_beams: int, max_length: int, no_repeat_ngram_size: int
) -> Generation:
    state = NaiveState(model, pixels)
    if num_beams == 1:
        return greedy(state, model.config, max_length, no_repeat_ngram_size=no_repeat_ngram_size)
    return beam_search(
        state, model.config, num_beams, max_length, no_repeat_ngram_size=no_repeat_ngram_size
    )


def hf_generate(model, hf, pixels, num_beams, max_length, no_repeat_ngram_size):
    from transformers import DynamicCache, EncoderDecoderCache

    memory = model.image_context(model.encode_image(pixels))  # image encoded once, as ours
    bos = torch.full((pixels.shape[0], 1), model.config.bos_id)
    out = hf.generate(
        input_ids=bos,
        encoder_hidden_states=memory,
        max_new_tokens=max_length,
        num_beams=num_beams,
        no_repeat_ngram_size=no_repeat_ngram_size,
        do_sample=False,
        eos_token_id=model.config.eos_id,
        pad_token_id=model.config.pad_id,
        # transformers 5.24's default cache breaks BERT cross-attention (FACTS.md)
        cache=EncoderDecoderCache(DynamicCache(), DynamicCache()),
    )
    return [strip(row, model.config) for row in out.tolist()]


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--no-repeat-ngram-size", type=int, default=Decoding.no_repeat_ngram_size, help="0: off"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_captioner(preset("offline")).eval()
    hf = to_hf_bert_lm(model.config, model.state_dict())
    int8 = quantize_decoder(copy.deepcopy(model))
    rows = []
    with torch.inference_mode():
        for num_beams in (1, 3):
            for batch in (1, 16):
                pixels = photos(model, batch)
                kw = dict(
                    num_beams=num_beams,
                    max_length=args.max_length,
                    no_repeat_ngram_size=args.no_repeat_ngram_size,
                )
                ours_t, ours = timed(lambda p=pixels, k=kw: model.generate(p, **k), args.repeats)
                int8_t, ours8 = timed(lambda p=pixels, k=kw: int8.generate(p, **k), args.repeats)
                hf_t, hf_tokens = timed(
                    lambda p=pixels, k=kw: hf_generate(model, hf, p, **k), args.repeats
                )
                naive_t, naive = timed(lambda p=pixels, k=kw: naive_generate(model, p, **k), 1)
                same = ours.tokens == naive.tokens
                same_hf = ours.tokens == hf_tokens
                for name, seconds, agree in (
                    ("imgtocap", ours_t, "-"),
                    (
                        "imgtocap, int8 decoder",
                        int8_t,
                        "yes" if ours8.tokens == ours.tokens else "NO",
                    ),
                    ("naive (original)", naive_t, "yes" if same else "NO"),
                    ("transformers generate()", hf_t, "yes" if same_hf else "NO"),
                ):
                    rows.append((name, num_beams, batch, seconds, naive_t / seconds, agree))
    print(
        f"\noffline preset, CPU threads={args.threads}, max_length={args.max_length}, "
        f"no_repeat_ngram_size={args.no_repeat_ngram_size}, "
        f"median of {args.repeats} (naive: 1 run)\n"
    )
    print("| decoder | beams | batch | ms / caption | captions / s | vs naive | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, beams, batch, seconds, speedup, agree in rows:
        print(
            f"| {name} | {beams} | {batch} | {1000 * seconds / batch:.1f} | "
            f"{batch / seconds:.1f} | {speedup:.1f}x | {agree} |"
        )


if __name__ == "__main__":
    main()
