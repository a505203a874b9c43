"""The faster token-selection operators of model/encoder.py give exactly what the straightforward ones gave:
row gathers by index_select (``_gather_tokens``), row writes by index_copy (``_scatter_tokens``, also in place),
one shared sort for the stable policy's per-layer top-k (``plan_token_selection``) and the encoder's inference
path (one copy of the tokens written in place, no fallback when every slot is written back)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from focus_detr.model.batching import INVARIANT, OFFICIAL
from focus_detr.model.encoder import _gather_tokens, _scatter_tokens, plan_token_selection
from focus_detr.model.selection import DEFAULT_POLICY, STABLE_POLICY, SelectionPolicy


def _reference_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    expanded = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, expanded)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), n=st.integers(1, 40), k=st.integers(0, 40), trailing=st.sampled_from([(), (5,), (3, 2)]),
       transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_gather_tokens_equals_gather(batch, n, k, trailing, transposed, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, *trailing, generator=g)
    if transposed:  # a non-contiguous input
        x = torch.randn(n, batch, *trailing, generator=g).transpose(0, 1)
    index = torch.randint(0, n, (batch, k), generator=g)
    out = _gather_tokens(x, index)
    assert out.shape == (batch, k, *trailing)
    assert torch.equal(out, _reference_gather(x, index))


def test_gather_tokens_gradient_matches():
    x = torch.randn(2, 7, 4, requires_grad=True)
    index = torch.tensor([[0, 3, 3, 6], [1, 1, 2, 5]])
    (grad_new,) = torch.autograd.grad((_gather_tokens(x, index) ** 2).sum(), x)
    (grad_ref,) = torch.autograd.grad((_reference_gather(x, index) ** 2).sum(), x)
    assert torch.allclose(grad_new, grad_ref)


def _reference_scatter(x: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x.scatter(1, index[..., None].expand(-1, -1, x.shape[-1]), rows)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), n=st.integers(1, 40), k_fraction=st.floats(0.0, 1.0), channels=st.integers(1, 6),
       in_place=st.booleans(), seed=st.integers(0, 2**16))
def test_scatter_tokens_equals_scatter(batch, n, k_fraction, channels, in_place, seed):
    g = torch.Generator().manual_seed(seed)
    k = int(k_fraction * n)
    x = torch.randn(batch, n, channels, generator=g)
    index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])  # unique per image
    rows = torch.randn(batch, k, channels, generator=g)
    expected = _reference_scatter(x, index, rows)
    before = x.clone()
    out = _scatter_tokens(x, index, rows, in_place)
    assert torch.equal(out, expected)
    if in_place:
        assert out.data_ptr() == x.data_ptr()
    else:
        assert torch.equal(x, before)  # the input is left alone


def test_scatter_tokens_gradient_matches():
    x = torch.randn(2, 7, 4, requires_grad=True)
    rows = torch.randn(2, 3, 4, requires_grad=True)
    index = torch.tensor([[0, 3, 6], [5, 1, 2]])
    new = torch.autograd.grad((_scatter_tokens(x, index, rows) ** 2).sum(), (x, rows))
    ref = torch.autograd.grad((_reference_scatter(x, index, rows) ** 2).sum(), (x, rows))
    for a, b in zip(new, ref):
        assert torch.allclose(a, b)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), n=st.integers(2, 60), ratio=st.floats(0.01, 1.0), per_image=st.booleans(),
       cascade=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_writes_all_says_when_every_slot_is_written_back(batch, n, ratio, per_image, cascade, seed):
    g = torch.Generator().manual_seed(seed)
    valid = torch.randint(1, n + 1, (batch,), generator=g)
    plan = plan_token_selection(torch.randn(batch, n, generator=g), valid, ratio, tuple(cascade),
                                INVARIANT if per_image else OFFICIAL, STABLE_POLICY)
    assert plan.writes_all == [bool(w.all()) for w in plan.write_back]
    assert [plan.layer_writes_all(i) for i in range(len(cascade))] == plan.writes_all


def test_writes_all_one_image_or_one_budget():
    scores = torch.randn(2, 30)
    for batching in (INVARIANT, OFFICIAL):
        assert plan_token_selection(scores[:1], torch.tensor([30]), 0.5, (1.0, 0.5), batching, STABLE_POLICY).writes_all == [True, True]
        assert plan_token_selection(scores, torch.tensor([30, 30]), 0.5, (1.0, 0.5), batching, STABLE_POLICY).writes_all == [True, True]
        # the smaller image owns fewer slots than the batch's top-k
        assert plan_token_selection(scores, torch.tensor([30, 10]), 0.5, (1.0, 0.5), batching, STABLE_POLICY).writes_all == [False, False]


class PerLayer(SelectionPolicy):
    """The stable policy, called once per layer (what plan_token_selection did before sharing the sort)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def foreground(self, scores, k, layer):
        self.calls.append((k, layer))
        return STABLE_POLICY.foreground(scores, k, layer)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), n=st.integers(2, 60), ratio=st.floats(0.01, 1.0), per_image=st.booleans(),
       cascade=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_shared_sort_equals_per_layer_top_k(batch, n, ratio, per_image, cascade, ties, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n, generator=g)
    if ties:  # many exact ties, as invalid-proposal tokens have
        scores = torch.randint(0, 3, (batch, n), generator=g).float()
    valid = torch.randint(1, n + 1, (batch,), generator=g)
    shared = plan_token_selection(scores, valid, ratio, tuple(cascade), INVARIANT if per_image else OFFICIAL, STABLE_POLICY)
    policy = PerLayer()
    reference = plan_token_selection(scores, valid, ratio, tuple(cascade), INVARIANT if per_image else OFFICIAL, policy)
    assert [layer for _, layer in policy.calls] == list(range(len(cascade)))  # every layer, also one of 0 tokens
    assert torch.equal(shared.token_counts, reference.token_counts)
    for a, b, wa, wb in zip(shared.indices, reference.indices, shared.write_back, reference.write_back):
        assert torch.equal(a, b)
        assert torch.equal(wa, wb)


def test_default_policy_still_decides_every_layer():
    calls = []

    class Recording(SelectionPolicy):
        def foreground(self, scores, k, layer):
            calls.append(layer)
            return DEFAULT_POLICY.foreground(scores, k, layer)

    plan_token_selection(torch.randn(1, 50), torch.tensor([50]), 0.5, (1.0, 0.8, 0.6), OFFICIAL, Recording())
    assert calls == [0, 1, 2]
