"""The fusions (model/fusion.py): one interface, and the checkpoint layout they must keep.

Checkpoints, optimizer states and seeded runs depend on the state-dict keys, the parameter
order and the order weights are initialised in; the digests below were taken before fusion was
a module of its own and must never change (a change breaks every saved checkpoint).
"""

import copy
import hashlib

import pytest
import torch

from model import PRESETS, Captioner, load_checkpoint, preset, save_checkpoint
from model.config import FUSIONS as FUSION_NAMES
from model.fusion import FUSIONS, ConcatFusion, CrossAttentionFusion
from tests.helpers.model import tiny


def layout_digest(model: Captioner) -> str:
    """sha256 of the state dict's keys, in order, with each tensor's shape and dtype."""
    text = "\n".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in model.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_digest(model: Captioner) -> str:
    """sha256 of every tensor's bytes, in state-dict order."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# taken from the code before fusion.py (commit 2b4834d), on the meta device; `default` is
# what params.yaml trained then: offline with num_layers 3
LAYOUTS = {
    "default": "f4810ed64ce89dd1",
    "seed": "02e37c74a5123715",
    "base": "823dd5c69d549c79",
    "offline": "ac3b12daa51dae9e",
    "tiny": "a3a03042b5c51b10",
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_keeps_its_state_dict_keys_and_order(name):
    with torch.device("meta"):
        model = Captioner(preset(name))
    assert layout_digest(model) == LAYOUTS[name]  # a new preset: add its digest here
    # what a reader can check by eye: the fusion's own keys, where they always were
    params = [n for n, _ in model.named_parameters()]
    if model.config.fusion == "cross_attention":
        assert params[:2] == ["row_emb", "col_emb"]  # the Captioner's own, before any layer
        tail = ["image_norm.weight", "image_norm.bias", "head.bias", "head.dense.weight"]
        tail += ["head.dense.bias", "head.norm.weight", "head.norm.bias"]
    else:
        tail = ["fuse.weight", "fuse.bias"]
    assert params[-len(tail) :] == tail
    assert params[-len(tail) - 2 - 2 * (model.config.projector == "mlp")] == "image_proj.weight"


# seeded tiny models, taken before fusion.py: the same weights from the same seed
SEEDED = {
    ("concat", "linear"): "94cd1ac03c00fe6a",
    ("concat", "mlp"): "d247007be89315ad",
    ("cross_attention", "linear"): "34a6cd125f0a3306",
    ("cross_attention", "mlp"): "b7dcc669ce4869c8",
}


@pytest.mark.parametrize("fusion, projector", sorted(SEEDED))
def test_a_seed_gives_the_weights_it_always_gave(fusion, projector):
    torch.manual_seed(0)
    model = Captioner(preset("tiny", fusion=fusion, projector=projector))
    assert weights_digest(model) == SEEDED[fusion, projector]


def test_every_configured_fusion_has_its_module():
    assert tuple(FUSIONS) == FUSION_NAMES
    assert isinstance(tiny("concat").fusion, ConcatFusion)
    assert isinstance(tiny("cross_attention").fusion, CrossAttentionFusion)


@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_the_fusion_holds_the_very_tensors_the_captioner_saves(tmp_path, fusion):
    """Its layers are registered on the Captioner, not under a `fusion.` prefix: loading
    (assign=True: new tensors), copying, converting and train/eval must reach both."""
    model = tiny(fusion)
    assert not any(k.startswith("fusion.") for k in model.state_dict())
    assert set(model.fusion.state_dict()) < set(model.state_dict())

    def shared(m: Captioner) -> bool:
        own = dict(m.named_parameters())
        return all(p is own[n] for n, p in m.fusion.named_parameters())

    save_checkpoint(model, tmp_path / "model.pth")
    loaded = load_checkpoint(tmp_path / "model.pth")  # built on meta, loaded with assign=True
    copied = copy.deepcopy(loaded).double()
    for m in (model, loaded, copied):
        assert shared(m)
    assert all(p.dtype == torch.float64 for p in copied.fusion.parameters())
    assert not loaded.fusion.training and loaded.train().fusion.training

    grid = torch.randn(2, 16, 48)  # the tiny encoder's (B, N, C)
    torch.testing.assert_close(
        loaded.image_context(grid), model.image_context(grid), rtol=0, atol=0
    )
