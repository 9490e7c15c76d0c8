"""GPU check of sharded training and of the memory estimate, for a machine with CUDA GPUs (a few minutes).

    python benchmarks/fsdp_check.py --out runs/fsdp_check          # 1 GPU: memory; 2+ GPUs: also FSDP vs 1 GPU

1. Memory: for the tiny BLIP-2 retrieval and LLaVA captioning quickstarts (batch 32, fp32 and bf16 autocast), the
   estimate of ``unitrans params --memory`` against ``torch.cuda.max_memory_allocated`` of one real training step.
2. With 2 or more GPUs: the BLIP-2 quickstart trained 4 steps on 1 GPU and with ``train.strategy = "fsdp"`` on 2
   (nccl), ITC only (ITM's hard negatives are drawn per rank by design); the adapters must agree within 1e-3
   (TF32 and reduction order aside).

Prints one JSON object per check and writes them to ``--out/fsdp_check.json``. The CPU suite covers the same
paths with gloo (``tests/test_fsdp.py``, ``tests/test_memory.py``); this script is for the GPU kernels and nccl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]
SPECS = {"blip2_retrieval": ROOT / "examples" / "quickstart_blip2.toml",
         "llava_caption": ROOT / "examples" / "quickstart_llava.toml"}


def memory_check(name: str, precision: str) -> dict:
    """Estimate against the measured peak of one training step on cuda:0 (bytes)."""
    from unitrans.engine.build import build
    from unitrans.engine.memory import estimate_memory, synthetic_batch
    from unitrans.spec import load_spec

    spec = load_spec(SPECS[name], [f"train.precision={precision}", "train.batch_size=32", "train.device=cuda"])
    torch.manual_seed(0)
    estimate = estimate_memory(build(spec, "meta", with_data=False), spec)["ddp"]
    built = build(spec, "cuda", with_data=False)
    built.backbone.model.train()
    batch = synthetic_batch(32, built.backbone.image_size, built.backbone.max_text_length, "cuda")
    opt = torch.optim.AdamW(list(built.trainable_state().values()), lr=1e-3)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        terms = built.task.training_step(built.backbone, batch, built.alignment)
    sum(terms.values()).backward()
    opt.step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    return {"check": "memory", "spec": name, "precision": precision, "estimate_bytes": estimate,
            "measured_bytes": measured, "ratio": estimate / measured}


def fsdp_check(out: Path) -> dict:
    """1 GPU against FSDP on 2 GPUs: the largest difference of any adapter tensor after 4 steps."""
    from safetensors.torch import load_file

    common = ["--set", f"data.root={out / 'data'}", "--set", "data.n_train=256", "--set", "train.max_steps=4",
              "--set", "train.batch_size=16", "--set", "task.itm_weight=0", "--set", "task.rerank=itc",
              "--set", "eval.at_start=false", "--set", "train.progress=false", "--set", "train.device=cuda"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "plugins")]))
    for run, extra in (("one", []), ("fsdp", ["--nproc-per-node", "2", "--set", "train.strategy=fsdp"])):
        subprocess.run([sys.executable, "-m", "unitrans", "run", str(SPECS["blip2_retrieval"]), "--output-dir",
                        str(out / run), *common, *extra], env=env, check=True)
    one, two = (load_file(str(out / run / "adapter.safetensors")) for run in ("one", "fsdp"))
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    return {"check": "fsdp_2gpu_vs_1gpu", "max_abs_diff": worst, "ok": worst < 1e-3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fsdp_check"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: the CPU suite covers these paths (tests/test_fsdp.py, tests/test_memory.py)")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    results = [memory_check(name, precision) for name in SPECS for precision in ("fp32", "bf16")]
    if torch.cuda.device_count() >= 2:
        results.append(fsdp_check(args.out))
    for r in results:
        print(json.dumps(r))
    (args.out / "fsdp_check.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
