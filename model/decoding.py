"""Greedy and beam search over a `DecodeState`: the search never sees the model.

What a step costs and what is cached (KV cache, image memory, output layer) belongs to the
state (`captioner.CaptionerState`); the search only asks for next-token log-probs and says
which rows continue. A test substitutes a state that reads log-probs from a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from .config import CaptionerConfig


@dataclass
class Generation:
    """Decoded captions as token ids ([CLS]/[SEP] stripped) and their length-normalised log-prob;
    asked for (`Captioner.generate`, after the search), per image the relevance of the image
    grid to each token: (len(tokens[i]), N) float32 on the CPU, row t for tokens[i][t]."""

    tokens: list[list[int]]
    scores: list[float]
    attention: list[torch.Tensor] | None = None


class DecodeState(Protocol):
    """A batch being decoded, one row per hypothesis.

    Rows start as one per image. Beam search runs its first step on those, then widens them
    to K per image with `select(rows, image=True)` and reorders them with every later `select`.
    """

    batch_size: int  # images in the batch
    device: torch.device

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prefixes (R, T), [CLS] first -> next-token log-probs (R, V'): column j is token
        `config.output_vocab[j]`, or token j when the config has no output vocabulary."""
        ...

    def select(self, rows: torch.Tensor, image: bool = False) -> None:
        """Row i continues row rows[i] (R',); `image`: per-image state is widened too."""
        ...


def greedy(
    state: DecodeState,
    config: CaptionerConfig,
    max_length: int,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> Generation:
    """The most likely token at every step, the whole batch at once, until all rows end.
    `no_repeat_ngram_size` n > 0: no n-gram occurs twice in a sequence (`banned_ngrams`)."""
    B, device = state.batch_size, state.device
    output_ids = _output_ids(config, device)
    tokens = torch.full((B, 1), config.bos_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    total = torch.zeros(B, device=device)
    length = torch.zeros(B, device=device)
    for _ in range(max_length):
        logp = state.log_probs(tokens)  # (B, V')
        logp = _ban(logp, tokens, no_repeat_ngram_size, config, output_ids)
        best = logp.argmax(dim=-1)  # (B,)
        total += torch.where(done, 0.0, logp.gather(1, best[:, None])[:, 0])
        length += (~done).float()
        best = output_ids[best] if output_ids is not None else best
        best = torch.where(done, config.pad_id, best)
        tokens = torch.cat([tokens, best[:, None]], dim=1)  # (B, T+1)
        done |= best == config.eos_id
        if done.all():
            break
    scores = total / length.clamp(min=1) ** length_penalty
    return Generation([strip(t, config) for t in tokens.tolist()], scores.tolist())


def beam_search(
    state: DecodeState,
    config: CaptionerConfig,
    num_beams: int,
    max_length: int,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> Generation:
    """Batched beam search with transformers' default stopping rule: an image is done when
    K hypotheses have ended and no running beam, scored at its current length, beats the
    worst of them (stopping at the first K ended ones would drop better, longer captions).
    `no_repeat_ngram_size` n > 0: no n-gram occurs twice in a hypothesis (`banned_ngrams`).
    """
    B, K, device = state.batch_size, num_beams, state.device
    # the first step runs one row per image (all its beams start identical); then beams of
    # image b are rows b*K .. b*K+K-1 of the state
    tokens = torch.full((B * K, 1), config.bos_id, dtype=torch.long, device=device)
    beam_scores = torch.full((B, K), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished: list[list[_Ended]] = [[] for _ in range(B)]
    ids = config.output_vocab
    output_ids = _output_ids(config, device)
    done = [False] * B
    for t in range(max_length):
        if t == 0:  # one row per image, copied to its K beams
            logp = state.log_probs(tokens[::K]).repeat_interleave(K, dim=0)  # (B*K, V')
        else:
            logp = state.log_probs(tokens)  # (B*K, V')
        logp = _ban(logp, tokens, no_repeat_ngram_size, config, output_ids)
        V = logp.shape[1]
        candidates = (beam_scores.view(-1, 1) + logp).view(B, K * V)  # (B, K*V)
        top_scores, top_ids = candidates.topk(min(2 * K, K * V), dim=1)  # (B, 2K)
        last = t == max_length - 1
        rows, next_tokens, next_scores = [], [], []
        for b, (scores_b, ids_b) in enumerate(zip(top_scores.tolist(), top_ids.tolist())):
            kept, best_running = 0, float("-inf")
            if not done[b]:
                for rank, (score, idx) in enumerate(zip(scores_b, ids_b)):
                    if score == float("-inf") or kept == K:
                        break
                    beam, token = divmod(idx, V)
                    token = ids[token] if ids is not None else token
                    if token == config.eos_id or last:
                        if rank < K:  # as in HF: a finished hypothesis must rank in the top K
                            row = b * K + beam
                            seq = tokens[row].tolist() + [token]  # [CLS] ... token
                            normed = score / (t + 1) ** length_penalty
                            finished[b].append(_Ended(normed, seq))
                        continue
                    rows.append(b * K + beam)
                    next_tokens.append(token)
                    next_scores.append(score)
                    best_running = max(best_running, score)
                    kept += 1
                finished[b] = sorted(finished[b], key=lambda h: h.score, reverse=True)[:K]
                bound = best_running / (t + 1) ** length_penalty
                full = len(finished[b]) == K
                done[b] = last or kept == 0 or (full and finished[b][-1].score >= bound)
            for _ in range(K - kept):  # padding beams that can never win
                rows.append(b * K)
                next_tokens.append(config.pad_id)
                next_scores.append(float("-inf"))
        if all(done):
            break
        rows_t = torch.tensor(rows, device=device)  # (B*K,) the row each new beam continues
        tokens = torch.cat(
            [tokens[rows_t], torch.tensor(next_tokens, device=device)[:, None]], dim=1
        )  # (B*K, T+1)
        beam_scores = torch.tensor(next_scores, device=device).view(B, K)
        if t == 0:
            state.select(rows_t // K, image=True)  # (B rows) -> (B*K rows)
        else:
            state.select(rows_t)
    best = [max(hyps, key=lambda h: h.score) for hyps in finished]
    return Generation([strip(h.seq, config) for h in best], [h.score for h in best])


class _Ended(NamedTuple):
    """A finished beam hypothesis: its score and tokens."""

    score: float
    seq: list[int]


def banned_ngrams(tokens: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """Prefixes (R, T) -> (R, vocab_size) True for each token that would complete an n-gram
    already in its row (transformers' `no_repeat_ngram_size`: the whole prefix, [CLS] included).

    Vectorised over rows and positions: every n-gram of the prefix whose first n - 1 tokens
    equal the prefix's last n - 1 bans its last token.
    """
    R, T = tokens.shape
    banned = torch.zeros(R, vocab_size, dtype=torch.bool, device=tokens.device)
    if n < 1 or n > T:
        return banned
    grams = tokens.unfold(1, n, 1)  # (R, T - n + 1, n): every n-gram so far
    tail = tokens[:, T - n + 1 :]  # (R, n - 1): what the next token would complete
    match = (grams[:, :, :-1] == tail[:, None, :]).all(dim=-1)  # (R, T - n + 1)
    hits = torch.zeros(R, vocab_size, device=tokens.device)
    hits.scatter_add_(1, grams[:, :, -1], match.float())  # (R, V): matching n-grams per last token
    return hits > 0


def _ban(
    logp: torch.Tensor,
    tokens: torch.Tensor,
    n: int,
    config: CaptionerConfig,
    output_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Log-probs (R, V') with every token that would repeat an n-gram at -inf; n = 0: as is."""
    if n < 1 or tokens.shape[1] < n:
        return logp
    banned = banned_ngrams(tokens, n, config.vocab_size)  # (R, V)
    if output_ids is not None:
        banned = banned[:, output_ids]  # (R, V'): column j is token output_ids[j]
    return logp.masked_fill(banned, float("-inf"))


def strip(ids: list[int], config: CaptionerConfig) -> list[int]:
    """A sequence as generated ([CLS] first) -> its caption: no [CLS], cut at the first [SEP].
    Only the [CLS] that starts it goes: a model may generate one too (full output vocabulary)."""
    ids = ids[1:]
    return ids[: ids.index(config.eos_id)] if config.eos_id in ids else ids


def _output_ids(config: CaptionerConfig, device: torch.device) -> torch.Tensor | None:
    """The token id of each log-prob column (V',); None: the column is the id."""
    if config.output_vocab is None:
        return None
    return torch.tensor(config.output_vocab, device=device)
