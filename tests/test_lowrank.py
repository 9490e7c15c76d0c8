"""The low-rank product VCRA and QASN share: its hand-written backward against autograd, what it keeps for
backward, and the input cache that makes ``clear_cache`` unnecessary."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from unitrans.adapters.lowrank import InputCache, folded_product

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(r=3, d_in=5, d_outs=(4, 6), seed=0, with_s=(True, False)):
    g = torch.Generator().manual_seed(seed)

    def p(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    a, b = p(r, d_in + 2), p(max(d_outs) + 1, r)  # wider than any point: points use A[:, :d_in], B[:d_out]
    heads = [(p(r), p(d), p(()) if s else None) for d, s in zip(d_outs, with_s)]
    return a, b, heads


@pytest.mark.parametrize("train_a", [True, False], ids=["A trained (keeps x)", "A frozen (keeps A x)"])
@pytest.mark.parametrize("rows", [[0, 1], [0, 1, 1], [1]], ids=["two heads", "kv twice", "one head"])
def test_backward_equals_autograd_of_the_unfolded_formula(train_a, rows):
    """``s·diag(λb) B diag(λa) A x`` by plain autograd (a reference written here) against the product's
    hand-written backward, for every input: x, A, B, λa, λb, s."""
    a, b, heads = _params()
    a.requires_grad_(train_a)
    x = torch.randn(2, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def reference():
        ax = x @ a[:, :5].t()
        blocks = []
        for i in rows:
            la, lb, s = heads[i]
            blk = (ax * la) @ b[: lb.shape[0]].t() * lb
            blocks.append(blk * s if s is not None else blk)
        return torch.cat(blocks, dim=-1)

    def ours():
        return folded_product(F.linear(x, a[:, :5]), x, a, b, heads, rows)

    inputs = [x, a, b, *[t for h in heads for t in h if t is not None]]
    inputs = [t for t in inputs if t.requires_grad]
    weight = torch.randn(reference().shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = torch.autograd.grad((reference() * weight).sum(), inputs, allow_unused=True)
    got = torch.autograd.grad((ours() * weight).sum(), inputs, allow_unused=True)
    torch.testing.assert_close(ours(), reference())
    for e, o in zip(expected, got):
        if e is None:
            assert o is None or torch.count_nonzero(o) == 0
        else:
            torch.testing.assert_close(o, e)


def _saved_storages(fn) -> set[int]:
    ptrs: set[int] = set()

    def pack(t):
        ptrs.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return ptrs, out


@pytest.mark.parametrize("train_a", [True, False])
def test_only_x_is_kept_when_a_trains_and_only_ax_when_it_is_frozen(train_a):
    a, b, heads = _params()
    a = a.detach().float().requires_grad_(train_a)
    b = b.detach().float().requires_grad_()
    heads = [tuple(t.detach().float().requires_grad_() if t is not None else None for t in h) for h in heads]
    x = torch.randn(2, 7, 5)
    params = {t.untyped_storage().data_ptr() for t in [a, b, *[t for h in heads for t in h if t is not None]]}
    holder = {}

    def fwd():
        holder["ax"] = F.linear(x, a[:, :5])
        return folded_product(holder["ax"], x, a, b, heads, [0, 1, 1])

    ptrs, out = _saved_storages(fwd)
    activations = ptrs - params
    expected = {x.untyped_storage().data_ptr()} if train_a else {holder["ax"].untyped_storage().data_ptr()}
    assert activations == expected


def test_input_cache_entries_die_with_their_input_and_after_backward():
    cache = InputCache(size=2)
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(2, 4)
    ax = cache.put(x, "s", F.linear(x, w))
    assert cache.get(x, "s") is ax and cache.get(x, "other") is None
    assert cache.get(torch.randn(2, 4), "s") is None
    ax.sum().backward()  # its graph is freed: the entry must go
    assert cache.get(x, "s") is None and len(cache) == 0
    with torch.no_grad():
        cache.put(x, "s", F.linear(x, w))
    assert len(cache) == 1
    del x
    gc.collect()
    assert len(cache) == 0  # the input died: nothing of it stays
    keep = [torch.randn(2, 4) for _ in range(3)]
    with torch.no_grad():
        for t in keep:
            cache.put(t, "s", F.linear(t, w))
    assert len(cache) == 2 and cache.get(keep[0], "s") is None  # least recently used evicted
