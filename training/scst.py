"""Self-critical sequence training (Rennie et al., CVPR 2017): the reward, the samples, the loss.

After cross-entropy the model is fine-tuned on captions it samples itself: K per image,
drawn token by token from its own distribution (the KV-cached decoding of `CaptionerState`),
each rewarded with CIDEr-D against the image's reference captions. A sample that scores above
its baseline (the greedy caption's reward: "classic"; the mean of the image's other samples:
"new", ruotianluo's variant) has its log-probability raised, one below lowered:
loss = -(reward - baseline) x sum of the sample's token log-probs.

`CiderD` is pycocoevalcap's CIDEr-D (sigma 6, clipped counts, 10x), with the document
frequencies computed once from a corpus (the training captions) instead of from the captions
being scored, and each reference's tf-idf vector computed once: a reward per sample costs one
vector and K dot products. It scores any sequences of hashable tokens; the stage gives it
WordPiece ids, so no text is decoded and no tokenizer runs.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F

from model import Captioner
from model.captioner import CaptionerState

Caption = Sequence[Hashable]
NGRAMS = 4
SIGMA = 6.0
BASELINES = ("greedy", "mean")


def _ngrams(caption: Caption) -> Counter:
    return Counter(
        tuple(caption[i : i + k]) for k in range(1, NGRAMS + 1) for i in range(len(caption) - k + 1)
    )


class CiderD:
    """CIDEr-D of captions against references, document frequencies from `corpus`.

    `corpus`: per image its reference captions. `score(caption, image)` scores against the
    references of corpus image `image`; `scores(candidates, references)` against any others
    with the corpus's frequencies (pycocoevalcap's Cider is this with corpus = references).
    """

    def __init__(self, corpus: Sequence[Sequence[Caption]]):
        df: Counter = Counter()
        for refs in corpus:
            df.update({g for ref in refs for g in _ngrams(ref)})
        self.df = df
        self.log_n = math.log(float(len(corpus)))
        self._refs = [[self._vector(ref) for ref in refs] for refs in corpus]

    def _vector(self, caption: Caption) -> tuple[dict, list[float], int]:
        """tf-idf weights per n-gram, the norm per n, the length (bigram count, as in coco)."""
        vec: dict = {}
        norm = [0.0] * NGRAMS
        length = 0
        for gram, tf in _ngrams(caption).items():
            w = tf * (self.log_n - math.log(max(1.0, self.df.get(gram, 0.0))))
            vec[gram] = w
            norm[len(gram) - 1] += w * w
            if len(gram) == 2:
                length += tf
        return vec, [math.sqrt(v) for v in norm], length

    def _score(self, caption: Caption, refs: list[tuple[dict, list[float], int]]) -> float:
        vec, norm, length = self._vector(caption)
        total = 0.0
        for ref_vec, ref_norm, ref_length in refs:
            val = [0.0] * NGRAMS
            for gram, w in vec.items():
                r = ref_vec.get(gram)
                if r is not None:
                    val[len(gram) - 1] += min(w, r) * r
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * SIGMA**2))
            for n in range(NGRAMS):
                if norm[n] != 0 and ref_norm[n] != 0:
                    val[n] /= norm[n] * ref_norm[n]
                total += val[n] * penalty
        return total / NGRAMS / max(1, len(refs)) * 10.0

    def score(self, caption: Caption, image: int) -> float:
        """CIDEr-D of `caption` against the references of corpus image `image`."""
        return self._score(caption, self._refs[image])

    def scores(
        self, candidates: Sequence[Caption], references: Sequence[Sequence[Caption]]
    ) -> list[float]:
        """CIDEr-D of candidates[i] against references[i]."""
        return [
            self._score(c, [self._vector(r) for r in refs])
            for c, refs in zip(candidates, references)
        ]


@torch.no_grad()
def sample(
    model: Captioner, context: torch.Tensor, k: int, max_length: int, generator=None
) -> torch.Tensor:
    """K captions per image drawn from the model: context (I, ...) -> tokens (I*K, T) =
    [CLS] ... [SEP] [PAD]..., image i's samples rows i*K .. i*K+K-1; a sample that reaches
    `max_length` generated tokens stops without [SEP]."""
    config = model.config
    state = CaptionerState(model, context.repeat_interleave(k, dim=0))  # KV cache on
    R, device = state.batch_size, state.device
    ids = model.output_ids if config.output_vocab is not None else None
    tokens = torch.full((R, 1), config.bos_id, dtype=torch.long, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    for _ in range(max_length):
        probs = state.log_probs(tokens).exp()  # (R, V')
        drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (R,)
        drawn = ids[drawn] if ids is not None else drawn
        drawn = torch.where(done, config.pad_id, drawn)
        tokens = torch.cat([tokens, drawn[:, None]], dim=1)  # (R, T+1)
        done |= drawn == config.eos_id
        if done.all():
            break
    return tokens


def words(tokens: torch.Tensor, bos: int, eos: int, pad: int) -> list[tuple[int, ...]]:
    """Sequences (R, T) as generated -> the caption of each: no [CLS], cut at [SEP] or [PAD]."""
    out = []
    for row in tokens.tolist():
        row = row[1:] if row and row[0] == bos else row
        end = next((i for i, t in enumerate(row) if t in (eos, pad)), len(row))
        out.append(tuple(row[:end]))
    return out


def baseline(rewards: torch.Tensor, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """rewards (I, K) -> each sample's baseline (I, K): the greedy caption's reward (I,), or,
    without one, the mean reward of the image's other K - 1 samples."""
    if greedy is not None:
        return greedy[:, None].expand_as(rewards)
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("the mean-of-others baseline needs finetune.samples >= 2")
    return (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def sample_log_probs(
    model: torch.nn.Module, grid: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's summed token log-prob (R,) under the model, with gradient, and the mean
    entropy of its next-token distributions (R,): grid (I, N, C), tokens (R, T), rows (R,)."""
    logits, nll = model(grid, tokens, rows=rows, reduction="none")  # (R, T-1, V'), (R*(T-1),)
    mask = (tokens[:, 1:] != model_config(model).pad_id).float()  # (R, T-1)
    logp = -nll.view(tokens.shape[0], -1)  # (R, T-1): 0 where ignored
    full = F.log_softmax(logits.float(), dim=-1)
    entropy = -(full.exp() * full).sum(-1)  # (R, T-1)
    return logp.sum(1), (entropy * mask).sum(1) / mask.sum(1).clamp(min=1)


def model_config(model: torch.nn.Module):
    """The Captioner's config, under DDP too."""
    return getattr(model, "module", model).config


def scst_loss(
    logp: torch.Tensor, advantage: torch.Tensor, entropy: torch.Tensor, entropy_weight: float
) -> torch.Tensor:
    """Summed over the samples: -(reward - baseline) x log p(sample) - w x entropy."""
    return -(advantage.detach() * logp).sum() - entropy_weight * entropy.sum()
