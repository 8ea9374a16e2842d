"""How the image reaches the words: the two fusions behind the one interface Captioner calls.

- `concat`, the original brief's: the pooled grid, projected (2048 ->) hidden, is repeated along
  the sequence and concatenated with the decoder's states; one linear layer maps [state; image]
  to the vocabulary. The decoder reads no image.
- `cross_attention`, the default: every decoder layer cross-attends to the projected grid, which
  carries learned 2-D positions (so "left of" can be seen); logits come from BERT's prediction
  head, tied to the token embedding.

A fusion's layers and parameters are registered on the Captioner itself, under the names they
have here (`Captioner._adopt`): checkpoints keep the keys they had before fusion was a module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CaptionerConfig
from .decoder import KV, Decoder
from .encoders import EncoderSpec, pooled


class Fusion(nn.Module):
    """The interface: the image context (`context`), what the decoder is given
    (`cross_keys_values`) and how its states become logits (`head_input`, `output_layer`).

    Both fusions project the grid's cells (or their mean) to the decoder's width the same way:
    `image_proj`, then `image_mlp` (GELU -> linear) with `projector: mlp`.
    """

    cross_attention: bool  # the decoder's layers cross-attend to the context (Decoder is built so)

    def __init__(self, config: CaptionerConfig, spec: EncoderSpec):
        super().__init__()
        hidden = config.hidden_size
        self.image_proj = nn.Linear(spec.channels, hidden)
        self.image_mlp = (
            nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden))
            if config.projector == "mlp"
            else nn.Identity()
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Image features (..., C) -> the decoder's width (..., H)."""
        return self.image_mlp(self.image_proj(features))

    def context(self, grid: torch.Tensor) -> torch.Tensor:
        """Grid features (B, N, C) -> the image as the decoder or the head reads it."""
        raise NotImplementedError

    def cross_keys_values(self, context: torch.Tensor, decoder: Decoder) -> list[KV] | None:
        """Every decoder layer's cross-attention keys/values of the context, computed once per
        image; None: the decoder reads no image."""
        raise NotImplementedError

    def head_input(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Decoder states (B, T, H) -> what the output layer reads (B, T, D)."""
        raise NotImplementedError

    def output_layer(self, token_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output layer over the full vocabulary, weight (V, D) and bias (V,), given the
        decoder's token embedding (V, H)."""
        raise NotImplementedError


class ConcatFusion(Fusion):
    """[decoder state; pooled image] -> vocabulary, as the original model did."""

    cross_attention = False

    def __init__(self, config: CaptionerConfig, spec: EncoderSpec):
        super().__init__(config, spec)
        self.fuse = nn.Linear(2 * config.hidden_size, config.vocab_size)

    def context(self, grid: torch.Tensor) -> torch.Tensor:
        return self.project(pooled(grid))  # (B, H)

    def cross_keys_values(self, context: torch.Tensor, decoder: Decoder) -> None:
        return None  # the image enters at the output layer only

    def head_input(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        image = context[:, None, :].expand(-1, hidden.shape[1], -1)  # (B, T, H)
        return torch.cat([hidden, image], dim=-1)  # (B, T, 2H)

    def output_layer(self, token_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fuse.weight, self.fuse.bias  # (V, 2H), (V,)


class CrossAttentionFusion(Fusion):
    """The decoder cross-attends to the projected grid plus learned 2-D positions; BERT's
    prediction head, tied to the token embedding, gives the logits."""

    cross_attention = True

    def __init__(self, config: CaptionerConfig, spec: EncoderSpec):
        super().__init__(config, spec)
        hidden = config.hidden_size
        # learned 2-D positions: the decoder can tell left from right and top from bottom
        row, col = _sincos_2d(spec.grid, hidden)
        self.row_emb = nn.Parameter(row)  # (g, H)
        self.col_emb = nn.Parameter(col)  # (g, H)
        self.image_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.head = LMHead(config)

    def context(self, grid: torch.Tensor) -> torch.Tensor:
        g = self.row_emb.shape[0]
        pos = (self.row_emb[:, None, :] + self.col_emb[None, :, :]).reshape(g * g, -1)  # (N, H)
        return self.image_norm(self.project(grid) + pos)  # (B, N, H)

    def cross_keys_values(self, context: torch.Tensor, decoder: Decoder) -> list[KV]:
        return decoder.cross_keys_values(context)  # per layer (B, nh, N, hs)

    def head_input(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)  # (B, T, H)

    def output_layer(self, token_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return token_embedding, self.head.bias  # (V, H), (V,): tied


class LMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> the token embedding (tied) + bias."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h)))  # (B, T, H); logits: times the embedding


# config.fusion -> its module
FUSIONS: dict[str, type[Fusion]] = {
    "concat": ConcatFusion,
    "cross_attention": CrossAttentionFusion,
}


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
