"""VCRA (eq. 3-4) against a naive per-point closed form and PEFT's VeRA; sharing, identity, caching, merging."""

from __future__ import annotations

import copy
import gc
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_inputs, randomise_, retrieval_forward, tiny_backbone, training_without_dropout
from unitrans.adapters import vcra_v1
from unitrans.interfaces import InjectionPoint, match_points

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def peft():
    """PEFT, the oracle of the tests that compare against it (those tests skip where it is not installed)."""
    return pytest.importorskip("peft")


ALL_TARGETS = ["vision.attn.*", "vision.mlp.*", "text.attn.*", "text.mlp.fc1", "fusion.attn.*"]


def _safe(key: str) -> str:
    return key.replace(".", "_")


def expected_pair_key(p: InjectionPoint, share: str) -> str:
    """Which (A, B) pair a point uses, written from the docstring's rules (not read from the adapter)."""
    if share == "all":
        return "decoder" if p.modality == "D" else "shared"
    if share == "modality":
        return p.modality
    return p.id


def expected_scaling_key(p: InjectionPoint) -> str:
    """k and v of one attention share their λ pair (share_kv_scaling=True)."""
    if p.attention is not None and p.role in ("k", "v"):
        return _safe(f"{p.attention}.kv")
    return _safe(p.id)


def randomise_scalings_(adapter, seed: int = 0) -> None:
    randomise_(adapter.lambda_a.values(), seed=seed, std=0.7, mean=0.3)
    randomise_(adapter.lambda_b.values(), seed=seed + 1, std=0.7)
    randomise_(adapter.scale.values(), seed=seed + 2, std=0.5, mean=1.0)


def naive_delta_matrix(adapter, p: InjectionPoint, share: str) -> torch.Tensor:
    """``s_M · diag(λb) · B[:d_out] · diag(λa) · A[:, :d_in]`` as a dense ``(d_out, d_in)`` matrix."""
    a, b = adapter.pair(expected_pair_key(p, share))
    sk = expected_scaling_key(p)
    la, lb, s = adapter.lambda_a[sk], adapter.lambda_b[sk], adapter.scale[p.modality]
    assert a.shape[0] == adapter.rank and b.shape[1] == adapter.rank
    return s * torch.diag(lb) @ b[: p.out_features] @ torch.diag(la) @ a[:, : p.in_features]


@pytest.mark.parametrize("share", ["all", "modality", "none"])
def test_every_targeted_linear_equals_the_naive_closed_form(share):
    bb = tiny_backbone(vision_width=48)  # fusion k/v read 48, write 64; vision mlp is 48 -> 128 -> 48
    points, unmatched = match_points(bb.injection_points(), ALL_TARGETS)
    assert not unmatched
    assert {(p.in_features, p.out_features) for p in points} >= {(48, 48), (48, 128), (128, 48), (64, 64), (48, 64),
                                                                  (64, 128)}
    adapter = vcra_v1(targets=ALL_TARGETS, rank=6, share=share)
    adapter.attach(points)
    randomise_scalings_(adapter, seed=10)
    by_module: dict[int, list[InjectionPoint]] = {}
    for p in points:
        by_module.setdefault(id(p.module), []).append(p)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pts in by_module.values():
            module = pts[0].module
            x = torch.randn(2, 3, module.in_features, generator=g)
            expected = x @ module.weight.t() + module.bias
            for p in pts:  # each point updates its own rows
                sl = p.out_slice or slice(0, module.out_features)
                expected[..., sl] += x[..., : p.in_features] @ naive_delta_matrix(adapter, p, share).t()
            base = x @ module.weight.t() + module.bias
            assert not torch.allclose(expected, base, atol=1e-3)
            torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)


def test_sharing_structure_and_parameter_count():
    bb = tiny_backbone()
    targets = ["vision.attn.[qkv]", "text.attn.[qkv]", "fusion.attn.[qkv]"]
    points, _ = match_points(bb.injection_points(), targets)
    r, d = 8, 64
    counts = {}
    for share in ("all", "modality", "none"):
        adapter = vcra_v1(targets=targets, rank=r, share=share)
        adapter.attach(points)
        counts[share] = sum(p.numel() for p in adapter.parameters())
        pairs = {expected_pair_key(p, share) for p in points}
        assert len(adapter.A) == len(adapter.B) == len(pairs)
        assert len({a.data_ptr() for a in adapter.A.values()}) == len(pairs)
        if share == "all":
            shared = adapter.pair("shared")
            assert len(pairs) == 1
            for m in "VTC":
                assert adapter.shared_pair(m)[0] is shared[0]
                assert adapter.shared_pair(m)[1] is shared[1]
            scaling_keys = {expected_scaling_key(p): p.out_features for p in points}
            assert set(adapter.lambda_a) == set(scaling_keys)
            closed_form = 2 * d * r + sum(scaling_keys.values()) + r * len(scaling_keys) + 3
            assert counts["all"] == closed_form
            # k and v share one key: 3 attentions per layer-pair -> q and kv per attention
            assert len(scaling_keys) == 2 * 6
        elif share == "modality":
            assert len(pairs) == 3
            assert adapter.pair("V")[0] is not adapter.pair("T")[0]
        else:
            assert len(pairs) == len(points) == 18
    assert counts["modality"] - counts["all"] == 2 * (2 * d * r)
    assert counts["none"] - counts["all"] == 17 * (2 * d * r)


def test_shared_pair_is_one_tensor_on_the_path_of_every_modality():
    """Zeroing the one shared A in place switches off the update of vision, text and fusion points at once."""
    bb = tiny_backbone()
    targets = ["vision.attn.q", "text.attn.v", "fusion.attn.k"]
    points, _ = match_points(bb.injection_points(), targets, layers=[0])
    adapter = vcra_v1(targets=targets, rank=4, share="all")
    adapter.attach(points)
    randomise_scalings_(adapter, seed=3)
    assert {p.modality for p in points} == {"V", "T", "C"}
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, p.in_features, generator=g) for p in points]
    with torch.no_grad():
        frozen = [torch.nn.functional.linear(x, p.module.weight, p.module.bias) for x, p in zip(xs, points)]
        before = [p.module(x) for x, p in zip(xs, points)]
        assert all(not torch.allclose(b, f, atol=1e-3) for b, f in zip(before, frozen))
        adapter.pair("shared")[0].zero_()
        after = [p.module(x) for x, p in zip(xs, points)]
    for a, f in zip(after, frozen):
        assert torch.equal(a, f)


def test_identity_at_init():
    bb = tiny_backbone()
    pixel, tok = make_inputs(bb, batch=3)
    with torch.no_grad():
        frozen = retrieval_forward(bb, pixel, tok)
    points, _ = match_points(bb.injection_points(), ALL_TARGETS)
    adapter = vcra_v1(targets=ALL_TARGETS, rank=8)
    adapter.attach(points)
    with torch.no_grad():
        adapted = retrieval_forward(bb, pixel, tok)
    for k in frozen:
        assert torch.equal(frozen[k], adapted[k]), k


def _linear_stack(widths, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(a, b))
    model = nn.Sequential(*layers)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("widths", [(16, 16, 16, 16), (12, 16, 8, 10)], ids=["equal", "unequal"])
def test_vcra_with_one_shared_pair_equals_peft_vera(widths, peft):
    model = _linear_stack(widths)
    idx = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    ref = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(
        r=4, target_modules=[str(i) for i in idx], projection_prng_key=0, save_projection=True, d_initial=0.1))
    peft_layers = [ref.base_model.model[i] for i in idx]
    with torch.no_grad():  # PEFT starts at λb = 0 (identity); make the update non-zero
        g = torch.Generator().manual_seed(5)
        for layer in peft_layers:
            layer.vera_lambda_b["default"].copy_(torch.randn(layer.out_features, generator=g))
            layer.vera_lambda_d["default"].copy_(torch.randn(4, generator=g))
    points = [InjectionPoint(name="mlp.fc", layer=j, modality="T", module=model[i], out_slice=None,
                             in_features=model[i].in_features, out_features=model[i].out_features,
                             input_group=f"g{j}") for j, i in enumerate(idx)]
    adapter = vcra_v1(targets=["mlp.fc"], rank=4, share="all")
    adapter.attach(points)
    with torch.no_grad():
        a, b = adapter.pair("shared")
        vera_a, vera_b = peft_layers[0].vera_A["default"], peft_layers[0].vera_B["default"]
        assert a.shape == vera_a.shape and b.shape == vera_b.shape
        a.copy_(vera_a)
        b.copy_(vera_b)
        for p, layer in zip(points, peft_layers):
            adapter.lambda_a[_safe(p.id)].copy_(layer.vera_lambda_d["default"])
            adapter.lambda_b[_safe(p.id)].copy_(layer.vera_lambda_b["default"])
        assert float(adapter.scale["T"]) == 1.0
    x = torch.randn(3, 5, widths[0], generator=torch.Generator().manual_seed(6))
    theirs = ref(x)
    with ref.disable_adapter():
        base = ref(x)
    assert not torch.allclose(theirs, base, atol=1e-3)
    torch.testing.assert_close(model(x), theirs, atol=1e-5, rtol=1e-5)


def _count_projections(monkeypatch, adapter):
    """Count ``F.linear`` calls whose weight is (a slice of) one of the adapter's A matrices."""
    a_ptrs = {a.untyped_storage().data_ptr() for a in adapter.A.values()}
    real = torch.nn.functional.linear
    calls = []

    def counting(x, weight, bias=None):
        if weight.shape[0] == adapter.rank and weight.untyped_storage().data_ptr() in a_ptrs:
            calls.append(tuple(x.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    return calls


@pytest.mark.parametrize("grad", [False, True])
def test_ax_is_computed_once_per_attention_input(monkeypatch, grad):
    bb = tiny_backbone()
    targets = ["vision.attn.[qkv]", "text.attn.[qkv]"]
    points, _ = match_points(bb.injection_points(), targets)
    adapter = vcra_v1(targets=targets, rank=5)
    adapter.attach(points)
    pixel, tok = make_inputs(bb, batch=2)
    calls = _count_projections(monkeypatch, adapter)
    with torch.set_grad_enabled(grad):
        bb.encode_image(pixel)
        assert len(calls) == 2  # one A x per vision layer (q, k, v read the same input), not 6
        calls.clear()
        bb.encode_image(pixel)  # a second forward recomputes (new inputs), still once per layer
        assert len(calls) == 2
        calls.clear()
        bb.encode_text(tok["input_ids"], tok["attention_mask"])
        assert len(calls) == 2


def test_ax_cache_is_invalidated_when_a_changes():
    bb = tiny_backbone()
    points, _ = match_points(bb.injection_points(), ["vision.attn.[qkv]"], layers=[0])
    adapter = vcra_v1(targets=["vision.attn.[qkv]"], rank=4)
    adapter.attach(points)
    randomise_scalings_(adapter, seed=2)
    qkv = points[0].module
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        qkv(x)
        adapter.pair("shared")[0].mul_(2.0)  # in place, as an optimizer step does
        out = qkv(x)  # same input object: a stale A x would be wrong
        expected = x @ qkv.weight.t() + qkv.bias
        for p in points:
            expected[..., p.out_slice] += x @ naive_delta_matrix(adapter, p, "all").t()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_merge_unmerge_and_no_hook_while_merged():
    bb = tiny_backbone()
    pixel, tok = make_inputs(bb, batch=2)
    points, _ = match_points(bb.injection_points(), ALL_TARGETS)
    modules = list({id(p.module): p.module for p in points}.values())
    w0 = [m.weight.detach().clone() for m in modules]
    adapter = vcra_v1(targets=ALL_TARGETS, rank=8, share="all")
    adapter.attach(points)
    randomise_scalings_(adapter, seed=7)
    assert all(len(m._forward_hooks) == 1 for m in modules)
    with torch.no_grad():
        unmerged = retrieval_forward(bb, pixel, tok)
        adapter.merge()
        assert all(len(m._forward_hooks) == 0 for m in modules)
        assert all(not torch.equal(m.weight, w) for m, w in zip(modules, w0))
        merged = retrieval_forward(bb, pixel, tok)
        adapter.unmerge()
        assert all(torch.equal(m.weight, w) for m, w in zip(modules, w0))
        assert all(len(m._forward_hooks) == 1 for m in modules)
        again = retrieval_forward(bb, pixel, tok)
    for k in unmerged:
        torch.testing.assert_close(merged[k], unmerged[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again[k], unmerged[k], atol=0, rtol=0)


def test_frozen_projections_are_not_parameters_and_come_from_the_seed():
    bb = tiny_backbone()
    targets = ["vision.attn.[qkv]", "text.attn.[qkv]"]
    points, _ = match_points(bb.injection_points(), targets)

    def make(seed):
        ad = vcra_v1(targets=targets, rank=4, share="modality", train_projections=False, projection_seed=seed)
        ad.attach(points)
        return ad

    first, same, other = make(3), make(3), make(4)
    names = [n for n, _ in first.named_parameters()]
    assert names and not any(n.startswith(("A.", "B.")) for n in names)
    assert not any(k.startswith(("A.", "B.")) for k in first.state_dict())
    for key in ("V", "T"):
        a1, b1 = first.pair(key)
        a2, b2 = same.pair(key)
        a3, b3 = other.pair(key)
        assert not a1.requires_grad and not b1.requires_grad
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
        assert not torch.equal(a1, a3) and not torch.equal(b1, b3)
    assert not torch.equal(first.pair("V")[0], first.pair("T")[0])


def test_fusion_computes_the_image_tokens_ax_once_for_all_layers_and_qasn_adds_none(monkeypatch):
    """Cross-attention k and v of every fusion layer read the same image tokens: with one shared pair, ``A x``
    of the image tokens is computed once per fused forward, and QASN (which reuses the fusion pair) reads the
    ``A x_i`` that each block's self-attention computed for the block input, adding no projection of its own; in
    backward each shared ``A x`` is recomputed once for all its readers."""
    from conftest import build_spec, spec_dict

    targets = ["text.attn.*", "fusion.attn.*"]  # the paper's: q, k, v, o of self- and cross-attention
    counts = {}
    for side in (None, {"name": "qasn.v1"}):
        _, built = build_spec(spec_dict([{"name": "vcra.v1", "targets": targets, "rank": 4}], side))
        bb, adapter = built.backbone, built.adapters[0]
        pixel, tok = make_inputs(bb, batch=2)
        image_embeds = bb.encode_image(pixel).detach()
        calls = _count_projections(monkeypatch, adapter)
        fused = bb.fuse(tok["input_ids"], tok["attention_mask"], image_embeds)
        n_layers = len(bb.fusion_blocks())
        assert n_layers >= 2
        assert sum(1 for s in calls if s == tuple(image_embeds.shape)) == 1
        counts[side is None] = len(calls)
        calls.clear()
        fused.square().sum().backward()  # backward recomputes each shared A x once, not once per reader
        counts["backward", side is None] = len(calls)
        assert sum(1 for s in calls if s == tuple(image_embeds.shape)) == 1
        monkeypatch.undo()
    # per layer: block input (self q, k, v), self o input, cross q input, cross o input; the image tokens once
    assert counts[True] == 4 * n_layers + 1
    assert counts[False] == counts[True]
    assert counts["backward", True] == counts["backward", False] == counts[True]


def test_gradient_accumulation_doubles_the_gradients():
    """Inputs are projected once per step and shared across calls; a second micro-batch with unchanged parameters
    (gradient accumulation) must not reuse anything whose graph the first backward freed. Two micro-batches give
    exactly twice the gradients of one, with no cache call in between."""
    bb = tiny_backbone()
    targets = ["vision.attn.*", "text.attn.*", "fusion.attn.*"]
    points, _ = match_points(bb.injection_points(), targets)
    adapter = vcra_v1(targets=targets, rank=4)
    adapter.attach(points)
    randomise_scalings_(adapter, seed=4)
    pixel, tok = make_inputs(bb, batch=2)

    def loss():  # the text encoder runs twice in one graph (unimodal, then fused), like ITC + ITM
        out = retrieval_forward(bb, pixel, tok)
        return out["itm"].square().sum() + out["text_feat"].sum() + out["image_feat"].sum()

    def grads(micro_batches: int) -> dict[str, torch.Tensor]:
        adapter.zero_grad(set_to_none=True)
        for _ in range(micro_batches):
            loss().backward()
        return {n: p.grad.clone() for n, p in adapter.named_parameters()}

    one, two = grads(1), grads(2)
    assert one.keys() == two.keys() and any(g.abs().sum() > 0 for g in one.values())
    for n in one:
        torch.testing.assert_close(two[n], 2 * one[n], atol=1e-5, rtol=1e-4, msg=n)
    # and the parameters changing in between (an optimizer step): the result follows the new values
    with torch.no_grad():
        before = retrieval_forward(bb, pixel, tok)["itm"]
        for p in adapter.lambda_b.values():
            p.mul_(2.0)
        after = retrieval_forward(bb, pixel, tok)["itm"]
    assert not torch.allclose(before, after)


def test_gradient_checkpointing_gives_the_same_gradients_with_qasn():
    """With ``gradient_checkpointing = true`` the blocks are recomputed in backward and must save what they saved
    the first time, so nothing is reused across blocks (the engine sets ``reuse_across_calls = False``); the
    gradients of VCRA + QASN equal those without checkpointing, over two steps' worth of backward."""
    from conftest import build_spec, spec_dict

    grads = {}
    for gc in (False, True):
        adapter = {"name": "vcra.v1", "targets": ["vision.attn.*", "text.attn.*", "fusion.attn.*"], "rank": 4}
        _, built = build_spec(spec_dict([adapter], {"name": "qasn.v1"}, backbone_extra={"gradient_checkpointing": gc}))
        bb = built.backbone
        assert bb.recomputes_activations is gc and built.adapters[0].reuse_across_calls is (not gc)
        training_without_dropout(bb.model)
        randomise_(built.trainable.parameters(), seed=8, std=0.1, mean=0.0)
        pixel, tok = make_inputs(bb, batch=2)
        built.trainable.zero_grad(set_to_none=True)
        for _ in range(2):
            out = retrieval_forward(bb, pixel, tok)
            (out["itm"].square().sum() + out["text_feat"].sum() + out["image_feat"].sum()).backward()
        grads[gc] = {n: p.grad.clone() for n, p in built.trainable.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], atol=1e-5, rtol=1e-4, msg=n)


def _naive_hooks(adapter, source, copy_bb) -> list:
    """A cache-free reference of ``adapter`` (attached to backbone ``source``) on ``copy_bb``, a copy of it:
    every targeted linear adds ``x @ ΔWᵀ`` with ``ΔW = s·diag(λb) B diag(λa) A`` built by plain autograd from the
    adapter's own parameters (so gradients reach them), one point at a time. Returns the hook handles."""
    modules = dict(copy_bb.model.named_modules())
    names = {id(m): n for n, m in source.model.named_modules()}
    by_module: dict = {}
    for p in adapter.points:
        by_module.setdefault(names[id(p.module)], []).append(p)
    handles = []
    for name, pts in by_module.items():
        def hook(mod, args, out, pts=pts):
            x, parts = args[0], []
            for p in pts:
                sl = p.out_slice or slice(0, out.shape[-1])
                upd = x @ naive_delta_matrix(adapter, p, adapter.share).t()
                parts.append(F.pad(upd, (sl.start, out.shape[-1] - sl.stop)))
            return out + sum(parts)

        handles.append(modules[name].register_forward_hook(hook))
    return handles


def test_a_plain_user_loop_needs_no_cache_calls_and_holds_nothing_after_backward():
    """Caches are the library's business: a loop that only does forward, backward, step (no ``clear_cache``),
    with a gradient accumulation that reuses the very same input tensors in two micro-batches, gets the gradients
    of a cache-free reference at every step, and after each step's backward the adapter holds no cached tensor
    and the number of live tensors does not grow. In float64, so that the two orders of summation agree to far
    below what a stale or missing contribution would change. On the paper's q, k, v (a forward then ends on a
    point that receives its update from an earlier point of its attention)."""
    targets = ["vision.attn.[qkv]", "text.attn.[qkv]", "fusion.attn.[qkv]"]
    bb, ref_bb = tiny_backbone(seed=3), tiny_backbone(seed=3)
    bb.model.double()
    ref_bb.model.double()
    points, _ = match_points(bb.injection_points(), targets)
    adapter = vcra_v1(targets=targets, rank=4)
    adapter.attach(points)
    adapter.double()
    randomise_scalings_(adapter, seed=6)
    handles = _naive_hooks(adapter, bb, ref_bb)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.05)
    pixel, tok = make_inputs(bb, batch=2)
    pixel = pixel.double()
    live = []

    def loss(model_bb, image_embeds):
        fused = model_bb.fuse(tok["input_ids"], tok["attention_mask"], image_embeds)
        text = model_bb.text_feat(model_bb.encode_text(tok["input_ids"], tok["attention_mask"]))
        return model_bb.itm_logits(fused).square().sum() + text.sum() + model_bb.image_feat(image_embeds).sum()

    def grads(model_bb) -> dict[str, torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        emb = model_bb.encode_image(pixel)
        loss(model_bb, emb).backward()
        frozen = emb.detach()  # the same tensor object in both micro-batches: a cached A x must not be reused
        for _ in range(2):
            loss(model_bb, frozen).backward()
        return {n: p.grad.clone() for n, p in adapter.named_parameters()}

    for step in range(4):
        ours, theirs = grads(bb), grads(ref_bb)
        assert any(g.abs().sum() > 0 for g in ours.values())
        for n in ours:
            torch.testing.assert_close(ours[n], theirs[n], atol=1e-9, rtol=1e-9, msg=f"step {step}: {n}")
        opt.step()
        assert adapter._pending is None and all(len(c) == 0 for c in adapter._ax_caches.values())
        gc.collect()
        live.append(sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor)))
    for h in handles:
        h.remove()
    assert live[1] == live[2] == live[3], live


def _saved_activation_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, parameters and buffers left out."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def test_a_trained_update_keeps_for_backward_exactly_the_inputs_of_a():
    """The bound of docs/performance.md: over an update that costs nothing (a hook that only lets gradients
    through each targeted linear's output), VCRA with A trained keeps exactly the distinct inputs ``x`` of its
    targeted linears for backward (``dA`` needs them) and nothing else: no ``A x``, no folded matrix. (On q, k, v:
    their inputs are layer-norm outputs and image tokens, which the frozen backward never keeps itself; an
    out-projection's input can be the attention output that the frozen attention keeps anyway.)"""
    targets = ["vision.attn.[qkv]", "text.attn.[qkv]", "fusion.attn.[qkv]"]
    bb, ref_bb = tiny_backbone(seed=4), tiny_backbone(seed=4)
    points, _ = match_points(bb.injection_points(), targets)
    adapter = vcra_v1(targets=targets, rank=4)
    adapter.attach(points)
    randomise_scalings_(adapter, seed=1)
    pixel, tok = make_inputs(bb, batch=2)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _cost import touch  # identity; the scalar gets a zero gradient; saves nothing

    scalar = nn.Parameter(torch.ones(()))
    modules = dict(ref_bb.model.named_modules())
    for name in {n for n, m in bb.model.named_modules() if any(m is p.module for p in points)}:
        modules[name].register_forward_hook(lambda mod, args, out: touch(out, scalar))
    inputs: dict[int, int] = {}

    def record(mod, args):
        inputs[args[0].untyped_storage().data_ptr()] = args[0].untyped_storage().nbytes()

    for m in {id(p.module): p.module for p in points}.values():
        m.register_forward_pre_hook(record)
    model_ptrs = {t.untyped_storage().data_ptr() for model in (bb.model, ref_bb.model, adapter)
                  for t in [*model.parameters(), *model.buffers()]}
    # image tokens as a leaf of their own: BLIP's vision model keeps its output's storage for the pooled layer
    # norm, so the fusion's image-token input would be kept by the frozen path anyway
    tokens = torch.randn(2, 65, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)

    def forward(b):
        ids, mask = tok["input_ids"], tok["attention_mask"]
        return b.encode_image(pixel), b.encode_text(ids, mask), b.fuse(ids, mask, tokens)

    ours = _saved_activation_bytes(lambda: forward(bb), model_ptrs)
    free = _saved_activation_bytes(lambda: forward(ref_bb), model_ptrs)
    assert len(inputs) >= 8 and ours - free == sum(inputs.values())
