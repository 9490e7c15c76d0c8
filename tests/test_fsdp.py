"""Sharded training (``train.strategy = "fsdp"``, ``torch.distributed.fsdp.fully_shard``) on the CPU with gloo.

In-process (default suite): which blocks are sharded, and a step through the sharded model gives the unsharded
model's loss and adapter gradients. Two processes (slow): a 2-process FSDP run ends with the 1-process run's
adapter weights, resumes from its checkpoint to the same weights, and its adapter exports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unitrans import cli

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "examples" / "quickstart_blip2.toml")
TARGETS = 'adapters.0.targets=["vision.attn.*", "fusion.attn.*", "fusion.mlp.*"]'  # points that merge (export)


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-process gloo group (FSDP needs a process group; one rank shards nothing but runs every code path)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _built(checkpointing: bool = False):
    """A tiny BLIP-2 with VCRA and QASN, trainable tensors moved off their init (the same on every call)."""
    from test_blip2 import build, perturb, spec

    d = spec([{"name": "vcra.v1", "targets": ["vision.attn.*", "fusion.*", "text.attn.*"], "rank": 4}],
             side_network={"name": "qasn.v1"})
    d["backbone"]["gradient_checkpointing"] = checkpointing
    built = build(d)
    perturb(built.trainable)
    return built


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(4, 3, 64, 64, generator=g), "caption": ["a red circle", "two blue squares",
            "a green star left of a circle", "a yellow triangle"], "image_id": torch.arange(4)}


def _step(module, built, batch):
    torch.manual_seed(7)  # ITM draws its hard negatives from the global generator
    terms = module(batch)
    loss = sum(terms.values())
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in built.trainable.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sharded_step_equals_the_plain_step(one_rank_group, checkpointing):
    from torch.distributed.tensor import DTensor

    from unitrans.engine.loop import _StepModule
    from unitrans.engine.strategy import ShardedStep, shard_units

    built, plain_built = _built(checkpointing), _built()
    built.backbone.model.train()  # checkpointing recomputes in training mode only
    plain_built.backbone.model.train()
    units = shard_units(built.backbone.model)
    # every ViT layer and every Q-Former layer, nothing else (embeddings, heads, query tokens stay whole)
    cfg = built.backbone.model.config
    assert len(units) == cfg.vision_config.num_hidden_layers + cfg.qformer_config.num_hidden_layers
    batch = _batch()
    loss0, grads0 = _step(_StepModule(plain_built), plain_built, batch)
    sharded = ShardedStep(_StepModule(built), torch.device("cpu"))
    assert sharded.units == len(units)
    assert all(isinstance(p, DTensor) for u in units for p in u.parameters())
    assert not any(isinstance(p, DTensor) for p in built.trainable.parameters())
    loss1, grads1 = _step(sharded, built, batch)
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=1e-6)
    assert grads1.keys() == grads0.keys()
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], atol=1e-6, rtol=1e-5, msg=k)


def test_sharded_step_in_bf16_follows_the_fp32_step(one_rank_group):
    """Mixed precision: the blocks compute in bf16 (FSDP's policy), the adapters' gradients stay float32 and point
    where the float32 step's do (cosine > 0.95; bf16 keeps 8 bits of mantissa)."""
    from unitrans.engine.loop import _StepModule
    from unitrans.engine.strategy import ShardedStep

    built, plain_built = _built(), _built()
    batch = _batch()
    loss0, grads0 = _step(_StepModule(plain_built), plain_built, batch)
    loss1, grads1 = _step(ShardedStep(_StepModule(built), torch.device("cpu"), "bf16"), built, batch)
    assert all(g.dtype == torch.float32 for g in grads1.values())
    assert not torch.equal(loss1, loss0)  # the blocks did compute in bf16
    torch.testing.assert_close(loss1, loss0, atol=0, rtol=2e-2)
    for k, g in grads0.items():
        if g.norm() > 0:
            assert torch.nn.functional.cosine_similarity(grads1[k].flatten(), g.flatten(), dim=0) > 0.95, k


def _args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    return ["run", QUICKSTART, "--output-dir", str(tmp_path / out),
            "--set", f"data.root={tmp_path / 'data'}", "--set", "data.n_train=96", "--set", "data.n_val=4",
            "--set", "data.n_test=8", "--set", "train.batch_size=16", "--set", "train.progress=false",
            "--set", "train.log_every=1", "--set", "task.k_test=4", "--set", "eval.at_start=false",
            "--set", "train.tensorboard=false", "--set", "task.itm_weight=0", "--set", "task.rerank=itc",
            "--set", TARGETS, *extra]


def _two_processes(args: list[str]) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, "-m", "unitrans", *args, "--nproc-per-node", "2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter.safetensors"))


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_resume_and_export(tmp_path):
    """ITC (ITM off: its hard negatives come from each rank's local batch by design), 4 AdamW steps."""
    assert cli.main(_args(tmp_path, "one", "--set", "train.max_steps=4")) == 0
    fsdp = ("--set", "train.strategy=fsdp", "--set", "train.max_steps=4")
    _two_processes(_args(tmp_path, "two", "--set", "train.checkpoint_every=2", *fsdp))
    halfway = tmp_path / "two" / "checkpoints" / "step_00000002"
    _two_processes(_args(tmp_path, "resumed", "--set", f"train.resume={halfway}", *fsdp))  # steps 3 and 4
    one = _adapter(tmp_path / "one")
    for run in ("two", "resumed"):
        other = _adapter(tmp_path / run)
        assert other.keys() == one.keys()
        for k in one:  # float sums in another order, through 4 Adam steps
            torch.testing.assert_close(other[k], one[k], atol=1e-4, rtol=1e-4, msg=f"{run}: {k}")
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    # the adapter an FSDP run wrote is whole: it merges and exports in one process, and loads with transformers
    assert cli.main(["export", QUICKSTART, "--checkpoint", str(tmp_path / "two"), "--out", str(tmp_path / "hf"),
                     "--set", TARGETS]) == 0
    from transformers import Blip2ForImageTextRetrieval

    assert Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "hf")).config.num_query_tokens == 8
