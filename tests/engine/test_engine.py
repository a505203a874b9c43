"""Engine pieces: checkpoint files, non-finite step handling, optimiser groups, schedules, RNG states."""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import pytest
import torch

from focus_detr import api
from focus_detr.api import CheckpointFormatError
from focus_detr.data import ensure_shapes_dataset
from focus_detr.engine import (LRSchedule, TrainingDivergedError, build_optimizer, find_latest_checkpoint,
                               load_checkpoint, param_groups, save_checkpoint, schedule_for, train)
from focus_detr.engine.checkpoint import capture_rng_state, list_checkpoints, prune_checkpoints, restore_rng_state
from focus_detr.engine.logging import read_metrics
from focus_detr.losses import SetCriterion
from focus_detr.model import build_model
from train_utils import small_train_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    ensure_shapes_dataset(root, 6, 2, seed=1, image_size=(96, 128), min_object_size=8, objects_per_image=(1, 3))
    return root


_cfg = small_train_config


# --------------------------------------------------------------------------------------------------
# Checkpoint files


def _small_checkpoint(path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return save_checkpoint(path, {"iteration": 7, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                  "rng": [capture_rng_state()], "note": None})


def test_checkpoint_roundtrip_is_weights_only_safe(tmp_path):
    path = _small_checkpoint(tmp_path / "c.pth")
    raw = torch.load(path, map_location="cpu", weights_only=True)  # no pickled objects inside
    assert raw["format"] == "focus-detr-train-checkpoint" and raw["format_version"] == 1
    state = load_checkpoint(path)
    assert state["iteration"] == 7 and state["note"] is None
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away


def test_checkpoint_refuses_non_plain_content(tmp_path):
    with pytest.raises(TypeError, match="only plain values"):
        save_checkpoint(tmp_path / "x.pth", {"iteration": 1, "bad": object()})
    assert not (tmp_path / "x.pth").exists()


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    path = _small_checkpoint(tmp_path / "c.pth")
    data = path.read_bytes()
    for cut in (len(data) // 2, 10, 0):
        bad = tmp_path / f"cut{cut}.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointFormatError, match="truncated or not a PyTorch file"):
            load_checkpoint(bad)


def test_foreign_files_give_clear_errors(tmp_path):
    (tmp_path / "text.pth").write_text("hello")
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "dict.pth")
    torch.save({"model": {"a": torch.zeros(1)}, "iteration": 3}, tmp_path / "d2.pth")
    # A pickled object (as old detectron2 trainers stored argparse namespaces): weights_only refuses it.
    torch.save({"args": argparse.Namespace(lr=0.1), "iteration": 1}, tmp_path / "evil.pth")
    for name in ("text", "random", "evil"):
        with pytest.raises(CheckpointFormatError, match="not a readable checkpoint"):
            load_checkpoint(tmp_path / f"{name}.pth")
    with pytest.raises(CheckpointFormatError, match="not a focus-detr training checkpoint"):
        load_checkpoint(tmp_path / "dict.pth")
    with pytest.raises(CheckpointFormatError, match="detrex checkpoint"):
        load_checkpoint(tmp_path / "d2.pth")
    with pytest.raises(CheckpointFormatError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pth")
    # A model weights file is recognised and pointed to the right command.
    weights = api.save(build_model("tiny", num_classes=2), tmp_path / "w.pth")
    with pytest.raises(CheckpointFormatError, match="weights file"):
        load_checkpoint(weights)


def test_corrupted_content_fails_the_checksum(tmp_path):
    path = _small_checkpoint(tmp_path / "c.pth")
    payload = torch.load(path, weights_only=True)
    payload["model"]["weight"][0, 0] += 1.0  # as a flipped bit in a tensor would
    torch.save(payload, tmp_path / "bad.pth")
    with pytest.raises(CheckpointFormatError, match="checksum mismatch"):
        load_checkpoint(tmp_path / "bad.pth")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "new.pth")
    with pytest.raises(CheckpointFormatError, match="newer than this focus-detr"):
        load_checkpoint(tmp_path / "new.pth")


def test_latest_checkpoint_skips_damaged_files_and_pruning(tmp_path):
    folder = tmp_path / "checkpoints"
    for it in (10, 20, 30):
        _small_checkpoint(folder / f"checkpoint_{it:07d}.pth")
    (folder / "checkpoint_0000040.pth").write_bytes(b"\x00" * 100)  # e.g. a disk that filled up
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        latest = find_latest_checkpoint(tmp_path)
    assert latest.name == "checkpoint_0000030.pth"
    prune_checkpoints(tmp_path, keep=2)
    assert [it for it, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert find_latest_checkpoint(tmp_path / "nothing_here") is None


def test_rng_state_roundtrip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# --------------------------------------------------------------------------------------------------
# Non-finite losses and gradients


def _poison(monkeypatch, bad_calls: set[int] | None, kind: str = "loss"):
    """Make the criterion's loss non-finite (or its gradient, with a finite loss) on the given calls
    (0-based; None: every call)."""
    original = SetCriterion.forward
    calls = {"n": 0}

    def forward(self, outputs, targets):
        losses = original(self, outputs, targets)
        n = calls["n"]
        calls["n"] += 1
        if bad_calls is None or n in bad_calls:
            if kind == "loss":
                losses["loss_class"] = losses["loss_class"] * float("nan")
            else:  # d sqrt(x)/dx at 0 is inf, times 0: NaN gradient, finite (zero) value
                losses["loss_giou"] = losses["loss_giou"] + 0.0 * torch.sqrt(0.0 * outputs.main.logits.sum())
        return losses

    monkeypatch.setattr(SetCriterion, "forward", forward)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_step_is_skipped_and_counted(data_dir, tmp_path, monkeypatch, kind):
    _poison(monkeypatch, {1, 2}, kind)
    with pytest.warns(UserWarning, match="non-finite loss or gradient"):
        result = train(_cfg(data_dir, tmp_path / "run"))
    assert result.iteration == 4 and result.skipped_steps == 2 and not result.stopped_early
    state = api.read_weights_file(result.final_weights)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    skipped = [r for r in rows if r.get("event") == "skipped_step"]
    assert [r["iter"] for r in skipped] == [2, 3]  # steps 2 and 3 (1-based) were the poisoned calls 1 and 2
    train_rows = [r for r in rows if r.get("type") == "train"]
    assert train_rows[-1]["skipped_steps"] == 2
    assert all(isinstance(r["loss"], float) for r in train_rows if "loss" in r)  # skipped steps not averaged in
    assert load_checkpoint(result.last_checkpoint)["counters"]["skipped_steps"] == 2


def test_skipped_step_leaves_weights_untouched(data_dir, tmp_path, monkeypatch):
    """Iteration 1 poisoned: weights after 2 iterations equal those after 1 clean step + 1 skipped step."""
    clean = train(_cfg(data_dir, tmp_path / "clean", max_iters=1))
    _poison(monkeypatch, {1})
    with pytest.warns(UserWarning):
        poisoned = train(_cfg(data_dir, tmp_path / "poisoned", max_iters=2))
    a = api.read_weights_file(clean.final_weights)["state_dict"]
    b = api.read_weights_file(poisoned.final_weights)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_many_nonfinite_steps_stop_the_run(data_dir, tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(2, 100)))
    with pytest.warns(UserWarning), pytest.raises(TrainingDivergedError) as info:
        train(_cfg(data_dir, tmp_path / "run", max_iters=20, checkpoint_every=1, max_bad_steps=3))
    message = str(info.value)
    assert "3 consecutive steps" in message and "checkpoint_0000002.pth" in message
    # The last good checkpoint is kept and nothing newer was written.
    assert [it for it, _ in list_checkpoints(tmp_path / "run")][-1] == 2
    assert not (tmp_path / "run" / "model_final.pth").exists()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["event"] == "stopped" and rows[-1]["reason"] == "non-finite"


# --------------------------------------------------------------------------------------------------
# Optimiser and schedules


def test_param_groups_follow_the_official_rules():
    model = build_model("tiny", num_classes=3)
    groups = {g["name"]: g for g in param_groups(model, lr=1e-4, backbone_lr=1e-5, weight_decay=1e-4)}
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups.values():
        for p in g["params"]:
            assert ("backbone" in names[id(p)]) == g["name"].startswith("backbone")
            assert g["lr"] == (1e-5 if g["name"].startswith("backbone") else 1e-4)
            assert g["weight_decay"] == (0.0 if g["name"].endswith("_norm") else 1e-4)
    norm_params = {n for g in groups.values() if g["name"].endswith("_norm") for n in (names[id(p)] for p in g["params"])}
    assert any("norm" in n for n in norm_params)  # LayerNorms of the transformer and GroupNorms of the backbone
    assert all(".weight" in n or ".bias" in n for n in norm_params)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups.values() for p in g["params"]} == trainable
    opt = build_optimizer(model)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)


def test_official_schedules_scale_with_dataset_and_batch():
    # COCO-sized: 7500 iterations of 16 images per epoch reproduce the official numbers.
    assert schedule_for("12ep", 7500 * 16, 16) == LRSchedule(90000, (82500,))
    assert schedule_for("24ep", 7500 * 16, 16) == LRSchedule(180000, (150000,))
    assert schedule_for("36ep", 7500 * 16, 16) == LRSchedule(270000, (150000,))
    # 1000 images with a total batch of 4: 250 iterations per epoch.
    s = schedule_for("12ep", 1000, 4)
    assert s.max_iters == 3000 and s.milestones == (2750,)
    # --max-iters keeps the drop at the same fraction; --lr-steps overrides it.
    assert schedule_for("24ep", 1000, 4, max_iters=600).milestones == (500,)
    assert schedule_for(None, 1000, 4, max_iters=100, lr_steps=[80, 90]).milestones == (80, 90)
    with pytest.raises(ValueError):
        schedule_for(None, 1000, 4)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_for("7ep", 1000, 4)


def test_lr_schedule_factor_and_state():
    s = LRSchedule(100, (50, 80), gamma=0.1, warmup_iters=10, warmup_factor=0.001)
    assert s.factor(0) == pytest.approx(0.001)
    assert s.factor(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert s.factor(10) == 1.0 and s.factor(49) == 1.0
    assert s.factor(50) == pytest.approx(0.1) and s.factor(80) == pytest.approx(0.01)
    assert LRSchedule.from_state_dict(json.loads(json.dumps(s.state_dict()))) == s


def test_run_folder_records_config_and_environment(data_dir, tmp_path):
    result = train(_cfg(data_dir, tmp_path / "run", max_iters=2, log_every=1))
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["max_iters"] == 2 and config["resolved"]["total_batch_size"] == 2
    assert config["model"]["num_classes"] == 6
    assert config["resolved"]["class_names"] == ["circle", "square", "triangle", "star", "ring", "cross"]
    env = json.loads((run / "environment.json").read_text())
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"]
    assert "git" in env and "python" in env
    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [r for r in rows if r["type"] == "train"]
    assert [r["iter"] for r in train_rows] == [1, 2]
    assert {"loss", "loss_class", "select_loss", "lr", "images_per_s", "skipped_steps"} <= set(train_rows[0])
    # The final weights rebuild the model from the file alone, with the dataset's classes.
    model = api.load(result.final_weights)
    assert model.cfg.num_classes == 6 and model.cfg.class_names[0] == "circle"


def test_init_weights_fine_tunes_from_another_label_set(data_dir, tmp_path):
    """Weights of a 3-class model initialise a 6-class run: everything but the class-specific tensors."""
    donor = build_model("tiny", num_classes=3, **{"decoder.num_queries": 20, "encoder.oesm_topk": 20})
    path = api.save(donor, tmp_path / "donor.pth")
    result = train(_cfg(data_dir, tmp_path / "run", max_iters=1, lr=0.0, backbone_lr=0.0, init_weights=str(path)))
    trained = api.read_weights_file(result.final_weights)["state_dict"]
    donor_state = donor.state_dict()
    class_specific = [k for k in donor_state if tuple(donor_state[k].shape) != tuple(trained[k].shape)]
    assert class_specific and all("class_head" in k or "dn_label_embed" in k for k in class_specific)
    # lr 0: the loaded tensors are unchanged by the one step (AdamW's decoupled decay is lr-scaled too).
    same = [k for k in donor_state if k not in class_specific]
    assert all(torch.equal(donor_state[k], trained[k]) for k in same)
    with pytest.raises(CheckpointFormatError, match="no such file"):
        train(_cfg(data_dir, tmp_path / "run2", max_iters=1, init_weights=str(tmp_path / "missing.pth")))


def test_ema_decay_warms_up():
    from focus_detr.engine.train import ema_update_fn

    update = ema_update_fn(0.999)
    ema, cur = [torch.zeros(3)], [torch.ones(3)]
    update(ema, cur, torch.tensor(1))  # n = 1: decay 2 / 11, the new weights dominate
    assert torch.allclose(ema[0], torch.full((3,), 9 / 11))
    ema = [torch.zeros(3)]
    update(ema, cur, torch.tensor(10**6))  # late: the configured decay
    assert torch.allclose(ema[0], torch.full((3,), 0.001))
    counts = [torch.zeros(2, dtype=torch.long)]
    update(counts, [torch.ones(2, dtype=torch.long)], torch.tensor(5))  # integer buffers are copied
    assert counts[0].tolist() == [1, 1]
    with pytest.raises(ValueError):
        ema_update_fn(1.5)
