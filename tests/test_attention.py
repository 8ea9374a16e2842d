"""Attention per word: a distribution over the grid per token (greedy and beam search), free when
not asked, and the captions unchanged."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tests.helpers.model import tiny

# A small vocabulary ([SEP] = 2 among 8 ids): random tiny models end captions after a few
# tokens, at different steps for different images and beams.
SMALL = dict(vocab_size=8, pad_id=0, bos_id=1, eos_id=2)
MAX_LENGTH = 9


def scrambled(model):
    """The model with its decoder-side matrices redrawn large (std 0.5, seeded): BERT's 0.02
    init barely lets the image matter, so every image would get the same caption."""
    torch.manual_seed(6)  # a seed whose captions end at 7 different steps in every case
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("encoder") and p.dim() == 2:
                p.normal_(0, 0.5)
    return model


def grids(model, batch: int, seed: int = 0) -> torch.Tensor:
    spec = model.encoder.spec
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, spec.grid**2, spec.channels, generator=g) * 3  # (B, N, C)


CASES = {
    "greedy": dict(num_beams=1),
    "beam-3": dict(num_beams=3),
    "beam-4-no-cache": dict(num_beams=4, use_cache=False),
    "beam-3-dataset-vocab": dict(num_beams=3, output_vocab=[2, 4, 5, 6, 7]),
}


@pytest.mark.parametrize("case", CASES)
def test_attention_is_a_distribution_per_chosen_token(case):
    """Per image (T, N) float32 on the CPU, one row per token, each summing to 1; that it is the
    relevance of those tokens: tests/test_relevance.py."""
    kwargs = dict(CASES[case])
    model = scrambled(tiny(**SMALL, output_vocab=kwargs.pop("output_vocab", None)))
    grid = grids(model, 8)
    out = model.generate(grid=grid, max_length=MAX_LENGTH, return_attention=True, **kwargs)
    N = grid.shape[1]
    lengths = [len(ids) for ids in out.tokens]
    assert len(set(lengths)) >= 3, lengths  # captions of different lengths in one batch
    for ids, attention in zip(out.tokens, out.attention, strict=True):
        assert attention.shape == (len(ids), N)
        assert attention.dtype == torch.float32 and attention.device.type == "cpu"
        assert (attention >= 0).all()
        torch.testing.assert_close(attention.sum(-1), torch.ones(len(ids)))


@pytest.mark.parametrize("case", CASES)
def test_asking_for_attention_leaves_tokens_and_scores_bit_identical(case):
    kwargs = dict(CASES[case])
    model = scrambled(tiny(**SMALL, output_vocab=kwargs.pop("output_vocab", None)))
    grid = grids(model, 8, seed=1)
    plain = model.generate(grid=grid, max_length=MAX_LENGTH, **kwargs)
    seen = model.generate(grid=grid, max_length=MAX_LENGTH, return_attention=True, **kwargs)
    assert plain.attention is None
    assert seen.tokens == plain.tokens
    assert seen.scores == plain.scores  # exactly: the same floats, not approximately


def softmax_calls(fn) -> int:
    """How many softmax kernels (not log-softmax: the output layer's) `fn` runs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::softmax", "aten::_softmax"))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_attention_costs_nothing_when_not_asked(num_beams):
    """Without return_attention no weights are computed (SDPA's fused path only)."""
    model = tiny()
    grid = grids(model, 2)
    decode = lambda **kw: model.generate(grid=grid, num_beams=num_beams, max_length=6, **kw)  # noqa: E731
    assert softmax_calls(decode) == 0
    assert softmax_calls(lambda: decode(return_attention=True)) > 0  # the check can see them


def test_a_concat_model_has_no_attention_to_return():
    model = tiny("concat")
    grid = grids(model, 1)
    with pytest.raises(ValueError, match="fusion is 'concat'.*no attention over the image grid"):
        model.generate(grid=grid, return_attention=True)
    with pytest.raises(ValueError, match="fusion is 'concat'"):
        model.attention(grid, torch.tensor([[101, 1037]]))
