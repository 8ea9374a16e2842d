"""Captioner weights -> transformers' BERT: the reference the parity tests and bench/decode.py
compare against. Here, not in model/, because model/ ships in every .mar and serving never
needs it; bench/decode.py imports it as tests.helpers.hf_bert."""

from __future__ import annotations

import torch

from model import CaptionerConfig
from model.decoder import our_name


def to_hf_bert(state: dict[str, torch.Tensor], hf_names: list[str]) -> dict[str, torch.Tensor]:
    """Captioner weights under the given Hugging Face names (the inverse of `from_hf_bert`)."""
    out = {name: state[ours] for name in hf_names if (ours := our_name(name)) in state}
    for name in hf_names:
        if name.endswith("token_type_embeddings.weight"):  # folded into positions already
            out[name] = torch.zeros_like(state["decoder.pos_emb.weight"][:2])
        elif name == "cls.predictions.decoder.weight":  # tied to the token embedding
            out[name] = state["decoder.tok_emb.weight"]
        elif name == "cls.predictions.decoder.bias":
            out[name] = state["head.bias"]
    return out


def to_hf_bert_lm(config: CaptionerConfig, state: dict[str, torch.Tensor]):
    """A transformers BertLMHeadModel (decoder + cross-attention) holding these Captioner
    weights, in eval mode."""
    from transformers import BertConfig, BertLMHeadModel

    reference = BertLMHeadModel(
        BertConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_position,
            layer_norm_eps=config.layer_norm_eps,
            is_decoder=True,
            add_cross_attention=True,
        )
    )
    reference.load_state_dict(to_hf_bert(state, list(reference.state_dict())))  # strict: all
    return reference.eval()
