"""The Python API on plain ``nn.Module``s: attach by a name map, train in a user's own loop, save / load, merge,
disable; and the runnable example ``examples/python_api.py``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unitrans
from unitrans.errors import UserError
from unitrans.spec import SpecError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import python_api  # noqa: E402  (the example: tiny_bert, make_data, main)

POINTS = {"text.attn.q": "bert.encoder.layer.*.attention.self.query",
          "text.attn.v": "bert.encoder.layer.*.attention.self.value",
          "text.mlp.fc1": "bert.encoder.layer.*.intermediate.dense"}
MODULES = {"attn_q": "attention.self.query", "attn_v": "attention.self.value", "mlp_fc1": "intermediate.dense"}


def _randomise(handle, seed: int) -> None:
    """Every trainable tensor drawn at random (λb starts at 0: the adapter would add nothing and prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _reference_logits(frozen: nn.Module, ref: dict, ids: torch.Tensor) -> torch.Tensor:
    """The adapted BERT written out from eq. 4: every targeted weight is ``W0 + s diag(λb) B diag(λa) A`` (B and A
    cut to the point's width), computed by ``functional_call`` on an untouched copy of the model."""
    a, b, s = ref["adapters.0.A.shared"], ref["adapters.0.B.shared"], ref["adapters.0.scale.T"]
    weights = {"classifier.weight": ref["backbone.classifier.weight"],
               "classifier.bias": ref["backbone.classifier.bias"]}
    for layer in range(2):
        for role, path in MODULES.items():
            name = f"bert.encoder.layer.{layer}.{path}"
            w0 = frozen.get_submodule(name).weight  # (d_out, d_in)
            la, lb = ref[f"adapters.0.lambda_a.text_{layer}_{role}"], ref[f"adapters.0.lambda_b.text_{layer}_{role}"]
            d_out, d_in = w0.shape
            weights[f"{name}.weight"] = w0 + s * lb[:, None] * (b[:d_out] @ (la[:, None] * a[:, :d_in]))
    return torch.func.functional_call(frozen, weights, args=(), kwargs={"input_ids": ids}).logits


def test_a_users_loop_gets_the_gradients_of_eq_4(one_thread):
    """Three SGD steps of a plain loop (the same input tensor object twice, evaluations under no_grad between
    steps, no cache call anywhere) give the gradients, losses and parameters of the reference written from the
    equation. The adapter's step is large enough that a stale cached result would change the next output."""
    model = python_api.tiny_bert(seed=1).eval()  # eval: no dropout, so both paths see the same function
    handle = unitrans.attach(model, "vcra", rank=4, share_kv_scaling=False, points=POINTS,
                             train_parts=["classifier"])
    _randomise(handle, seed=2)
    names = list(handle.trainable_state())
    ref = {k: v.detach().clone().requires_grad_() for k, v in handle.trainable_state().items()}
    start = {k: v.detach().clone() for k, v in ref.items()}
    lr = {k: 0.5 if k.startswith("backbone.") else 300.0 for k in names}  # adapter gradients are ~1e-5
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr[k]} for k, p in handle.trainable_state().items()])
    frozen = python_api.tiny_bert(seed=1).eval().requires_grad_(False)
    ids, labels = python_api.make_data(16, seed=3)
    held_out, _ = python_api.make_data(8, seed=4)
    for step, batch in enumerate((ids, ids, ids[:8])):  # the same tensor object in steps 0 and 1
        loss = F.cross_entropy(model(input_ids=batch).logits, labels[: len(batch)])
        loss.backward()
        ref_loss = F.cross_entropy(_reference_logits(frozen, ref, batch), labels[: len(batch)])
        grads = dict(zip(names, torch.autograd.grad(ref_loss, [ref[k] for k in names])))
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6), step
        for k, p in handle.trainable_state().items():
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-3, atol=1e-3 * float(grads[k].abs().max()),
                                       msg=f"step {step}: {k}")
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for k in names:
                ref[k] -= lr[k] * grads[k]
            for x in (held_out, batch):  # evaluation between steps, on a new input and on the trained one
                torch.testing.assert_close(model(input_ids=x).logits, _reference_logits(frozen, ref, x),
                                           atol=1e-5, rtol=1e-5)
    state = {k: v.detach() for k, v in handle.trainable_state().items()}
    for k, v in ref.items():
        torch.testing.assert_close(state[k], v.detach(), atol=1e-5, rtol=1e-4, msg=k)
    moved = {k: float((state[k] - start[k]).abs().max()) for k in start}
    assert all(m > 1e-4 for m in moved.values()), moved  # every tensor moved (A and B by about 0.02)


class _Fused(nn.Module):
    """One block with a fused (3d, d) qkv linear, as ViTs have."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        return self.blocks[0].qkv(x)


@pytest.mark.parametrize("rows", ["[0/3]|[2/3]", "[0:8]|[16:24]"])
def test_fused_linears_by_row_slices(rows):
    q_rows, v_rows = rows.split("|")
    torch.manual_seed(0)
    model = _Fused()
    points = {"vision.attn.q": f"blocks.*.qkv{q_rows}", "vision.attn.v": f"blocks.*.qkv{v_rows}"}
    handle = unitrans.attach(model, "lora", rank=2, alpha=4, points=points)
    found = [(p.id, p.out_slice) for p in handle.backbone.injection_points()]
    assert found == [("vision.0.attn.q", slice(0, 8)), ("vision.0.attn.v", slice(16, 24))]
    _randomise(handle, seed=5)
    x = torch.randn(3, 8)
    w0, b0 = model.blocks[0].qkv.weight, model.blocks[0].qkv.bias
    lora = handle.adapters[0]
    expected = x @ w0.t() + b0
    for key, sl in (("vision_0_attn_q", slice(0, 8)), ("vision_0_attn_v", slice(16, 24))):
        expected[:, sl] += 2.0 * (x @ lora.lora_A[key].t() @ lora.lora_B[key].t())  # alpha / r = 2
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        assert torch.equal(out[:, 8:16], (x @ w0.t() + b0)[:, 8:16])  # k: not a point, untouched


def test_save_load_merge_disable(tmp_path):
    model = python_api.tiny_bert(seed=1).eval()
    w0 = model.bert.encoder.layer[1].attention.self.query.weight.detach().clone()
    ids, _ = python_api.make_data(4, seed=0)
    with torch.no_grad():
        base = model(input_ids=ids).logits
    handle = unitrans.attach(model, {"name": "vcra", "rank": 4}, points=POINTS, train_parts=["classifier"])
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("classifier"))
    _randomise(handle, seed=6)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with handle.disabled():  # no adapter: only the (randomised) classifier differs from the frozen model
            torch.testing.assert_close(model.bert(input_ids=ids).pooler_output,
                                       python_api.tiny_bert(seed=1).eval().bert(input_ids=ids).pooler_output,
                                       rtol=0, atol=0)
        query = model.bert.encoder.layer[1].attention.self.query
        handle.merge()
        assert not torch.equal(query.weight, w0) and not query._forward_hooks  # folded in, no hook runs
        merged = model(input_ids=ids).logits
        with handle.disabled():
            assert torch.equal(query.weight, w0)
            disabled_merged = model(input_ids=ids).logits
        assert not torch.equal(query.weight, w0) and not query._forward_hooks  # merged again after the block
        assert torch.equal(model(input_ids=ids).logits, merged)
        handle.unmerge()
    assert torch.equal(model.bert.encoder.layer[1].attention.self.query.weight, w0)  # W0 bit for bit
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted, base, atol=1e-3)

    manifest = unitrans.save_adapter(handle, tmp_path / "ad")
    assert manifest["backbone"]["points"] == POINTS and manifest["adapters"][0]["rank"] == 4
    assert json.loads((tmp_path / "ad" / "adapter.json").read_text()) == manifest
    fresh = python_api.tiny_bert(seed=1).eval()
    again = unitrans.load_adapter(fresh, tmp_path / "ad")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, adapted)
        torch.testing.assert_close(disabled_merged, again.detach()(input_ids=ids).logits)  # detached: bare
    assert again.model is fresh
    same = unitrans.attach(python_api.tiny_bert(seed=1).eval(), "vcra", rank=4, points=POINTS,
                           train_parts=["classifier"])
    assert unitrans.load_adapter(same, tmp_path / "ad") is same  # a handle: loaded in place
    with torch.no_grad():
        assert torch.equal(same.model(input_ids=ids).logits, adapted)

    other = unitrans.attach(python_api.tiny_bert(seed=1), "vcra", rank=8, points=POINTS, train_parts=["classifier"])
    with pytest.raises(UserError, match=r"tensor 'adapters.0.A.shared' has shape \(4, 64\) in the checkpoint but "
                                        r"\(8, 64\) in the built model"):
        other.load(tmp_path / "ad")
    with pytest.raises(UserError, match="saved from transformers.*BertForSequenceClassification.*pass the model"):
        unitrans.load_adapter(None, tmp_path / "ad")


def test_attach_refuses_mistakes_by_name():
    bert = python_api.tiny_bert
    with pytest.raises(SpecError, match="adapters\\[0\\] \\(vcra.v1\\) -> rnak: unknown field; did you mean 'rank'"):
        unitrans.attach(bert(), "vcra", rnak=4, points=POINTS)
    with pytest.raises(UserError, match="'text.attn.q' = '\\*.qeury' matches no submodule of "
                                        "BertForSequenceClassification; similar: bert.encoder.layer.0.attention"
                                        ".self.query"):
        unitrans.attach(bert(), "vcra", points={"text.attn.q": "*.qeury"})
    with pytest.raises(UserError, match="matches bert.encoder.layer.0.attention.self, a BertSelfAttention"):
        unitrans.attach(bert(), "vcra", points={"text.attn.q": "*.attention.self"})
    with pytest.raises(UserError, match="matches 4 linears in layers \\[0, 0, 1, 1\\]"):
        unitrans.attach(bert(), "vcra", points={"text.attn.q": "*.attention.self.[qk]*"})
    with pytest.raises(UserError, match="'attn.q' is not a point name"):
        unitrans.attach(bert(), "vcra", points={"attn.q": "*.query"})
    with pytest.raises(UserError, match="needs points="):
        unitrans.attach(bert(), "vcra")
    with pytest.raises(UserError, match="target\\(s\\) 'vision.attn.q' match no injection point; backbone "
                                        "module:BertForSequenceClassification declares: text.attn.q"):
        unitrans.attach(bert(), "lora", targets=["vision.attn.q"], points={"text.attn.q": "*.query"})
    with pytest.raises(UserError, match="side network qasn.v1 needs backbone capability FusionNetwork"):
        unitrans.attach(bert(), "vcra", points={"fusion.attn.q": "*.query"}, side_network="qasn")


def test_a_side_network_on_named_fusion_blocks(one_thread):
    """QASN on a plain model's layers (``fusion.blocks``), reusing the VCRA fusion pair; disabled() removes it."""
    model = python_api.tiny_bert(seed=1).eval()
    ids, _ = python_api.make_data(4, seed=0)
    points = {"fusion.attn.q": "*.attention.self.query", "fusion.blocks": "bert.encoder.layer.*"}
    handle = unitrans.attach(model, "vcra", rank=4, side_network={"name": "qasn", "filter": "literal"}, points=points)
    qasn = handle.side_network
    assert qasn.uses_shared_pair and qasn._pair[0] is handle.adapters[0].A["shared"] and qasn.width == 64
    with torch.no_grad():
        with_side = model(input_ids=ids).logits  # the literal filter adds sigma(0) = 0.5 at init
        with handle.disabled():
            bare = model(input_ids=ids).logits
        handle.side_network.detach()
        assert torch.equal(model(input_ids=ids).logits, bare)  # λb = 0: VCRA adds exactly nothing at init
    assert not torch.allclose(with_side, bare, atol=1e-3)
    assert "side_network.lambda_a.0" in handle.trainable_state()


def test_the_python_api_example_learns(tmp_path, one_thread, capsys):
    """examples/python_api.py as a user runs it (fewer steps): it learns, reloads exactly and merges."""
    result = python_api.main(["--steps", "60", "--out", str(tmp_path / "out")])
    assert result["accuracy_before"] < 0.6 and result["accuracy_adapter_disabled"] < 0.6
    assert result["accuracy_after"] > 0.9, result  # measured: 0.49 -> 1.00 (adapter disabled: 0.50)
    assert result["reloaded_max_diff"] == 0.0 and result["merged_max_diff"] < 1e-4
    assert "trainable params: 2,499 || all params: 78,851" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter.safetensors").is_file()
