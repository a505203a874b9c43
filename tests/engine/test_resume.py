"""Resuming: a run stopped after k iterations and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch

from focus_detr import api
from focus_detr.data import ensure_shapes_dataset
from focus_detr.engine import TrainConfig, load_checkpoint, train
from focus_detr.engine.checkpoint import list_checkpoints
from focus_detr.engine.data import TrainingStream
from train_utils import small_train_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    ensure_shapes_dataset(root, 10, 2, seed=3, image_size=(96, 128), min_object_size=8, objects_per_image=(1, 3))
    return root


def _cfg(data_dir, out, **kw) -> TrainConfig:
    """Six iterations with an lr step, two scales, EMA and deterministic algorithms: everything resume restores."""
    changes = dict(max_iters=6, lr_steps=(4,), train_scales=(96, 112), seed=5, log_every=2, ema=True, ema_decay=0.9,
                   deterministic=True)
    changes.update(kw)
    return small_train_config(data_dir, out, **changes)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"


def test_stopped_and_resumed_run_equals_uninterrupted_run(data_dir, tmp_path):
    full = train(_cfg(data_dir, tmp_path / "full"))
    assert full.iteration == 6 and not full.stopped_early

    part = train(_cfg(data_dir, tmp_path / "split", stop_at=3))
    assert part.stopped_early and part.iteration == 3 and part.final_weights is None
    assert [it for it, _ in list_checkpoints(tmp_path / "split")] == [3]
    # Resume with a different number of DataLoader workers: the sample stream must not depend on it.
    resumed = train(_cfg(data_dir, tmp_path / "split", resume="auto", num_workers=2))
    assert resumed.iteration == 6 and not resumed.stopped_early

    _assert_same_state(api.read_weights_file(full.final_weights)["state_dict"],
                       api.read_weights_file(resumed.final_weights)["state_dict"])
    _assert_same_state(api.read_weights_file(full.final_ema_weights)["state_dict"],
                       api.read_weights_file(resumed.final_ema_weights)["state_dict"])
    a, b = load_checkpoint(full.last_checkpoint), load_checkpoint(resumed.last_checkpoint)
    assert a["iteration"] == b["iteration"] == 6
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])  # same random stream consumed
    for (ka, va), (kb, vb) in zip(sorted(a["optimizer"]["state"].items()), sorted(b["optimizer"]["state"].items())):
        assert ka == kb and all(torch.equal(va[n], vb[n]) for n in va)

    # `focus-detr eval CHECKPOINT --ema` rebuilds the EMA model from a training checkpoint.
    from focus_detr.cli.eval_cmd import load_any_model

    ema_model = load_any_model(resumed.last_checkpoint, ema=True)
    _assert_same_state(ema_model.state_dict(), api.read_weights_file(resumed.final_ema_weights)["state_dict"])

    # The metrics log of the resumed run records the restart and continues the iteration count.
    rows = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert any('"event": "resume"' in r for r in rows)


def test_resume_explicit_path_and_config_mismatch(data_dir, tmp_path):
    part = train(_cfg(data_dir, tmp_path / "a", stop_at=2, max_iters=3, ema=False))
    ckpt = part.last_checkpoint
    # An explicit checkpoint path continues into another folder.
    done = train(_cfg(data_dir, tmp_path / "b", resume=str(ckpt), max_iters=3, ema=False))
    assert done.iteration == 3
    # A different model config is refused with the differing keys named.
    with pytest.raises(ValueError, match="decoder.num_queries"):
        train(_cfg(data_dir, tmp_path / "c", resume=str(ckpt), max_iters=3, ema=False,
                   model_overrides={"decoder.num_queries": 10, "encoder.oesm_topk": 20, "test_short_side": 96}))


def test_resume_auto_without_checkpoint_starts_fresh(data_dir, tmp_path):
    result = train(_cfg(data_dir, tmp_path / "fresh", resume="auto", max_iters=1, ema=False))
    assert result.iteration == 1 and result.final_weights is not None


def test_training_stream_is_a_pure_function_of_position():
    full = TrainingStream(7, seed=1, rank=0, world_size=1)
    it = iter(full)
    first = [next(it) for _ in range(20)]
    tail = iter(TrainingStream(7, seed=1, rank=0, world_size=1, start=9))
    assert [next(tail) for _ in range(11)] == first[9:]
    # Each pass over the stream is a permutation of the dataset; passes differ.
    assert sorted(k[2] for k in first[:7]) == list(range(7))
    assert [k[2] for k in first[:7]] != [k[2] for k in first[7:14]]


def test_training_stream_shards_are_disjoint_within_an_epoch():
    shards = [TrainingStream(10, seed=0, rank=r, world_size=3) for r in range(3)]
    per_epoch = [s.epoch_indices(0) for s in shards]
    assert all(len(p) == 4 for p in per_epoch)  # ceil(10 / 3), padded by wrapping
    flat = [i for p in per_epoch for i in p]
    assert set(flat) == set(range(10)) and len(flat) == 12


def test_sigterm_checkpoints_and_stops(data_dir, tmp_path, monkeypatch):
    """A pre-emption signal finishes the current step, writes a checkpoint and stops; resume continues."""
    import os
    import signal

    from focus_detr.losses import SetCriterion

    original = SetCriterion.forward
    calls = {"n": 0}

    def forward(self, outputs, targets):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, outputs, targets)

    monkeypatch.setattr(SetCriterion, "forward", forward)
    result = train(_cfg(data_dir, tmp_path / "run", ema=False))
    assert result.stopped_early and result.iteration == 2 and result.final_weights is None
    assert [it for it, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    monkeypatch.setattr(SetCriterion, "forward", original)
    resumed = train(_cfg(data_dir, tmp_path / "run", ema=False, resume="auto"))
    assert resumed.iteration == 6 and resumed.final_weights is not None
