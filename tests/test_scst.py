"""Self-critical sequence training: CIDEr-D as pycocoevalcap computes it, the sign of the
gradient, a tiny run whose reward rises, resuming after a kill, and the stage switched off."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from tests.helpers.model import tiny
from tests.helpers.project import workspace_after_define
from training import scst
from training.stages.finetune import FinetuneConfig, finetune
from training.stages.train import TrainConfig, train

WORDS = ["a", "the", "red", "blue", "square", "circle", "left", "right", "of", "above", "big"]


def test_cider_d_equals_pycocoevalcap_on_the_same_captions():
    from pycocoevalcap.cider.cider import Cider

    rng = random.Random(0)
    refs = {
        i: [" ".join(rng.choices(WORDS, k=rng.randint(1, 14))) for _ in range(rng.randint(1, 5))]
        for i in range(60)
    }
    cands = {i: [" ".join(rng.choices(WORDS, k=rng.randint(0, 14)))] for i in range(60)}
    cands[0] = [refs[0][0]]  # a caption that is one of its references
    mean, expected = Cider().compute_score(refs, cands)

    cider = scst.CiderD([[r.split() for r in refs[i]] for i in range(60)])
    mine = [cider.score(cands[i][0].split(), i) for i in range(60)]
    assert mine == pytest.approx(list(expected), abs=1e-6)
    again = cider.scores(
        [cands[i][0].split() for i in range(60)], [cider_refs(refs[i]) for i in range(60)]
    )
    assert again == pytest.approx(list(expected), abs=1e-6)
    assert sum(mine) / 60 == pytest.approx(mean, abs=1e-6)


def cider_refs(refs: list[str]) -> list[list[str]]:
    return [r.split() for r in refs]


def test_the_mean_baseline_is_the_mean_of_the_other_samples():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    assert scst.baseline(rewards).tolist() == [[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]]
    greedy = torch.tensor([1.5, 4.0])
    assert scst.baseline(rewards, greedy).tolist() == [[1.5] * 3, [4.0] * 3]


def test_the_gradient_raises_a_sample_above_its_baseline_and_lowers_one_below():
    torch.manual_seed(0)
    model = tiny()
    spec = model.encoder.spec
    grid = torch.randn(1, spec.grid**2, spec.channels) * 3  # (1, N, C)
    tokens = scst.sample(model, model.image_context(grid), 2, 8)  # (2, T)
    while torch.equal(tokens[0], tokens[1]):
        tokens = scst.sample(model, model.image_context(grid), 2, 8)
    rows = torch.zeros(2, dtype=torch.long)
    before, _ = scst.sample_log_probs(model, grid, tokens, rows)
    rewards = torch.tensor([[3.0, 1.0]])  # the first above the mean of the other, the second below
    advantage = (rewards - scst.baseline(rewards)).flatten()
    assert advantage.tolist() == [2.0, -2.0]

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    logp, entropy = scst.sample_log_probs(model, grid, tokens, rows)
    scst.scst_loss(logp, advantage, entropy, 0.0).backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = scst.sample_log_probs(model, grid, tokens, rows)
    assert after[0] > before[0]
    assert after[1] < before[1]


def test_samples_end_at_sep_and_are_drawn_from_the_output_vocabulary():
    torch.manual_seed(1)
    model = tiny()
    spec = model.encoder.spec
    grid = torch.randn(3, spec.grid**2, spec.channels) * 3
    tokens = scst.sample(model, model.image_context(grid), 4, 10)  # (12, T)
    config = model.config
    assert tokens.shape[0] == 12 and tokens.shape[1] <= 11
    assert (tokens[:, 0] == config.bos_id).all()
    allowed = set(config.output_vocab or range(config.vocab_size)) | {config.pad_id}
    for row in tokens.tolist():
        assert set(row[1:]) <= allowed
        if config.eos_id in row:  # nothing but padding after [SEP]
            assert set(row[row.index(config.eos_id) + 1 :]) <= {config.pad_id}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny workspace after train: the cross-entropy model finetune starts from."""
    root = workspace_after_define(tmp_path_factory.mktemp("scst"), num_images=16)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        train(TrainConfig(epochs=3, batch_size=8, device="cpu", lr=1e-3, new_layer_lr=3e-3))
    finally:
        os.chdir(cwd)
    return root


def run_finetune(root: Path, **values) -> dict:
    cwd = Path.cwd()
    os.chdir(root)
    try:
        cfg = FinetuneConfig(enabled=True, device="cpu", images_per_step=4, samples=4, **values)
        return finetune(cfg)
    finally:
        os.chdir(cwd)


def test_a_tiny_run_raises_the_reward(trained):
    metrics = run_finetune(trained, epochs=6, lr=1e-3, max_length=12)
    rewards = [float(r["reward"]) for r in history(trained)]
    assert len(rewards) == 6
    assert sum(rewards[-2:]) > sum(rewards[:2]), rewards
    assert metrics["best_val_cider"] >= metrics["start_val_cider"]
    torch.load(trained / "artifacts/finetune/model.pth", weights_only=True)


def history(root: Path) -> list[dict[str, str]]:
    import csv

    with (root / "metrics/finetune_history.csv").open() as f:
        return list(csv.DictReader(f))


def test_a_killed_run_resumes_after_its_last_epoch_as_if_never_killed(trained, monkeypatch, caplog):
    import training.stages.finetune as stage

    straight = run_finetune(trained, epochs=2, lr=1e-3, max_length=12)
    straight_model = (trained / "artifacts/finetune/model.pth").read_bytes()
    straight_history = history(trained)

    calls = {"n": 0}
    real = stage._val_cider

    def killed_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the start, epoch 1, then the kill during epoch 2's
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stage, "_val_cider", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(trained, epochs=2, lr=1e-3, max_length=12)
    monkeypatch.setattr(stage, "_val_cider", real)
    with caplog.at_level("INFO", logger="training.stages.finetune"):
        resumed = run_finetune(trained, epochs=2, lr=1e-3, max_length=12)
    assert any("resuming after epoch 1 of 2" in r.getMessage() for r in caplog.records)
    assert {k: v for k, v in resumed.items() if k != "finetune_seconds"} == {
        k: v for k, v in straight.items() if k != "finetune_seconds"
    }
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in history(trained)] == [
        {k: v for k, v in r.items() if k not in drop} for r in straight_history
    ]
    if straight["best_epoch"] == 2:  # else both wrote the cross-entropy or epoch 1 model
        resumed_state = torch.load(trained / "artifacts/finetune/model.pth", weights_only=True)
        straight_state = torch.load(__import__("io").BytesIO(straight_model), weights_only=True)
        for key, value in straight_state["state_dict"].items():
            assert torch.equal(resumed_state["state_dict"][key], value), key
    assert not list((trained / "artifacts/resume/finetune").glob("*/last.pth"))


def test_switched_off_the_trained_model_passes_through_as_a_hard_link(trained):
    cwd = Path.cwd()
    os.chdir(trained)
    try:
        assert finetune(FinetuneConfig()) == {"enabled": False}
    finally:
        os.chdir(cwd)
    out = trained / "artifacts/finetune/model.pth"
    assert os.path.samefile(out, trained / "artifacts/model/model.pth")
    assert json.loads((trained / "metrics/finetune.json").read_text()) == {"enabled": False}
    assert history(trained) == []


def test_the_mean_baseline_needs_two_samples():
    with pytest.raises(ValueError, match="finetune.samples is 1"):
        FinetuneConfig(samples=1)
    FinetuneConfig(samples=1, baseline="greedy")
