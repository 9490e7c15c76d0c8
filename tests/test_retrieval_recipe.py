"""BLIP's retrieval recipe (momentum copy, queues, momentum distillation, learned temperature) against naive
references written here: the EMA in float64, a queue simulated with Python lists, ITC targets built row by row.

Until the training loop calls the Task hooks, the tests call them as the loop will: ``setup(built)`` once,
``on_step_start`` before each step, ``on_optimizer_step`` after each ``optimizer.step()``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_spec, make_inputs, randomise_, spec_dict
from unitrans.alignment_losses.itc import MomentumCandidates, momentum_itc_loss
from unitrans.errors import UserError
from unitrans.tasks.momentum import FeatureQueue, MomentumCopy, distill_alpha

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = {"learn_temperature": True, "momentum": 0.995, "queue_size": 8, "distill_alpha": 0.4}
VCRA = {"name": "vcra.v1", "targets": ["vision.attn.[qkv]", "text.attn.[qkv]", "fusion.attn.[qkv]"], "rank": 4}


# ---- EMA -------------------------------------------------------------------------------------------------------
def test_ema_update_equals_blips_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    live = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    copy = MomentumCopy(live, 0.995)
    expected = {k: v.double().clone() for k, v in live.items()}
    for _ in range(3):
        with torch.no_grad():
            for v in live.values():
                v.add_(torch.randn(v.shape, generator=g))
        copy.update()
        for k in expected:  # m <- 0.995 m + 0.005 p, element by element
            expected[k] = expected[k] * 0.995 + live[k].double() * 0.005
    for k in expected:
        torch.testing.assert_close(copy.copy[k].double(), expected[k], rtol=0, atol=1e-6)
        assert not torch.allclose(copy.copy[k], live[k], atol=1e-3)


def test_swapped_in_shows_the_copy_and_restores_the_live_values_bit_for_bit():
    live = {"a": torch.randn(4, 4)}
    copy = MomentumCopy(live, 0.9)
    with torch.no_grad():
        copy.copy["a"].mul_(2.0)
    before = live["a"].clone()
    with copy.swapped_in():
        assert torch.equal(live["a"], copy.copy["a"])
    assert torch.equal(live["a"], before)


# ---- queue -----------------------------------------------------------------------------------------------------
def test_queue_enqueue_dequeue_order_equals_a_list_simulation():
    size, dim = 5, 3
    queue = FeatureQueue(size, dim, "cpu", seed=0)
    assert torch.equal(queue.ids, torch.full((size,), -100))  # BLIP's free slots are never positives
    torch.testing.assert_close(queue.image.norm(dim=1), torch.ones(size))
    slots, ptr = [None] * size, 0  # the reference: a ring of (id) entries and a pointer
    g = torch.Generator().manual_seed(1)
    for step, batch in enumerate([2, 2, 2, 3, 1]):
        ids = torch.arange(batch) + 10 * step
        image = F.normalize(torch.randn(batch, dim, generator=g), dim=1)
        queue.enqueue(image, image.flip(1), ids)
        for j in range(batch):
            slots[ptr] = (int(ids[j]), image[j])
            ptr = (ptr + 1) % size
        assert int(queue.ptr) == ptr
        for s, entry in enumerate(slots):
            if entry is not None:
                assert int(queue.ids[s]) == entry[0]
                assert torch.equal(queue.image[s], entry[1]) and torch.equal(queue.text[s], entry[1].flip(0))
    with pytest.raises(UserError, match="smaller than the global batch"):
        queue.enqueue(torch.zeros(6, dim), torch.zeros(6, dim), torch.zeros(6, dtype=torch.long))


def _gather_and_enqueue_on_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from unitrans.tasks.momentum import gather_features

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    queue = FeatureQueue(6, 2, "cpu", seed=0)
    for step in range(2):  # each rank holds 2 of the global batch's 4 rows
        rows = torch.arange(2) + 2 * rank + 4 * step
        feats = torch.stack([rows.float(), -rows.float()], dim=1)
        queue.enqueue(*gather_features(feats, feats * 2, rows))
    torch.save({"ids": queue.ids, "image": queue.image, "text": queue.text, "ptr": queue.ptr}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow  # two processes (gloo): ~5 s on a quiet machine
def test_queues_are_equal_on_every_rank_and_hold_the_global_batch_in_rank_order(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_and_enqueue_on_rank, args=(2, port, str(tmp_path / "q")), nprocs=2, join=True)
    q0, q1 = (torch.load(tmp_path / f"q.{r}", weights_only=True) for r in (0, 1))
    for k in q0:
        assert torch.equal(q0[k], q1[k])
    # one process with the global batch: rows 0..3, then 4..7 wrapping around a queue of 6
    assert q0["ids"].tolist() == [6, 7, 2, 3, 4, 5] and int(q0["ptr"]) == 2
    assert q0["image"][:, 0].tolist() == [6.0, 7.0, 2.0, 3.0, 4.0, 5.0]


# ---- ITC with momentum candidates ------------------------------------------------------------------------------
def _row_loss(query, cands, ids_q, ids_c, soft_query, alpha, tau):
    """-Σ_j t_j log p_j for one row, in Python floats: t = (1 - α) uniform-over-id-positives + α softmax(mom/τ)."""
    logits = [float(query @ c) / tau for c in cands]
    top = max(logits)
    log_z = top + math.log(sum(math.exp(v - top) for v in logits))
    positives = [j for j in range(len(cands)) if int(ids_c[j]) == int(ids_q)]
    mom = [float(soft_query @ c) / tau for c in cands]
    m_top = max(mom)
    m_z = sum(math.exp(v - m_top) for v in mom)
    total = 0.0
    for j in range(len(cands)):
        hard = 1.0 / len(positives) if j in positives else 0.0
        target = (1 - alpha) * hard + alpha * math.exp(mom[j] - m_top) / m_z
        total -= target * (logits[j] - log_z)
    return total


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_momentum_itc_uses_id_positives_across_batch_and_queue_and_soft_targets(alpha):
    g = torch.Generator().manual_seed(3)
    b, k, dim, tau = 3, 7, 5, 0.05

    def unit(n):
        return F.normalize(torch.randn(n, dim, generator=g), dim=1)

    image, text, image_m, text_m = unit(b), unit(b), unit(b), unit(b)
    ids = torch.tensor([4, 9, 4])
    cand_ids = torch.tensor([4, 9, 4, 9, -100, 4, 1])  # batch (3), then the queue: 4 and 9 recur there
    cands = MomentumCandidates(unit(k), unit(k), cand_ids, image_m, text_m, alpha=alpha)
    loss = momentum_itc_loss(image, text, ids, cands, torch.tensor(tau))
    i2t = sum(_row_loss(image[i], cands.text, ids[i], cand_ids, image_m[i], alpha, tau) for i in range(b)) / b
    t2i = sum(_row_loss(text[i], cands.image, ids[i], cand_ids, text_m[i], alpha, tau) for i in range(b)) / b
    assert float(loss) == pytest.approx((i2t + t2i) / 2, rel=1e-5)


def test_distillation_weight_ramps_over_the_first_epoch_as_blip():
    assert [distill_alpha(0.4, i, 0, 4) for i in range(4)] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert distill_alpha(0.4, 4, 1, 4) == 0.4 and distill_alpha(0.4, 9, 2, 4) == 0.4


# ---- the task ----------------------------------------------------------------------------------------------------
def _recipe_task(**recipe):
    d = spec_dict([VCRA])
    d["task"].update(recipe)
    _, built = build_spec(d)
    built.task.setup(built)
    return built


def _batch(bb, ids):
    pixel, tok = make_inputs(bb, batch=len(ids))
    captions = ["a red circle above a blue square", "two green triangles", "a small yellow star left of a circle"]
    return {"image": pixel, "caption": captions[: len(ids)], "image_id": torch.tensor(ids)}, tok


def _step(built, batch, opt, step):
    built.task.on_step_start(step, 0, 4)
    terms = built.task.training_step(built.backbone, batch, built.alignment)
    opt.zero_grad()
    sum(terms.values()).backward()
    for a in built.adapters:
        a.clear_cache()
    opt.step()
    built.task.on_optimizer_step()
    return terms


def test_momentum_copy_holds_the_trainable_tensors_only():
    built = _recipe_task(**RECIPE)
    state = built.trainable_state()
    assert "task.temp" in state
    copy = built.task._momentum.copy
    assert set(copy) == set(state) - {"task.temp"}
    assert sum(v.numel() for v in copy.values()) == sum(v.numel() for k, v in state.items() if k != "task.temp")
    assert sum(v.numel() for v in copy.values()) < sum(p.numel() for p in built.backbone.model.parameters()) / 10


def test_training_steps_enqueue_the_momentum_features_of_each_batch():
    """Step 2's queue slots hold the features of the model whose trainable tensors are the EMA, computed here
    by hand (0.995 · before + 0.005 · after step 1) and loaded into a second copy of the model."""
    built = _recipe_task(**RECIPE)
    built.backbone.model.eval()
    opt = torch.optim.SGD(list(built.trainable_state().values()), lr=0.5)
    batch1, _ = _batch(built.backbone, [0, 1])
    batch2, tok2 = _batch(built.backbone, [2, 3])
    before = {k: v.detach().clone() for k, v in built.trainable_state().items()}
    _step(built, batch1, opt, 0)
    after = {k: v.detach().clone() for k, v in built.trainable_state().items()}
    assert not torch.equal(before["adapters.0.lambda_b.text_0_attn_q"], after["adapters.0.lambda_b.text_0_attn_q"])
    queue = built.task._queue
    assert queue.ids.tolist()[:4] == [0, 1, -100, -100] and int(queue.ptr) == 2
    _step(built, batch2, opt, 1)
    assert queue.ids.tolist()[:4] == [0, 1, 2, 3] and int(queue.ptr) == 4
    with torch.no_grad():  # the momentum model by hand: EMA of the trainable tensors, in place in the live model
        for k, v in built.trainable_state().items():
            if k != "task.temp":
                v.copy_(0.995 * before[k] + 0.005 * after[k])
        emb = built.backbone.encode_image(batch2["image"])
        image_m = built.backbone.image_feat(emb)
        text_m = built.backbone.text_feat(built.backbone.encode_text(**tok2))
    torch.testing.assert_close(queue.image[2:4], image_m, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(queue.text[2:4], text_m, atol=1e-6, rtol=1e-5)


def test_learned_temperature_is_clamped_and_trains():
    built = _recipe_task(learn_temperature=True)
    temp = built.trainable_state()["task.temp"]
    assert float(temp.detach()) == pytest.approx(0.07)  # the alignment loss's temperature: the tiny preset has no `temp`
    with torch.no_grad():
        temp.fill_(0.9)
    batch, _ = _batch(built.backbone, [0, 1, 2])
    terms = built.task.training_step(built.backbone, batch, built.alignment)
    assert float(temp.detach()) == pytest.approx(0.5)  # BLIP's clamp to [0.001, 0.5]
    sum(terms.values()).backward()
    assert temp.grad is not None and float(temp.grad) != 0.0


def test_task_state_is_tensors_only_and_round_trips():
    built = _recipe_task(**RECIPE)
    opt = torch.optim.SGD(list(built.trainable_state().values()), lr=0.5)
    _step(built, _batch(built.backbone, [0, 1])[0], opt, 0)
    state = built.task.state_dict()
    assert {"queue.image", "queue.text", "queue.ids", "queue.ptr"} <= set(state)
    assert all(torch.is_tensor(v) for v in state.values())
    fresh = _recipe_task(**RECIPE)
    fresh.task.load_state_dict({k: v.clone() for k, v in state.items()})
    for k, v in fresh.task.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_queue_and_distillation_need_the_momentum_encoder():
    with pytest.raises(UserError, match="momentum"):
        _recipe_task(queue_size=8)


def test_without_the_recipe_the_step_is_unchanged():
    """All recipe fields off: no task tensors, no state, the same losses as before the recipe existed."""
    built = _recipe_task()
    assert "task" not in built.trainable and built.task.state_dict() == {}
    randomise_(built.adapters[0].lambda_b.values(), seed=2, std=0.3)
    batch, _ = _batch(built.backbone, [0, 1, 1])
    torch.manual_seed(0)
    terms = built.task.training_step(built.backbone, batch, built.alignment)
    image_feat = built.backbone.image_feat(built.backbone.encode_image(batch["image"]))
    tok = built.backbone.tokenize(batch["caption"], "cpu")
    text_feat = built.backbone.text_feat(built.backbone.encode_text(**tok))
    sim = image_feat @ text_feat.t() / 0.07
    pos = batch["image_id"][:, None] == batch["image_id"][None, :]
    target = pos.float() / pos.float().sum(1, keepdim=True)
    ref = (-(F.log_softmax(sim, 1) * target).sum(1).mean() - (F.log_softmax(sim.t(), 1) * target).sum(1).mean()) / 2
    torch.testing.assert_close(terms["itc_loss"], ref, atol=1e-6, rtol=1e-5)



@pytest.mark.parametrize("decay", ["matrices", "all"])
def test_decay_all_is_blips_adamw_over_every_trainable_tensor(decay):
    """BLIP's ``AdamW(model.parameters(), lr, weight_decay)`` decays vectors (VCRA's λ, biases) too: one step with
    zero gradients moves a tensor only by the decay, ``p <- p (1 - lr wd)``."""
    from types import SimpleNamespace

    from unitrans.engine.loop import make_optimizer
    from unitrans.spec import TrainSpec

    tr = TrainSpec(lr=0.1, weight_decay=0.5, decay=decay)
    state = {"B": torch.nn.Parameter(torch.ones(3, 2)), "lambda_b": torch.nn.Parameter(torch.ones(3))}
    optim = make_optimizer(state, tr, SimpleNamespace(total=10, steps_per_epoch=10), torch.device("cpu"))
    for p in state.values():
        p.grad = torch.zeros_like(p)
    optim.opt.step()
    assert torch.allclose(state["B"], torch.full((3, 2), 1 - 0.1 * 0.5))
    expected = 1 - 0.1 * 0.5 if decay == "all" else 1.0
    assert torch.allclose(state["lambda_b"], torch.full((3,), expected))
