"""Decoding: KV cache parity, greedy vs beam, beam search vs exhaustive search, batching."""

import itertools
import math

import pytest
import torch

from model import Captioner, preset


def tiny(fusion: str = "cross_attention", **overrides) -> Captioner:
    return Captioner(preset("tiny", fusion=fusion, **overrides)).eval()


def grids(model: Captioner, batch: int) -> torch.Tensor:
    spec = model.encoder.spec
    return torch.randn(batch, spec.grid**2, spec.channels) * 3  # (B, N, C)


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_decoding_equals_uncached(fusion, num_beams):
    model = tiny(fusion)
    grid = grids(model, 5)
    cached = model.generate(grid=grid, num_beams=num_beams, max_length=12)
    uncached = model.generate(grid=grid, num_beams=num_beams, max_length=12, use_cache=False)
    assert cached.tokens == uncached.tokens
    assert cached.scores == pytest.approx(uncached.scores, abs=1e-4)


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_beam_search_with_one_beam_is_greedy(fusion):
    model = tiny(fusion)
    context = model.image_context(grids(model, 6))
    with torch.no_grad():
        greedy = model._greedy(context, 12, 1.0, use_cache=True)
        beam = model._beam_search(context, 1, 12, 1.0, use_cache=True)
    assert beam.tokens == greedy.tokens
    assert beam.scores == pytest.approx(greedy.scores, abs=1e-4)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_batched_decoding_equals_one_image_at_a_time(num_beams):
    """No mix-ups across a batch: each image gets the caption it gets alone."""
    model = tiny()
    grid = grids(model, 4)
    batched = model.generate(grid=grid, num_beams=num_beams, max_length=10)
    for i in range(4):
        alone = model.generate(grid=grid[i : i + 1], num_beams=num_beams, max_length=10)
        assert alone.tokens[0] == batched.tokens[i]
        assert alone.scores[0] == pytest.approx(batched.scores[i], abs=1e-4)


def exhaustive_best(model, grid, vocab, max_length, length_penalty):
    """Score every sequence ending in [SEP] (or cut at max_length) under the model."""
    eos, bos = model.config.eos_id, model.config.bos_id
    best = (-math.inf, None)
    for length in range(1, max_length + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if eos in seq[:-1] or (length < max_length and seq[-1] != eos):
                continue  # only [SEP]-terminated prefixes, or full-length sequences
            tokens = torch.tensor([[bos, *seq]])
            logits, _ = model(grid, torch.cat([tokens, tokens[:, :1]], dim=1))
            logp = logits[0].log_softmax(-1)  # (T, V)
            total = sum(logp[t, tok].item() for t, tok in enumerate(seq))
            score = total / length**length_penalty
            if score > best[0]:
                best = (score, [t for t in seq if t != eos])
    return best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_wide_beam_search_finds_the_exhaustive_optimum(fusion, length_penalty):
    vocab, max_length = 5, 3
    model = tiny(fusion, vocab_size=vocab, pad_id=0, bos_id=1, eos_id=2)
    grid = grids(model, 1)
    # wide enough to keep every prefix: beam search becomes exhaustive and must agree
    out = model.generate(
        grid=grid, num_beams=vocab**max_length, max_length=max_length, length_penalty=length_penalty
    )
    score, seq = exhaustive_best(model, grid, vocab, max_length, length_penalty)
    assert out.tokens[0] == seq
    assert out.scores[0] == pytest.approx(score, abs=1e-4)


def test_generate_rejects_bad_arguments():
    model = tiny()
    with pytest.raises(ValueError, match="exactly one of pixels= or grid="):
        model.generate()
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        model.generate(grid=grids(model, 1), num_beams=0)
    with pytest.raises(ValueError, match="max_length must be in"):
        model.generate(grid=grids(model, 1), max_length=1000)
