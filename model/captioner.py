"""Captioner: frozen CNN encoder + causal BERT decoder + fusion; training loss and decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .config import CaptionerConfig
from .decoder import KV, Decoder
from .encoders import ImageEncoder, pooled, preprocess


@dataclass
class Generation:
    """Decoded captions as token ids ([CLS]/[SEP] stripped) and their length-normalised log-prob."""

    tokens: list[list[int]]
    scores: list[float]


class LMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> the token embedding (tied) + bias."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h)))  # (B, T, H); logits: times the embedding


class Captioner(nn.Module):
    """Image -> caption tokens. `forward` gives (logits, loss); `generate` decodes."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = config
        self.encoder = ImageEncoder(config.encoder)
        self.decoder = Decoder(config)
        spec, hidden = self.encoder.spec, config.hidden_size
        self.image_proj = nn.Linear(spec.channels, hidden)
        if config.fusion == "cross_attention":
            # learned 2-D positions: the decoder can tell left from right and top from bottom
            self.row_emb = nn.Parameter(torch.zeros(spec.grid, hidden))
            self.col_emb = nn.Parameter(torch.zeros(spec.grid, hidden))
            self.image_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
            self.head = LMHead(config)
        else:  # concat: [decoder state; pooled image] -> vocab, as the original model did
            self.fuse = nn.Linear(2 * hidden, config.vocab_size)
        if config.output_vocab is not None:
            ids = torch.tensor(config.output_vocab)
            index = torch.full((config.vocab_size,), -100)  # vocab id -> output index
            index[ids] = torch.arange(len(ids))
            self.register_buffer("output_ids", ids)  # (V',)
            self.register_buffer("output_index", index)  # (V,)
        for name, module in self.named_children():
            if name != "encoder":
                module.apply(_init_bert)
        if config.fusion == "cross_attention":
            row, col = _sincos_2d(spec.grid, hidden)
            with torch.no_grad():
                self.row_emb.copy_(row)
                self.col_emb.copy_(col)

    # --- image side -----------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> this model's encoder input (3, S, S)."""
        return preprocess(image, self.config.encoder)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> frozen grid features (B, N, C)."""
        return self.encoder(pixels.to(self.image_proj.weight))

    def image_context(self, grid: torch.Tensor) -> torch.Tensor:
        """Grid features (B, N, C) -> what the decoder reads: memory (B, N, H) or pooled (B, H)."""
        grid = grid.to(self.image_proj.weight)
        if self.config.fusion == "concat":
            return self.image_proj(pooled(grid))  # (B, H)
        g = self.encoder.spec.grid
        pos = (self.row_emb[:, None, :] + self.col_emb[None, :, :]).reshape(g * g, -1)  # (N, H)
        return self.image_norm(self.image_proj(grid) + pos)  # (B, N, H)

    # --- text side ------------------------------------------------------------------------

    def _head_input(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Decoder states (B, T, H) -> what the output projection reads (B, T, D)."""
        if self.config.fusion == "concat":
            image = context[:, None, :].expand(-1, hidden.shape[1], -1)  # (B, T, H)
            return torch.cat([hidden, image], dim=-1)  # (B, T, 2H)
        return self.head(hidden)  # (B, T, H): BERT's head, tied to the token embedding

    def _output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The output projection over the output vocabulary: weight (V', D), bias (V',)."""
        if self.config.fusion == "concat":
            weight, bias = self.fuse.weight, self.fuse.bias
        else:
            weight, bias = self.decoder.tok_emb.weight, self.head.bias
        if self.config.output_vocab is not None:
            weight, bias = weight[self.output_ids], bias[self.output_ids]  # (V', *)
        return weight, bias

    def _logits(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Decoder states (B, T, H) -> logits over the output vocabulary (B, T, V')."""
        return F.linear(self._head_input(hidden, context), *self._output_layer())

    def _next_logits(
        self, hidden: torch.Tensor, context: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """The last position's logits (B, V') while decoding, from `_output_layer()`'s weights.

        Computed as (V', D) @ (D, B): for a few rows CPU BLAS runs this 2-5x faster than
        x @ W.T (nn.Linear's layout), and the LM head is most of a decoding step's work.
        """
        x = self._head_input(hidden[:, -1:], context)[:, 0]  # (B, D)
        return torch.addmm(bias[:, None], weight, x.T).T  # (B, V')

    def _token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Output-vocabulary index -> token id."""
        return self.output_ids[index] if self.config.output_vocab is not None else index

    def _cross(self, context: torch.Tensor) -> list[KV] | None:
        return self.decoder.cross_keys_values(context) if context.dim() == 3 else None

    def forward(
        self,
        grid: torch.Tensor,
        tokens: torch.Tensor,
        label_smoothing: float = 0.0,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing. grid (I, N, C), tokens (B, T) = [CLS] ... [SEP] [PAD]...

        `rows` (B,) says which image each caption describes (default: caption i, image i):
        several captions of one image share its projected memory, computed once.
        Returns logits (B, T-1, V') predicting tokens[:, 1:] (V' = the output vocabulary) and
        the mean loss over non-pad targets.
        """
        context = self.image_context(grid)  # (I, N, H) or (I, H)
        cross = self._cross(context)
        if rows is not None:
            context = context[rows]
            cross = [(k[rows], v[rows]) for k, v in cross] if cross else None  # (B, nh, N, hs)
        hidden, _ = self.decoder(tokens[:, :-1], cross=cross)  # (B, T-1, H)
        logits = self._logits(hidden, context)
        targets = tokens[:, 1:]  # shifted: position t predicts token t+1
        if self.config.output_vocab is not None:
            # -100 (ignored) for a token the model cannot emit: only padding, in practice
            targets = self.output_index[targets]
        targets = targets.masked_fill(tokens[:, 1:] == self.config.pad_id, -100)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=-100,
            label_smoothing=label_smoothing,
        )
        return logits, loss

    # --- decoding -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        pixels: torch.Tensor | None = None,
        *,
        grid: torch.Tensor | None = None,
        num_beams: int = 1,
        max_length: int | None = None,
        length_penalty: float = 1.0,
        use_cache: bool = True,
    ) -> Generation:
        """Caption a batch: pixels (B, 3, S, S) or precomputed grid features (B, N, C).

        The image is encoded once; with `use_cache` each step feeds only the newest token.
        `max_length` counts generated tokens including [SEP]; scores are summed log-probs
        divided by length ** length_penalty.
        """
        if (pixels is None) == (grid is None):
            raise ValueError("pass exactly one of pixels= or grid=")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        max_length = max_length or self.config.max_length
        if not 1 <= max_length < self.config.max_position:
            raise ValueError(
                f"max_length must be in [1, {self.config.max_position - 1}], got {max_length}"
            )
        if grid is None:
            grid = self.encode_image(pixels)
        context = self.image_context(grid)
        if num_beams == 1:
            return self._greedy(context, max_length, length_penalty, use_cache)
        return self._beam_search(context, num_beams, max_length, length_penalty, use_cache)

    def _stepper(self, context: torch.Tensor, use_cache: bool):
        """A function tokens (B, T) -> next-token log-probs (B, V'), and one that selects rows
        of the cache (and, with `image=True`, of the image memory too) for the next step."""
        weight, bias = self._output_layer()  # gathered once, not at every step
        state: dict[str, list[KV] | torch.Tensor | None] = {
            "past": None,
            "context": context,
            "cross": self._cross(context),
        }

        def step(tokens: torch.Tensor) -> torch.Tensor:
            new = tokens[:, -1:] if use_cache and state["past"] is not None else tokens
            hidden, past = self.decoder(
                new, cross=state["cross"], past=state["past"] if use_cache else None
            )
            state["past"] = past if use_cache else None
            logits = self._next_logits(hidden, state["context"], weight, bias)  # (B, V')
            return F.log_softmax(logits.float(), dim=-1)

        def select(rows: torch.Tensor, image: bool = False) -> None:
            if state["past"] is not None:
                state["past"] = [(k[rows], v[rows]) for k, v in state["past"]]
            if image:
                state["context"] = state["context"][rows]
                if state["cross"] is not None:
                    state["cross"] = [(k[rows], v[rows]) for k, v in state["cross"]]

        return step, select

    def _greedy(self, context, max_length, length_penalty, use_cache) -> Generation:
        B, device = context.shape[0], context.device
        cfg = self.config
        step, _ = self._stepper(context, use_cache)
        tokens = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        total = torch.zeros(B, device=device)
        length = torch.zeros(B, device=device)
        for _ in range(max_length):
            logp = step(tokens)  # (B, V')
            best = logp.argmax(dim=-1)  # (B,)
            total += torch.where(done, 0.0, logp.gather(1, best[:, None])[:, 0])
            length += (~done).float()
            best = torch.where(done, cfg.pad_id, self._token_ids(best))
            tokens = torch.cat([tokens, best[:, None]], dim=1)  # (B, T+1)
            done |= best == cfg.eos_id
            if done.all():
                break
        scores = total / length.clamp(min=1) ** length_penalty
        return Generation([self._strip(t) for t in tokens.tolist()], scores.tolist())

    def _beam_search(self, context, K, max_length, length_penalty, use_cache) -> Generation:
        """Batched beam search with transformers' default stopping rule: an image is done when
        K hypotheses have ended and no running beam, scored at its current length, beats the
        worst of them (stopping at the first K ended ones would drop better, longer captions).
        """
        B, device, cfg = context.shape[0], context.device, self.config
        # the first step runs one row per image (all its beams start identical); then beams of
        # image b are rows b*K .. b*K+K-1 of the cache and the image memory
        step, select = self._stepper(context, use_cache)
        tokens = torch.full((B * K, 1), cfg.bos_id, dtype=torch.long, device=device)
        beam_scores = torch.full((B, K), float("-inf"), device=device)
        beam_scores[:, 0] = 0.0  # all beams start identical: expand only the first
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        ids = self.output_ids.tolist() if cfg.output_vocab is not None else None
        done = [False] * B
        for t in range(max_length):
            # (B*K, V'); the first step decodes one row per image and copies it to its beams
            logp = step(tokens[::K]).repeat_interleave(K, dim=0) if t == 0 else step(tokens)
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
                        if token == cfg.eos_id or last:
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
                    next_tokens.append(cfg.pad_id)
                    next_scores.append(float("-inf"))
            if all(done):
                break
            rows_t = torch.tensor(rows, device=device)
            tokens = torch.cat(
                [tokens[rows_t], torch.tensor(next_tokens, device=device)[:, None]], dim=1
            )
            beam_scores = torch.tensor(next_scores, device=device).view(B, K)
            if t == 0:
                select(rows_t // K, image=True)  # (B rows) -> (B*K rows)
            else:
                select(rows_t)
        best = [max(hyps, key=lambda h: h[0]) for hyps in finished]
        return Generation([self._strip(seq) for _, seq in best], [score for score, _ in best])

    def _strip(self, ids: list[int]) -> list[int]:
        """Drop the leading [CLS]; cut at the first [SEP]."""
        if ids and ids[0] == self.config.bos_id:
            ids = ids[1:]
        return ids[: ids.index(self.config.eos_id)] if self.config.eos_id in ids else ids


def _sincos_2d(grid: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial row and column embeddings (grid, hidden): sin/cos of the row in the first half of
    the channels, of the column in the second (as MAE/DETR). Smooth in space, so "further left"
    is a direction the decoder can read from the start; both stay trainable."""
    quarter = hidden // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter) / quarter)  # (hidden/4,)
    angles = torch.arange(grid)[:, None] * freqs[None, :]  # (grid, hidden/4)
    waves = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, hidden/2)
    row = torch.zeros(grid, hidden)
    col = torch.zeros(grid, hidden)
    row[:, : waves.shape[1]] = waves
    col[:, waves.shape[1] : 2 * waves.shape[1]] = waves
    return row, col


def _init_bert(module: nn.Module) -> None:
    """BERT's initialisation for freshly created layers."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
