"""Decoding: KV cache parity, greedy vs beam, beam search vs exhaustive search (with and
without the no-repeat n-gram rule), batching."""

import itertools
import math

import pytest
import torch

from model import Captioner, CaptionerConfig, preset
from model.captioner import CaptionerState
from model.decoding import banned_ngrams, beam_search, greedy
from tests.helpers.model import tiny


def grids(model: Captioner, batch: int) -> torch.Tensor:
    spec = model.encoder.spec
    return torch.randn(batch, spec.grid**2, spec.channels) * 3  # (B, N, C)


# a dataset vocabulary: the model may only emit these ids ([SEP] = 102 among them)
OUTPUT_VOCAB = [102, 1037, 2417, 2630, 4418, 2675, 7117, 2187, 2157, 1997]


@pytest.mark.parametrize("output_vocab", [None, OUTPUT_VOCAB], ids=["full-vocab", "dataset-vocab"])
@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_decoding_equals_uncached(fusion, num_beams, output_vocab):
    model = tiny(fusion, output_vocab=output_vocab)
    grid = grids(model, 5)
    cached = model.generate(grid=grid, num_beams=num_beams, max_length=12)
    uncached = model.generate(grid=grid, num_beams=num_beams, max_length=12, use_cache=False)
    assert cached.tokens == uncached.tokens
    assert cached.scores == pytest.approx(uncached.scores, abs=1e-4)
    if output_vocab:
        assert {t for seq in cached.tokens for t in seq} <= set(output_vocab)


def test_dataset_vocabulary_restricts_the_softmax():
    full = tiny()
    restricted = tiny(output_vocab=OUTPUT_VOCAB)
    restricted.load_state_dict(full.state_dict(), strict=False)  # same weights, plus buffers
    grid = grids(full, 2)
    tokens = torch.tensor([[101, 1037, 2417, 4418, 102, 0], [101, 1037, 2630, 2675, 1997, 102]])
    full_logits, _ = full(grid, tokens)
    logits, loss = restricted(grid, tokens)
    assert logits.shape == (2, 5, len(OUTPUT_VOCAB))
    torch.testing.assert_close(logits, full_logits[..., OUTPUT_VOCAB])  # a slice, not new math
    targets = torch.tensor([OUTPUT_VOCAB.index(t) for t in (1037, 2417, 4418, 102)])
    expected = torch.nn.functional.cross_entropy(logits[0, :4], targets, reduction="sum")
    expected += torch.nn.functional.cross_entropy(
        logits[1],
        torch.tensor([OUTPUT_VOCAB.index(t) for t in (1037, 2630, 2675, 1997, 102)]),
        reduction="sum",
    )
    torch.testing.assert_close(loss, expected / 9)  # pad ignored: 4 + 5 targets


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_beam_search_with_one_beam_is_greedy(fusion):
    model = tiny(fusion)
    context = model.image_context(grids(model, 6))
    with torch.no_grad():
        best = greedy(CaptionerState(model, context), model.config, 12, 1.0)
        beam = beam_search(CaptionerState(model, context), model.config, 1, 12, 1.0)
    assert beam.tokens == best.tokens
    assert beam.scores == pytest.approx(best.scores, abs=1e-4)


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


def repeats_an_ngram(seq, n: int) -> bool:
    """Does an n-gram occur twice in `seq` (n = 0: the rule is off)?"""
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)] if n else []
    return len(grams) != len(set(grams))


def exhaustive_best(model, grid, vocab, max_length, length_penalty, no_repeat=0):
    """Score every sequence ending in [SEP] (or cut at max_length) under the model; with
    `no_repeat` n, only those where no n-gram of [CLS] + sequence occurs twice."""
    eos, bos = model.config.eos_id, model.config.bos_id
    ids = list(vocab)
    best = (-math.inf, None)
    for length in range(1, max_length + 1):
        for seq in itertools.product(ids, repeat=length):
            if eos in seq[:-1] or (length < max_length and seq[-1] != eos):
                continue  # only [SEP]-terminated prefixes, or full-length sequences
            if repeats_an_ngram((bos, *seq), no_repeat):
                continue
            tokens = torch.tensor([[bos, *seq]])
            logits, _ = model(grid, torch.cat([tokens, tokens[:, :1]], dim=1))
            logp = logits[0].log_softmax(-1)  # (T, V)
            total = sum(logp[t, ids.index(tok)].item() for t, tok in enumerate(seq))
            score = total / length**length_penalty
            if score > best[0]:
                best = (score, [t for t in seq if t != eos])
    return best


@pytest.mark.parametrize("no_repeat", [0, 1, 2], ids=["no-rule", "no-repeat-1", "no-repeat-2"])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
@pytest.mark.parametrize("output_vocab", [None, [2, 3, 4]], ids=["full-vocab", "dataset-vocab"])
def test_wide_beam_search_finds_the_exhaustive_optimum(
    fusion, length_penalty, output_vocab, no_repeat
):
    vocab, max_length = 5, 3
    model = tiny(fusion, vocab_size=vocab, pad_id=0, bos_id=1, eos_id=2, output_vocab=output_vocab)
    grid = grids(model, 1)
    # wide enough to keep every prefix: beam search becomes exhaustive and must agree
    out = model.generate(
        grid=grid,
        num_beams=vocab**max_length,
        max_length=max_length,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat,
    )
    score, seq = exhaustive_best(
        model, grid, output_vocab or range(vocab), max_length, length_penalty, no_repeat
    )
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


class TableState:
    """A DecodeState without a model: next-token log-probs looked up by prefix in a table."""

    batch_size, device = 1, torch.device("cpu")

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]], config: CaptionerConfig):
        self.table, self.config = table, config

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        logp = torch.full((tokens.shape[0], self.config.vocab_size), -9.0)
        for row, seq in enumerate(tokens[:, 1:].tolist()):
            for token, value in self.table.get(tuple(seq), {self.config.eos_id: -0.01}).items():
                logp[row, token] = value
        return logp

    def select(self, rows: torch.Tensor, image: bool = False) -> None:
        pass  # the prefix is the whole state


def test_beam_search_keeps_going_while_a_running_beam_can_still_win():
    """Two short hypotheses end early and score badly; the best caption is still running.

    Stopping at the first K ended hypotheses would return "b"; the right answer is "a a a".
    """
    config = preset("tiny", vocab_size=6, pad_id=0, bos_id=1, eos_id=2)
    A, B, C, E = 3, 4, 5, 2
    table = {
        (): {A: -0.01, B: -0.1, E: -6.0},
        (A,): {A: -0.001, E: -4.0},
        (B,): {E: -0.5, C: -3.0},
        (A, A): {A: -0.001, E: -5.0},
        (B, C): {E: -0.01},
        (A, A, A): {E: -0.001},
    }
    out = beam_search(TableState(table, config), config, num_beams=2, max_length=6)
    assert out.tokens == [[A, A, A]]
    assert out.scores[0] == pytest.approx(-0.013 / 4)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_generated_cls_stays_in_the_caption(num_beams):
    """[CLS] is an ordinary output of a full-vocabulary model: generated first, it is the
    caption's first token (beam search once dropped it, returning tokens it never scored)."""
    config = preset("tiny", vocab_size=6, pad_id=0, bos_id=1, eos_id=2)
    CLS, A, E = 1, 3, 2
    table = {(): {CLS: -0.01, A: -3.0}, (CLS,): {A: -0.01}, (CLS, A): {E: -0.01}}
    state = TableState(table, config)
    if num_beams == 1:
        out = greedy(state, config, max_length=6)
    else:
        out = beam_search(state, config, num_beams=num_beams, max_length=6)
    assert out.tokens == [[CLS, A]]


def test_banned_ngrams_bans_what_would_complete_a_seen_ngram():
    tokens = torch.tensor([[1, 5, 6, 7, 5, 6], [1, 5, 6, 7, 5, 7]])
    banned = banned_ngrams(tokens, 3, 10)  # row 0 ends "5 6": "5 6 7" was seen -> 7 banned
    assert banned[0].nonzero().flatten().tolist() == [7]
    assert banned[1].nonzero().flatten().tolist() == []  # "5 7" was never followed
    assert banned_ngrams(tokens, 1, 10)[0].nonzero().flatten().tolist() == [1, 5, 6, 7]
    assert not banned_ngrams(tokens, 7, 10).any()  # longer than the prefix: nothing to repeat


@pytest.mark.parametrize("no_repeat", [1, 2, 3])
@pytest.mark.parametrize("output_vocab", [None, [2, 3, 4, 5]], ids=["full-vocab", "dataset-vocab"])
def test_greedy_takes_the_best_token_no_ngram_rule_forbids(no_repeat, output_vocab):
    """Greedy with the rule = step by step, the most likely token whose n-gram is new; a
    scrambled model over 6 ids loops without it, so the rule has to act."""
    model = tiny(vocab_size=6, pad_id=0, bos_id=1, eos_id=2, output_vocab=output_vocab)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("encoder") and p.dim() == 2:
                p.normal_(0, 0.5)
    grid = grids(model, 4)
    ids = output_vocab or list(range(6))
    out = model.generate(grid=grid, num_beams=1, max_length=8, no_repeat_ngram_size=no_repeat)
    looped = model.generate(grid=grid, num_beams=1, max_length=8, no_repeat_ngram_size=0)
    assert any(repeats_an_ngram([1, *seq], no_repeat) for seq in looped.tokens)
    for i, caption in enumerate(out.tokens):
        seq = [1]
        for _ in range(8):
            tokens = torch.tensor([seq + [0]])
            logits, _ = model(grid[i : i + 1], tokens)
            order = logits[0, -1].argsort(descending=True).tolist()
            token = next(ids[j] for j in order if not repeats_an_ngram([*seq, ids[j]], no_repeat))
            seq.append(token)
            if token == 2:
                break
        assert caption == [t for t in seq[1:] if t != 2]
        assert not repeats_an_ngram([1, *caption], no_repeat)
