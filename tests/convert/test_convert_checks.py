"""Integer-buffer checks of the checkpoint loaders (``focus_detr.convert.checks``).

``load_state_dict`` casts silently: a float ``relative_position_index`` copied into the int64 buffer becomes
all zeros, and every attention head then reads row 0 of its bias table. The loaders must refuse such a
checkpoint and name the key.
"""

from __future__ import annotations

import pytest
import torch

import focus_detr
from focus_detr.config import SwinConfig, make_config
from focus_detr.convert import integer_buffer_problems
from weights_utils import official_checkpoint

INDEX_KEY = "backbone.layers.1.blocks.0.attn.relative_position_index"


@pytest.fixture(scope="module")
def small_swin_cfg():
    """The tiny preset's transformer on a 2-2-2-2 Swin with window 4 (about 1M parameters)."""
    return make_config("tiny", backbone=SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                                                   window_size=4, pretrain_img_size=64, drop_path_rate=0.0))


@pytest.fixture(scope="module")
def checkpoint(small_swin_cfg) -> dict:
    torch.manual_seed(0)
    return official_checkpoint(focus_detr.build_model(small_swin_cfg))


def _damaged(checkpoint: dict, key: str, value: torch.Tensor) -> dict:
    state = dict(checkpoint["model"])
    state[key] = value
    return {"model": state}


def test_intact_checkpoint_loads(checkpoint, small_swin_cfg):
    model = focus_detr.load_official(checkpoint, small_swin_cfg)
    assert torch.equal(model.state_dict()[INDEX_KEY], checkpoint["model"][INDEX_KEY])


@pytest.mark.parametrize("damage", ["zeroed", "float", "float_rule_values", "permuted"])
def test_damaged_relative_position_index_is_refused(checkpoint, small_swin_cfg, damage):
    index = checkpoint["model"][INDEX_KEY]
    value = {
        "zeroed": torch.zeros_like(index),
        # The right values, but as floats: load_state_dict would accept them; the dtype alone is refused.
        "float": index.float(),
        # What filling every key by the parity fixtures' weight rule gives (uniform in (-0.25, 0.25)).
        "float_rule_values": torch.rand(index.shape) * 0.5 - 0.25,
        "permuted": index.flip(0),
    }[damage]
    with pytest.raises(focus_detr.CheckpointMismatchError, match=INDEX_KEY.replace(".", r"\.")) as error:
        focus_detr.load_official(_damaged(checkpoint, INDEX_KEY, value), small_swin_cfg)
    message = str(error.value)
    expected = "float32 tensor for the model's torch.int64 buffer" if damage.startswith("float") else "values differ"
    assert expected in message
    # Only the damaged key is named.
    assert message.count("relative_position_index") == 1


def test_integer_buffer_problems_lists_every_damaged_key(small_swin_cfg):
    model = focus_detr.build_model(small_swin_cfg)
    state = model.state_dict()
    assert integer_buffer_problems(model, state) == []
    keys = [k for k in state if k.endswith("relative_position_index")]
    assert len(keys) == sum(small_swin_cfg.backbone.depths)
    damaged = dict(state)
    damaged[keys[0]] = state[keys[0]].float()
    damaged[keys[-1]] = state[keys[-1]] + 1
    problems = integer_buffer_problems(model, damaged)
    assert [p.split(":")[0] for p in problems] == [keys[0], keys[-1]]
    # Narrower integer dtypes with the right values are fine (load_state_dict converts them exactly).
    assert integer_buffer_problems(model, {keys[0]: state[keys[0]].to(torch.int32)}) == []
    # Keys the model lacks, and mis-shaped ones, are left to the strict loader's own report.
    assert integer_buffer_problems(model, {"nope": torch.zeros(2), keys[0]: torch.zeros(3, dtype=torch.int64)}) == []


def test_float_models_have_nothing_to_check():
    model = focus_detr.build_model("tiny")
    assert integer_buffer_problems(model, model.state_dict()) == []


def test_init_weights_with_damaged_index_are_refused(small_swin_cfg):
    """``train --init-weights`` copies tensors by name and shape; a damaged integer buffer is refused there
    too, while intact weights load."""
    from focus_detr.engine.train import load_matching_weights

    torch.manual_seed(0)
    source = focus_detr.build_model(small_swin_cfg).state_dict()
    loaded, _ = load_matching_weights(focus_detr.build_model(small_swin_cfg), source)
    assert loaded == len(source)
    damaged = dict(source)
    damaged[INDEX_KEY] = torch.zeros_like(source[INDEX_KEY])
    with pytest.raises(focus_detr.CheckpointFormatError, match=INDEX_KEY.replace(".", r"\.")):
        load_matching_weights(focus_detr.build_model(small_swin_cfg), damaged)
