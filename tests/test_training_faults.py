"""Training at scale without losing work: 2 processes equal 1, resume after SIGKILL is bit-identical, an interrupted
checkpoint write leaves the previous one loadable, a non-finite loss stops the run with the step named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unitrans import cli
from unitrans.engine import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "examples" / "quickstart.toml")


def _args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    return [
        "run", QUICKSTART, "--output-dir", str(tmp_path / out),
        "--set", f"data.root={tmp_path / 'data'}", "--set", "data.n_train=96", "--set", "data.n_val=4",
        "--set", "data.n_test=8", "--set", "train.batch_size=16", "--set", "train.progress=false",
        "--set", "train.log_every=1", "--set", "task.k_test=4", "--set", "eval.at_start=false",
        "--set", "train.tensorboard=false",
        *extra,
    ]


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter.safetensors"))


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_two_processes_equal_one(tmp_path):
    """Same global batches, differentiable gathers and DDP averaging: the same adapter weights and metrics.

    ITM is off: its hard negatives are drawn from each rank's local batch, which differs by design.
    """
    extra = ("--set", "train.max_steps=4", "--set", "task.itm_weight=0", "--set", "task.rerank=itc")
    assert cli.main(_args(tmp_path, "one", *extra)) == 0
    _run_subprocess([*_args(tmp_path, "two", *extra), "--nproc-per-node", "2"])
    one, two = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-4, rtol=1e-4, msg=k)  # fp sums in another order, through 4 Adam steps
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["world_size"] == 2
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"):
        assert abs(m1[key] - m2[key]) < 1e-6, key
    log1 = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    log2 = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [round(r["loss"], 5) for r in log1] == [round(r["loss"], 5) for r in log2]


def _run_subprocess(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "unitrans", *args], env=_subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    # every run in a subprocess with the same environment (thread count included): bit-identity is the claim
    extra = ("--set", "train.max_steps=18", "--set", "train.checkpoint_every=3")
    _run_subprocess(_args(tmp_path, "full", *extra))

    cmd = [sys.executable, "-m", "unitrans", *_args(tmp_path, "killed", *extra)]
    proc = subprocess.Popen(cmd, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if log.is_file():
            steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line.strip()]
            if steps and steps[-1] >= 7:
                proc.send_signal(signal.SIGKILL)
                killed_at = steps[-1]
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_at is not None and killed_at < 18, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "adapter.safetensors").exists()

    _run_subprocess(_args(tmp_path, "killed", *extra, "--resume"))
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "killed")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_interrupted_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    good = {"trainable": {"w": torch.arange(4.0)}, "step": 3}
    ckpt.save_resume_checkpoint(root, "step_00000003", good, keep_last=2)

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")  # a partial write, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_resume_checkpoint(root, "step_00000006", {"trainable": {"w": torch.zeros(4)}, "step": 6}, keep_last=2)
    monkeypatch.setattr(torch, "save", real_save)

    latest = ckpt.find_resume_checkpoint(root)
    assert latest == root / "step_00000003"
    assert not (root / "step_00000006").exists()
    state = ckpt.load_resume_checkpoint(latest)
    assert torch.equal(state["trainable"]["w"], torch.arange(4.0)) and state["step"] == 3
    with pytest.raises(Exception, match="not a complete checkpoint"):
        ckpt.load_resume_checkpoint(next(root.glob(".step_00000006.tmp-*")))


def test_keep_last_prunes_old_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        ckpt.save_resume_checkpoint(root, f"step_{step:08d}", {"step": step}, keep_last=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000006", "step_00000009"]
    assert (root / "latest").read_text() == "step_00000009"


def test_nonfinite_loss_stops_with_the_step_named(tmp_path, monkeypatch, capsys):
    from unitrans.tasks.retrieval import Retrieval

    real = Retrieval.training_step
    calls = {"n": 0}

    def poisoned(self, backbone, batch, alignment):
        terms = real(self, backbone, batch, alignment)
        calls["n"] += 1
        if calls["n"] == 5:
            terms["itc_loss"] = terms["itc_loss"] * float("nan")
        return terms

    monkeypatch.setattr(Retrieval, "training_step", poisoned)
    code = cli.main(_args(tmp_path, "nan", "--set", "train.max_steps=8", "--set", "train.checkpoint_every=2"))
    err = capsys.readouterr().err
    assert code == 2
    assert "non-finite loss at step 5" in err and "Traceback" not in err
    assert "step_00000004" in err  # the last good checkpoint is named, and kept
    assert ckpt.find_resume_checkpoint(tmp_path / "nan" / "checkpoints").name == "step_00000004"
