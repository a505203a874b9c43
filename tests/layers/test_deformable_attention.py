"""MultiScaleDeformableAttention: sampling locations equal the official broadcast formula bit for bit."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from focus_detr.layers.deformable_attention import MultiScaleDeformableAttention


def official_locations(offsets, reference_points, spatial_shapes, num_points):
    """detrex / Deformable DETR's expression, broadcast over (heads, points)."""
    if reference_points.shape[-1] == 2:
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    return (reference_points[:, :, None, :, None, :2]
            + offsets / num_points * reference_points[:, :, None, :, None, 2:] * 0.5)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), queries=st.integers(1, 40), heads=st.sampled_from([1, 2, 8]),
       levels=st.integers(1, 4), points=st.integers(1, 4), ref_dim=st.sampled_from([2, 4]),
       seed=st.integers(0, 2**16), transposed=st.booleans())
def test_sample_locations_are_the_official_ones_bit_for_bit(batch, queries, heads, levels, points, ref_dim, seed,
                                                           transposed):
    g = torch.Generator().manual_seed(seed)
    attn = MultiScaleDeformableAttention(8 * heads, heads, levels, points)
    offsets = torch.randn(batch, queries, heads, levels, points, 2, generator=g) * 3
    reference_points = torch.rand(batch, queries, levels, ref_dim, generator=g)
    if transposed:  # a non-contiguous view, as the encoder's per-layer slices can be
        reference_points = torch.rand(queries, batch, levels, ref_dim, generator=g).transpose(0, 1)
    spatial_shapes = torch.randint(1, 200, (levels, 2), generator=g)
    ours = attn._sample_locations(offsets, reference_points, spatial_shapes)
    official = official_locations(offsets, reference_points, spatial_shapes, points)
    assert ours.shape == official.shape and ours.dtype == official.dtype
    assert torch.equal(ours, official)


def test_lower_precision_references_are_promoted_as_before():
    attn = MultiScaleDeformableAttention(32, 4, 2, 2)
    offsets = torch.randn(1, 5, 4, 2, 2, 2)
    spatial_shapes = torch.tensor([[10, 12], [5, 6]])
    for dim in (2, 4):
        reference_points = torch.rand(1, 5, 2, dim).to(torch.bfloat16)
        ours = attn._sample_locations(offsets, reference_points, spatial_shapes)
        official = official_locations(offsets, reference_points, spatial_shapes, 2)
        assert ours.dtype == torch.float32 and torch.equal(ours, official)


def test_sample_columns_are_not_in_the_state_dict_and_follow_the_device():
    attn = MultiScaleDeformableAttention(32, 4, 3, 2)
    assert "sample_columns" not in attn.state_dict()
    assert attn.sample_columns.tolist()[:6] == [0, 1, 0, 1, 2, 3]  # head 0: level 0 (x, y) x 2 points, level 1
    assert attn.to(torch.float64).sample_columns.dtype == torch.int64
