"""Greedy and beam search over a `DecodeState`: the search never sees the model.

What a step costs and what is cached (KV cache, image memory, output layer) belongs to the
state (`captioner.CaptionerState`); the search only asks for next-token log-probs and says
which rows continue. A test substitutes a state that reads log-probs from a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .config import CaptionerConfig


@dataclass
class Generation:
    """Decoded captions as token ids ([CLS]/[SEP] stripped) and their length-normalised log-prob."""

    tokens: list[list[int]]
    scores: list[float]


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
    state: DecodeState, config: CaptionerConfig, max_length: int, length_penalty: float = 1.0
) -> Generation:
    """The most likely token at every step, the whole batch at once, until all rows end."""
    B, device = state.batch_size, state.device
    output_ids = _output_ids(config, device)
    tokens = torch.full((B, 1), config.bos_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    total = torch.zeros(B, device=device)
    length = torch.zeros(B, device=device)
    for _ in range(max_length):
        logp = state.log_probs(tokens)  # (B, V')
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
) -> Generation:
    """Batched beam search with transformers' default stopping rule: an image is done when
    K hypotheses have ended and no running beam, scored at its current length, beats the
    worst of them (stopping at the first K ended ones would drop better, longer captions).
    """
    B, K, device = state.batch_size, num_beams, state.device
    # the first step runs one row per image (all its beams start identical); then beams of
    # image b are rows b*K .. b*K+K-1 of the state
    tokens = torch.full((B * K, 1), config.bos_id, dtype=torch.long, device=device)
    beam_scores = torch.full((B, K), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    ids = config.output_vocab
    done = [False] * B
    for t in range(max_length):
        if t == 0:  # one row per image, copied to its K beams
            logp = state.log_probs(tokens[::K]).repeat_interleave(K, dim=0)  # (B*K, V')
        else:
            logp = state.log_probs(tokens)  # (B*K, V')
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
                            seq = tokens[b * K + beam, 1:].tolist() + [token]
                            finished[b].append((score / (t + 1) ** length_penalty, seq))
                        continue
                    rows.append(b * K + beam)
                    next_tokens.append(token)
                    next_scores.append(score)
                    best_running = max(best_running, score)
                    kept += 1
                finished[b] = sorted(finished[b], key=lambda h: h[0], reverse=True)[:K]
                bound = best_running / (t + 1) ** length_penalty
                full = len(finished[b]) == K
                done[b] = last or kept == 0 or (full and finished[b][-1][0] >= bound)
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
    best = [max(hyps, key=lambda h: h[0]) for hyps in finished]
    return Generation([strip(seq, config) for _, seq in best], [score for score, _ in best])


def strip(ids: list[int], config: CaptionerConfig) -> list[int]:
    """Drop the leading [CLS]; cut at the first [SEP]."""
    if ids and ids[0] == config.bos_id:
        ids = ids[1:]
    return ids[: ids.index(config.eos_id)] if config.eos_id in ids else ids


def _output_ids(config: CaptionerConfig, device: torch.device) -> torch.Tensor | None:
    """The token id of each log-prob column (V',); None: the column is the id."""
    if config.output_vocab is None:
        return None
    return torch.tensor(config.output_vocab, device=device)
