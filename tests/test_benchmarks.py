"""The benchmark scripts' own machinery: the GPU suite's smoke mode (tiny sizes on the CPU), the exact cost
counters, and the worker driver naming a dead worker's cause."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gpu_suite_smoke_writes_every_section(tmp_path):
    import gpu_suite
    from unitrans_blip import backbone as blip

    before = {k: dict(v) for k, v in blip.PRESETS.items()}
    out = tmp_path / "suite.json"
    assert gpu_suite.main(["--smoke", "--out", str(out)]) == 0
    assert blip.PRESETS == before  # the suite cut the tiny preset's depth in this process and put it back
    res = json.loads(out.read_text())
    rows = res["train"]["rows"]
    assert {(r["config"], r["precision"]) for r in rows} == {(c, p) for c in gpu_suite.TRAIN_CONFIGS
                                                             for p in ("bf16", "fp32")}
    assert all(r["time_vs_full"] == 1.0 for r in rows if r["config"] == "full")
    ev = res["eval"]
    # one image's keys and values once for its candidate texts costs fewer FLOPs than once per pair
    assert ev["once per image"]["gflop_per_pair"] < ev["once per pair"]["gflop_per_pair"]
    assert [r["workers"] for r in res["loader"]["rows"]] == [0, 1]
    assert all(r["images_per_s"] > 0 for r in res["loader"]["rows"])


def test_saved_bytes_count_each_storage_once_and_skip_parameters():
    import _cost

    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    with _cost.SavedBytes(_cost.model_storages([w])) as saved:
        h = torch.tanh(x @ w)  # mm keeps x (and w, a parameter); tanh keeps its output
        y = h * h  # keeps h twice: one storage
    assert saved.bytes == x.untyped_storage().nbytes() + h.untyped_storage().nbytes()
    assert saved.storages == 2 and saved.tensors >= 4
    del y


def test_live_bytes_peak_counts_what_is_alive_at_once():
    import _cost

    with _cost.LiveBytes() as live:
        a = torch.ones(1000)  # 4000 bytes
        b = torch.ones(2000)  # 8000 bytes
        del a
        c = torch.ones(500)  # 2000 bytes, after a died
        del b, c
    assert live.peak == 12000 and live.live == 0


def test_a_dead_worker_is_named_with_its_signal(tmp_path):
    import _common as C

    script = tmp_path / "die.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    with pytest.raises(C.WorkerDied, match=r"worker cfg-x died: killed by SIGKILL"):
        C.Worker(script, {"name": "cfg-x"})
    assert "killed by SIGTERM" in C.exit_cause(-signal.SIGTERM, None)
    assert C.exit_cause(3, None) == "exit status 3"
