"""Multi-scale deformable attention: reference vs an independent per-point loop, fast path vs reference,
gradients (gradcheck in float64), a hypothesis property test, and the implementation selection.

Tolerances (why):
* float64, reference vs loop and fast vs reference: 1e-12 absolute on outputs of size ~1 (values ~N(0, 1),
  weights summing to <= 1). The three compute the same sums in different orders; float64 rounding of a
  64-term sum is ~1e-15, so 1e-12 leaves room without hiding a wrong corner or weight (those are O(0.01+)).
* float32, fast vs reference: 2e-5 absolute on outputs and 1e-4 on gradients. Summation order differs
  (embedding_bag vs grid_sample + stack-sum), ~1e-6 per output; gradients sum over more terms (value) or are
  scaled by the map size (locations, x W_l).
* Location gradients jump at integer pixel coordinates (floor). Where the reference and the fast path
  could round a pixel coordinate to different sides of an integer, they are compared only on maps with
  power-of-two sizes and locations k/16, where both compute every coordinate exactly.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from focus_detr.ops import ms_deform_attn as msda
from focus_detr.ops import ms_deform_attn_fast as fast_module
from focus_detr.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_reference
from focus_detr.ops.ms_deform_attn_fast import ms_deform_attn_fast

Shapes = list[tuple[int, int]]


# ----------------------------------------------------------------------------------------------------------
# Helpers


def loop_reference(value: torch.Tensor, shapes: Shapes, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Independent, explicit version: bilinear interpolation of each sampling point, one at a time.

    Pixel ``i`` of a ``W``-wide map has its centre at ``(i + 0.5) / W`` (``align_corners=False``), so location
    ``x`` sits at pixel coordinate ``x * W - 0.5``; corners outside the map contribute zero (zero padding).
    """
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = locations.shape
    starts = [sum(h * w for h, w in shapes[:level]) for level in range(num_levels)]
    out = torch.zeros(batch, num_queries, num_heads, head_dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(num_queries):
            for m in range(num_heads):
                for level, (height, width) in enumerate(shapes):
                    for p in range(num_points):
                        x = float(locations[b, q, m, level, p, 0]) * width - 0.5
                        y = float(locations[b, q, m, level, p, 1]) * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        a = float(weights[b, q, m, level, p])
                        for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= xi < width and 0 <= yi < height:
                                w = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                out[b, q, m] += a * w * value[b, starts[level] + yi * width + xi, m]
    return out.flatten(2)


def make_inputs(
    shapes: Shapes,
    batch: int = 2,
    num_queries: int = 5,
    num_heads: int = 2,
    head_dim: int = 3,
    num_points: int = 2,
    dtype: torch.dtype = torch.float64,
    low: float = -0.3,
    high: float = 1.3,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random inputs; locations uniform in ``[low, high]`` (partly outside the maps by default)."""
    g = torch.Generator().manual_seed(seed)
    num_levels = len(shapes)
    num_tokens = sum(h * w for h, w in shapes)
    value = torch.randn(batch, num_tokens, num_heads, head_dim, generator=g, dtype=dtype)
    locations = low + (high - low) * torch.rand(batch, num_queries, num_heads, num_levels, num_points, 2,
                                                generator=g, dtype=dtype)
    weights = torch.rand(batch, num_queries, num_heads, num_levels * num_points, generator=g, dtype=dtype)
    weights = weights.softmax(-1).view(batch, num_queries, num_heads, num_levels, num_points)
    return value, torch.tensor(shapes, dtype=torch.long), locations, weights


def outputs_and_grads(fn, value, spatial_shapes, locations, weights, seed: int = 1):
    """``fn``'s output and the gradients of ``<output, random>`` w.r.t. value, locations and weights."""
    inputs = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = fn(inputs[0], spatial_shapes, inputs[1], inputs[2])
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    grads = torch.autograd.grad(out, inputs, probe)
    return out.detach(), grads


def assert_close_all(actual, expected, atol: float, rtol: float = 0.0) -> None:
    names = ("output", "grad value", "grad locations", "grad weights")
    for name, a, e in zip(names, [actual[0], *actual[1]], [expected[0], *expected[1]]):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


# Level shape sets: the real 4-level pyramid in miniature, 1xN and Nx1 maps, a single pixel.
SHAPE_SETS: dict[str, Shapes] = {
    "pyramid": [(6, 9), (3, 5), (2, 3), (1, 2)],
    "row_and_column": [(1, 7), (5, 1), (3, 4)],
    "single_level": [(4, 6)],
    "one_pixel": [(1, 1), (2, 2)],
}


@pytest.fixture
def restore_selection() -> Iterator[None]:
    previous = msda.current_implementation()
    yield
    msda.select_implementation(previous)


# ----------------------------------------------------------------------------------------------------------
# Reference vs the explicit loop


@pytest.mark.parametrize("name", SHAPE_SETS)
def test_reference_matches_point_loop(name: str) -> None:
    shapes = SHAPE_SETS[name]
    value, spatial_shapes, locations, weights = make_inputs(shapes, batch=2, num_queries=3)
    expected = loop_reference(value, shapes, locations, weights)
    torch.testing.assert_close(ms_deform_attn_reference(value, spatial_shapes, locations, weights), expected,
                               atol=1e-12, rtol=0)


def test_fast_matches_point_loop() -> None:
    shapes = SHAPE_SETS["pyramid"]
    value, spatial_shapes, locations, weights = make_inputs(shapes, batch=2, num_queries=3)
    expected = loop_reference(value, shapes, locations, weights)
    torch.testing.assert_close(ms_deform_attn_fast(value, spatial_shapes, locations, weights), expected,
                               atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Fast vs reference


@pytest.mark.parametrize("name", SHAPE_SETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_matches_reference_random(name: str, dtype: torch.dtype) -> None:
    value, spatial_shapes, locations, weights = make_inputs(SHAPE_SETS[name], num_queries=7, dtype=dtype)
    expected = outputs_and_grads(ms_deform_attn_reference, value, spatial_shapes, locations, weights)
    actual = outputs_and_grads(ms_deform_attn_fast, value, spatial_shapes, locations, weights)
    if dtype == torch.float64:
        assert_close_all(actual, expected, atol=1e-12)
    else:
        torch.testing.assert_close(actual[0], expected[0], atol=2e-5, rtol=0)
        for a, e in zip(actual[1], expected[1]):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def exact_grid_locations(shapes: Shapes, batch: int, num_heads: int, num_points: int, dtype: torch.dtype,
                         seed: int = 0) -> tuple[torch.Tensor, int]:
    """Locations k/16, k in [-20, 36]: pixel coordinates exactly -1, 0, W - 1, W (clamp borders), integers
    (corner kinks), half-integers, and points far outside; every coordinate exact in float32 too."""
    g = torch.Generator().manual_seed(seed)
    num_queries = 40
    k = torch.randint(-20, 37, (batch, num_queries, num_heads, len(shapes), num_points, 2), generator=g)
    locations = (k / 16).to(dtype)
    # Make sure the exact borders 0, 1 and the clamp limits pixel = -1, pixel = W occur for every level.
    for level, (h, w) in enumerate(shapes):
        locations[0, 0, 0, level, 0] = torch.tensor([0.0, 1.0], dtype=dtype)
        locations[0, 1, 0, level, 0] = torch.tensor([-0.5 / w, -0.5 / h], dtype=dtype)
        locations[0, 2, 0, level, 0] = torch.tensor([(w + 0.5) / w, (h + 0.5) / h], dtype=dtype)
    return locations, num_queries


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_matches_reference_on_exact_borders(dtype: torch.dtype) -> None:
    shapes: Shapes = [(4, 8), (2, 4), (1, 2), (8, 1)]  # powers of two: locations k/16 map exactly
    batch, num_heads, num_points = 2, 2, 3
    locations, num_queries = exact_grid_locations(shapes, batch, num_heads, num_points, dtype)
    value, spatial_shapes, _, weights = make_inputs(shapes, batch=batch, num_queries=num_queries,
                                                    num_heads=num_heads, num_points=num_points, dtype=dtype)
    expected = outputs_and_grads(ms_deform_attn_reference, value, spatial_shapes, locations, weights)
    actual = outputs_and_grads(ms_deform_attn_fast, value, spatial_shapes, locations, weights)
    assert_close_all(actual, expected, atol=1e-12 if dtype == torch.float64 else 1e-5, rtol=0)


def test_points_beyond_the_border_give_zero_and_no_location_gradient() -> None:
    shapes: Shapes = [(3, 4)]
    value, spatial_shapes, _, weights = make_inputs(shapes, num_queries=4)
    # Pixel coordinates -1.5 (x), 4.5 (= W + 0.5) and far away: all four corners outside the map.
    locations = torch.tensor([-1.0 / 4, 1.25, 3.0, -7.0], dtype=torch.float64)
    locations = locations.view(1, 4, 1, 1, 1, 1).expand(2, 4, 2, 1, 2, 2).clone()
    for fn in (ms_deform_attn_reference, ms_deform_attn_fast):
        out, (_, grad_loc, grad_w) = outputs_and_grads(fn, value, spatial_shapes, locations, weights)
        assert torch.count_nonzero(out) == 0 and torch.count_nonzero(grad_loc) == 0
        assert torch.count_nonzero(grad_w) == 0


@pytest.mark.parametrize("forward_chunk, backward_chunk, batch, num_queries", [(1, 1, 3, 5), (37, 50, 3, 5),
                                                                               (37, 50, 1, 1)])
def test_fast_is_independent_of_chunking_and_order(monkeypatch, forward_chunk: int, backward_chunk: int,
                                                   batch: int, num_queries: int) -> None:
    """Chunks smaller than one query (-> one query per chunk) and odd sizes, across the batch boundary, with
    the queries reordered spatially (several queries) and without (a single query is not reordered)."""
    value, spatial_shapes, locations, weights = make_inputs(SHAPE_SETS["pyramid"], batch=batch,
                                                            num_queries=num_queries)
    expected = outputs_and_grads(ms_deform_attn_reference, value, spatial_shapes, locations, weights)
    monkeypatch.setattr(fast_module, "FORWARD_CHUNK_SAMPLES", forward_chunk)
    monkeypatch.setattr(fast_module, "BACKWARD_CHUNK_SAMPLES", backward_chunk)
    actual = outputs_and_grads(ms_deform_attn_fast, value, spatial_shapes, locations, weights)
    assert_close_all(actual, expected, atol=1e-12)
    # Without autograd the per-sample geometry lives in chunk-sized scratch buffers instead.
    with torch.no_grad():
        inference = ms_deform_attn_fast(value, spatial_shapes, locations, weights)
    torch.testing.assert_close(inference, expected[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("float32_exact, int32_max", [(64, 2**31 - 1), (2**24, 100)])
def test_fast_index_arithmetic_fallbacks(monkeypatch, float32_exact: int, int32_max: int) -> None:
    """Row arithmetic in float64 (tables beyond 2**24 rows per batch) and int64 rows (beyond 2**31 rows),
    forced here on a small problem by lowering the limits."""
    value, spatial_shapes, locations, weights = make_inputs(SHAPE_SETS["pyramid"], dtype=torch.float32)
    expected = outputs_and_grads(ms_deform_attn_reference, value, spatial_shapes, locations, weights)
    monkeypatch.setattr(fast_module, "_FLOAT32_EXACT", float32_exact)
    monkeypatch.setattr(fast_module, "_INT32_MAX", int32_max)
    actual = outputs_and_grads(ms_deform_attn_fast, value, spatial_shapes, locations, weights)
    torch.testing.assert_close(actual[0], expected[0], atol=2e-5, rtol=0)
    for a, e in zip(actual[1], expected[1]):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_fast_dot_products_without_sddmm(monkeypatch) -> None:
    """The gather + bmm fallback for the per-corner dot products, used where SDDMM is unsupported (and from
    then on, once it failed)."""
    value, spatial_shapes, locations, weights = make_inputs(SHAPE_SETS["pyramid"], batch=2, num_queries=6)
    expected = outputs_and_grads(ms_deform_attn_reference, value, spatial_shapes, locations, weights)
    monkeypatch.setattr(fast_module, "BACKWARD_CHUNK_SAMPLES", 40)  # several gather chunks
    monkeypatch.setattr(fast_module, "_sddmm_supported", False)
    assert_close_all(outputs_and_grads(ms_deform_attn_fast, value, spatial_shapes, locations, weights),
                     expected, atol=1e-12)

    def unsupported(*args):
        raise NotImplementedError("no sparse CSR here")

    monkeypatch.setattr(fast_module, "_sddmm_supported", True)
    monkeypatch.setattr(fast_module, "_corner_dots_sddmm", unsupported)
    assert_close_all(outputs_and_grads(ms_deform_attn_fast, value, spatial_shapes, locations, weights),
                     expected, atol=1e-12)
    assert fast_module._sddmm_supported is False  # remembered (monkeypatch restores it after the test)


def test_fast_accepts_non_contiguous_inputs_and_partial_grads() -> None:
    value, spatial_shapes, locations, weights = make_inputs(SHAPE_SETS["pyramid"], num_queries=6)
    # Same values, non-contiguous layouts.
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)
    locations_nc = locations.transpose(1, 4).contiguous().transpose(1, 4)
    weights_nc = weights.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (value_nc.is_contiguous() or locations_nc.is_contiguous() or weights_nc.is_contiguous())
    expected = ms_deform_attn_reference(value, spatial_shapes, locations, weights)
    torch.testing.assert_close(ms_deform_attn_fast(value_nc, spatial_shapes, locations_nc, weights_nc), expected,
                               atol=1e-12, rtol=0)
    # Only the value needs a gradient (as for frozen offsets), then only the locations.
    v = value.clone().requires_grad_()
    ms_deform_attn_fast(v, spatial_shapes, locations, weights).sum().backward()
    v_ref = value.clone().requires_grad_()
    ms_deform_attn_reference(v_ref, spatial_shapes, locations, weights).sum().backward()
    torch.testing.assert_close(v.grad, v_ref.grad, atol=1e-12, rtol=0)
    loc = locations.clone().requires_grad_()
    ms_deform_attn_fast(value, spatial_shapes, loc, weights).sum().backward()
    loc_ref = locations.clone().requires_grad_()
    ms_deform_attn_reference(value, spatial_shapes, loc_ref, weights).sum().backward()
    torch.testing.assert_close(loc.grad, loc_ref.grad, atol=1e-12, rtol=0)


def test_fast_non_finite_locations_give_nan_like_the_reference() -> None:
    value, spatial_shapes, locations, weights = make_inputs(SHAPE_SETS["pyramid"], num_queries=4)
    locations[0, 0, 0, 1, 0, 0] = float("nan")
    locations[1, 2, 1, 0, 1, 1] = float("inf")
    expected = ms_deform_attn_reference(value, spatial_shapes, locations, weights)
    actual = ms_deform_attn_fast(value, spatial_shapes, locations, weights)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=0, equal_nan=True)
    assert actual.isnan().any()


def test_fast_half_precision_inputs_compute_in_float32() -> None:
    value, spatial_shapes, locations, weights = make_inputs(SHAPE_SETS["pyramid"], dtype=torch.float32)
    out = ms_deform_attn_fast(value.bfloat16(), spatial_shapes, locations, weights)
    assert out.dtype == torch.bfloat16
    expected = ms_deform_attn_reference(value.bfloat16().float(), spatial_shapes, locations, weights)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_fast_double_backward_fails_loudly() -> None:
    value, spatial_shapes, locations, weights = make_inputs(SHAPE_SETS["single_level"])
    value.requires_grad_()
    out = ms_deform_attn_fast(value, spatial_shapes, locations, weights)
    (grad,) = torch.autograd.grad(out.square().sum(), value, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


# ----------------------------------------------------------------------------------------------------------
# Gradcheck (float64, finite differences; random locations avoid the measure-zero kinks)


@pytest.mark.parametrize("fn", [ms_deform_attn_reference, ms_deform_attn_fast], ids=["reference", "fast"])
@pytest.mark.parametrize("name", ["pyramid", "row_and_column"])
def test_gradcheck(fn, name: str) -> None:
    value, spatial_shapes, locations, weights = make_inputs(SHAPE_SETS[name], batch=2, num_queries=3,
                                                            num_heads=2, head_dim=2, low=-0.15, high=1.15)
    inputs = (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda v, loc, w: fn(v, spatial_shapes, loc, w), inputs, eps=1e-6, atol=1e-7, rtol=1e-5
    )


# ----------------------------------------------------------------------------------------------------------
# Property test over small random problems


@st.composite
def problems(draw: st.DrawFn):
    num_levels = draw(st.integers(1, 3))
    shapes = [(draw(st.integers(1, 6)), draw(st.integers(1, 6))) for _ in range(num_levels)]
    sizes = dict(
        batch=draw(st.integers(1, 2)),
        num_queries=draw(st.integers(1, 6)),
        num_heads=draw(st.integers(1, 3)),
        head_dim=draw(st.integers(1, 4)),
        num_points=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
    )
    return shapes, sizes


@settings(max_examples=40, deadline=None)
@given(problems())
def test_property_fast_equals_reference(problem) -> None:
    shapes, sizes = problem
    value, spatial_shapes, locations, weights = make_inputs(shapes, **sizes)
    expected = outputs_and_grads(ms_deform_attn_reference, value, spatial_shapes, locations, weights)
    actual = outputs_and_grads(ms_deform_attn_fast, value, spatial_shapes, locations, weights)
    assert_close_all(actual, expected, atol=1e-11)


# ----------------------------------------------------------------------------------------------------------
# Selection


def test_auto_rule_and_registry() -> None:
    assert {"reference", "fast", "auto"} <= set(msda.available_implementations())
    assert msda.implementation_for("cpu", "auto") == "fast"
    assert msda.implementation_for("cuda", "auto") == "reference"  # torch.device only, CUDA is not touched
    assert msda.implementation_for("cuda", "fast") == "fast"


def test_select_implementation_routes_calls(monkeypatch, restore_selection) -> None:
    calls: list[str] = []
    for name in ("reference", "fast"):
        original = msda._IMPLEMENTATIONS[name]

        def spy(*args, _name=name, _fn=original):
            calls.append(_name)
            return _fn(*args)

        monkeypatch.setitem(msda._IMPLEMENTATIONS, name, spy)
    value, spatial_shapes, locations, weights = make_inputs(SHAPE_SETS["single_level"])
    for name, expected in (("reference", "reference"), ("fast", "fast"), ("auto", "fast")):
        msda.select_implementation(name)
        assert msda.current_implementation() == name
        assert msda.implementation_for(value.device) == expected
        calls.clear()
        ms_deform_attn(value, spatial_shapes, locations, weights)
        assert calls == [expected]
    calls.clear()
    ms_deform_attn(value, spatial_shapes, locations, weights, implementation="reference")
    assert calls == ["reference"]
    with pytest.raises(ValueError):
        msda.select_implementation("no-such-kernel")


def test_environment_variable_choice() -> None:
    assert msda._selection_from_environment({}) == "auto"
    assert msda._selection_from_environment({msda.ENV_VAR: " Reference "}) == "reference"
    assert msda._selection_from_environment({msda.ENV_VAR: "fast"}) == "fast"
    with pytest.raises(ValueError, match=msda.ENV_VAR):
        msda._selection_from_environment({msda.ENV_VAR: "cuda-kernel"})


def test_environment_variable_sets_the_process_default() -> None:
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env = {**os.environ, msda.ENV_VAR: "reference", "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = ("from focus_detr.ops.ms_deform_attn import current_implementation, implementation_for; "
            "print(current_implementation(), implementation_for('cpu'))")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["reference", "reference"]


def test_corner_weights_trace_without_graph_break_and_match_eager():
    """Under torch.compile the corner weights avoid `out=` into strided views (a dynamo graph break,
    docs/usage.md "torch.compile"); the traced path must give exactly the eager values."""
    g = torch.Generator().manual_seed(0)
    frac = torch.rand(3, 8, 2, 16, generator=g)
    attention = torch.rand(3, 8, 16, generator=g)
    expected = fast_module._corner_weights(frac, attention, torch.empty(3, 8, 4, 16))
    torch._dynamo.reset()
    traced = torch.compile(fast_module._corner_weights, backend="eager", fullgraph=True)
    got = traced(frac, attention, torch.empty(3, 8, 4, 16))
    torch._dynamo.reset()
    assert torch.equal(got, expected)
    fx, fy = frac[..., 0, :], frac[..., 1, :]
    torch.testing.assert_close(expected[..., 3, :], attention * fx * fy)
    torch.testing.assert_close(expected[..., 0, :], attention * (1 - fx) * (1 - fy))
