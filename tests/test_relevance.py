"""Relevance maps (Chefer et al. 2021, model/relevance.py): a distribution over the grid per
token, unchanged by padding after the caption, and what `generate` and the caption API return
as attention (the handler and the CLI answer with it: tests/test_caption_api.py)."""

import pytest
import torch

from model.relevance import relevance
from tests.helpers.model import tiny
from tests.test_attention import MAX_LENGTH, SMALL, grids, scrambled


@pytest.mark.parametrize("output_vocab", [None, [2, 4, 5, 6, 7]], ids=["full", "dataset"])
def test_relevance_is_a_distribution_over_the_grid_per_token(output_vocab):
    model = scrambled(tiny(**SMALL, output_vocab=output_vocab))
    grid = grids(model, 3)
    tokens = torch.tensor([[1, 4, 5, 6, 2], [1, 6, 6, 4, 7], [1, 5, 7, 2, 0]])  # (B, T+1)
    r = relevance(model, grid, tokens)
    assert r.shape == (3, 4, grid.shape[1])  # (B, T, N)
    assert (r >= 0).all()
    torch.testing.assert_close(r.sum(-1), torch.ones(3, 4))
    # not the uniform fallback: the gradients single out some cells
    assert (r.amax(-1) > 2 / grid.shape[1]).all()


def test_padding_after_a_caption_leaves_its_relevance_alone():
    """Causal: a caption's rows are the same alone and padded in a batch with a longer one."""
    model = scrambled(tiny(**SMALL))
    grid = grids(model, 2)
    short = torch.tensor([[1, 4, 5]])
    batch = torch.tensor([[1, 4, 5, 0, 0], [1, 6, 7, 4, 2]])
    alone = relevance(model, grid[:1], short)[0]  # (2, N)
    padded = relevance(model, grid, batch)[0, :2]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_returns_the_relevance_of_the_chosen_tokens(num_beams):
    model = scrambled(tiny(**SMALL))
    grid = grids(model, 5)
    out = model.generate(
        grid=grid, num_beams=num_beams, max_length=MAX_LENGTH, return_attention=True
    )
    for i, (ids, maps) in enumerate(zip(out.tokens, out.attention, strict=True)):
        expected = relevance(model, grid[i : i + 1], torch.tensor([[1, *ids]]))[0]
        assert maps.shape == (len(ids), grid.shape[1])
        torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-4)
