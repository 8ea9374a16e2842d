"""A BERT-layout transformer run as a causal decoder, with optional cross-attention.

Written out in plain PyTorch (post-LayerNorm BERT blocks) so the KV cache is ours to control;
`from_hf_bert` renames Hugging Face BERT checkpoints (bert-base-uncased, MiniLM) onto it
(`pretrained.load_pretrained` loads them), and the tests check logits against transformers'
BertLMHeadModel on the same weights.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .config import CaptionerConfig

# per layer: self-attention keys and values, each (B, nh, T, hs)
KV = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Multi-head attention + output projection + residual + LayerNorm (BERT's post-LN)."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = config.dropout

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, nh, T, hs)

    def keys_values(self, source: torch.Tensor) -> KV:
        return self.heads(self.key(source)), self.heads(self.value(source))

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries x (B, T, C) over keys/values (B, nh, S, hs) -> output (B, T, C), and with
        `need_weights` the attention weights (B, nh, T, S) (non-causal only: cross-attention).

        The output always comes from SDPA, whose fused kernels never materialise the weights;
        asked for, they are computed beside it (T x S per head: small), so the output is the
        same bits with or without them.
        """
        B, T, C = x.shape
        q = self.heads(self.query(x))  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        offset = k.shape[2] - T  # keys already in the cache before these T queries
        if causal and T > 1 and offset == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        elif causal and T > 1:  # a multi-token continuation: query i sees keys <= offset + i
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(offset)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:  # one new token attends to every cached key; cross-attention sees the whole image
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, nh, T, hs)
        weights = None
        if need_weights:
            if causal:
                raise ValueError("attention weights are computed for cross-attention only")
            scale = q.shape[-1] ** -0.5  # SDPA's default
            weights = (q.float() @ k.float().transpose(-2, -1) * scale).softmax(-1)  # (B, nh, T, S)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.norm(x + F.dropout(self.out(y), p, self.training)), weights


class DecoderLayer(nn.Module):
    """Causal self-attention -> cross-attention to the image (optional) -> feed-forward."""

    def __init__(self, config: CaptionerConfig, cross_attention: bool):
        super().__init__()
        self.self_attn = Attention(config)
        self.cross_attn = Attention(config) if cross_attention else None
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = config.dropout

    def forward(
        self, x: torch.Tensor, past: KV | None, cross: KV | None, need_weights: bool = False
    ) -> tuple[torch.Tensor, KV, torch.Tensor | None]:
        """x (B, T, H) -> (B, T, H), this layer's extended cache, and with `need_weights` its
        cross-attention weights over the image (B, nh, T, N)."""
        k, v = self.self_attn.keys_values(x)  # (B, nh, T, hs)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        x, _ = self.self_attn(x, k, v, causal=True)
        weights = None
        if self.cross_attn is not None:
            x, weights = self.cross_attn(x, *cross, causal=False, need_weights=need_weights)
        h = self.ffn_out(F.gelu(self.ffn_in(x)))
        x = self.ffn_norm(x + F.dropout(h, self.dropout, self.training))
        return x, (k, v), weights


class Decoder(nn.Module):
    """Token + position embeddings and a stack of causal BERT layers, each with cross-attention
    to the image where `cross_attention` (the fusion says: model.fusion)."""

    def __init__(self, config: CaptionerConfig, cross_attention: bool):
        super().__init__()
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        # BERT's token-type embedding (always type 0 here) is folded into these at load time
        self.pos_emb = nn.Embedding(config.max_position, config.hidden_size)
        self.emb_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(
            DecoderLayer(config, cross_attention) for _ in range(config.num_layers)
        )
        self.dropout = config.dropout

    def cross_keys_values(self, memory: torch.Tensor) -> list[KV]:
        """Project the image memory (B, N, H) into every layer's cross-attention keys/values once."""
        return [layer.cross_attn.keys_values(memory) for layer in self.layers]

    def forward(
        self,
        tokens: torch.Tensor,
        cross: list[KV] | None = None,
        past: list[KV] | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, list[KV], list[torch.Tensor] | None]:
        """tokens (B, T) continuing `past` -> hidden states (B, T, H), the extended cache, and
        with `need_weights` (cross-attention only) every layer's weights (B, nh, T, N)."""
        T = tokens.shape[1]
        start = past[0][0].shape[2] if past else 0
        positions = torch.arange(start, start + T, device=tokens.device)  # (T,)
        x = self.tok_emb(tokens) + self.pos_emb(positions)  # (B, T, H)
        x = F.dropout(self.emb_norm(x), self.dropout, self.training)
        cache, weights = [], []
        for i, layer in enumerate(self.layers):
            x, kv, w = layer(
                x, past[i] if past else None, cross[i] if cross else None, need_weights
            )
            cache.append(kv)
            weights.append(w)
        return x, cache, weights if need_weights and cross else None


# --- Hugging Face BERT weights ------------------------------------------------------------

# (Hugging Face name, our name) for BertModel / BertLMHeadModel / BertForMaskedLM checkpoints
_NAME_MAP = [
    (r"embeddings\.word_embeddings\.", "decoder.tok_emb."),
    (r"embeddings\.position_embeddings\.", "decoder.pos_emb."),
    (r"embeddings\.LayerNorm\.", "decoder.emb_norm."),
    (
        r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.",
        r"decoder.layers.\1.self_attn.\2.",
    ),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"decoder.layers.\1.self_attn.out."),
    (
        r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.",
        r"decoder.layers.\1.self_attn.norm.",
    ),
    (
        r"encoder\.layer\.(\d+)\.crossattention\.self\.(query|key|value)\.",
        r"decoder.layers.\1.cross_attn.\2.",
    ),
    (
        r"encoder\.layer\.(\d+)\.crossattention\.output\.dense\.",
        r"decoder.layers.\1.cross_attn.out.",
    ),
    (
        r"encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.",
        r"decoder.layers.\1.cross_attn.norm.",
    ),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"decoder.layers.\1.ffn_in."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"decoder.layers.\1.ffn_out."),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"decoder.layers.\1.ffn_norm."),
    (r"cls\.predictions\.transform\.dense\.", "head.dense."),
    (r"cls\.predictions\.transform\.LayerNorm\.", "head.norm."),
    (r"cls\.predictions\.bias", "head.bias"),
]


def our_name(hf_name: str) -> str | None:
    """Our parameter name for a Hugging Face BERT parameter name (None: not used here)."""
    name = re.sub(r"^bert\.", "", hf_name)
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
        "LayerNorm.beta", "LayerNorm.bias"
    )
    for pattern, replacement in _NAME_MAP:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def from_hf_bert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face BERT state dict to Captioner names; unused keys are dropped."""
    out = {ours: tensor for name, tensor in state.items() if (ours := our_name(name))}
    token_type = next(
        (t for n, t in state.items() if n.endswith("token_type_embeddings.weight")), None
    )
    if token_type is not None and "decoder.pos_emb.weight" in out:
        out["decoder.pos_emb.weight"] = out["decoder.pos_emb.weight"] + token_type[0]
    return out
