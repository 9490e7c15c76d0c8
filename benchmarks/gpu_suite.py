"""One run on an NVIDIA GPU, within about 8 minutes: the training-step table at BLIP-base size, evaluation
throughput and data-loader throughput, as JSON, with Table 7's counterpart printed.

  python benchmarks/gpu_suite.py                 # on a machine with a GPU (needs no download)
  python benchmarks/gpu_suite.py --smoke         # tiny sizes on the CPU (what the test suite runs)

Sections (each is skipped, and says so in the JSON, once ``--budget-s`` is spent):

1. **train**: ``Retrieval.training_step`` + backward + AdamW, as ``benchmarks/train_step.py`` runs it (full
   fine-tuning, the floor, LoRA r=32, VCRA r=64, VCRA + QASN + MCAM), on the BLIP-base architecture (random init,
   12 layers per branch, 384 px, batch 32), in bf16 (autocast) and fp32. Time: median of the measured steps after
   warm-up (``torch.cuda.synchronize`` around each); memory: ``torch.cuda.max_memory_allocated`` over the measured
   steps (weights, optimizer state, activations). Table 7's counterpart: time and memory as fractions of full
   fine-tuning in the same precision.
2. **eval**: ITM re-ranking pairs/s (``Retrieval._rerank``, one image's 128 candidate texts per chunk as Flickr30K's
   k_test = 128 gives), with the image's cross-attention keys and values computed once per image (this
   repository's path) and once per pair (one image copy per pair, the path of a backbone that cannot broadcast),
   bf16, with the paper's VCRA + QASN attached; with the FLOPs of a pair, the time of a Flickr30K test
   evaluation (768,000 pairs) follows.
3. **loader**: images/s one DataLoader worker delivers (decode PNG, random resized crop, flip, normalise at
   384 px; the synthetic shapes data, generated in a temporary folder) against the images/s the GPU consumes in
   the paper configuration's bf16 step: the workers a run needs to keep the GPU fed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import train_step as T  # noqa: E402

TRAIN_CONFIGS = ["full", "floor", "lora", "vcra", "vcra+qasn+mcam"]
FULL_SIZE = dict(preset="base", layers=12, image_size=384, batch_size=32, warmup=2, steps=5, itm_pairs=128,
                 eval_chunks=3, loader_images=320, loader_workers=[1, 2, 4], precisions=["bf16", "fp32"])
SMOKE_SIZE = dict(preset="tiny", layers=1, image_size=64, batch_size=4, warmup=1, steps=1, itm_pairs=8,
                  eval_chunks=1, loader_images=16, loader_workers=[0, 1], precisions=["bf16", "fp32"])


class Budget:
    """Wall-clock budget of the whole suite: ``left()`` seconds, ``over()`` once spent."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.time(), seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)

    def over(self) -> bool:
        return self.left() <= 0


def _peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def train_row(size: dict, device: str, name: str, precision: str) -> dict:
    """Build one configuration on ``device``, warm up, time ``steps`` steps; its memory peak."""
    job = dict(device=device, preset=size["preset"], layers=size["layers"], image_size=size["image_size"],
               batch_size=size["batch_size"], name=name, precision=precision)
    s = T.Setup(job)
    for _ in range(size["warmup"]):
        s.step()
    C.sync(device)
    _peak_reset(device)
    times = []
    for _ in range(size["steps"]):
        t0 = time.perf_counter()
        s.step()
        C.sync(device)
        times.append(time.perf_counter() - t0)
    row = {"config": name, "precision": precision, "step_s": C.median(times), "times": times,
           "peak_bytes": _peak(device), "trainable": sum(p.numel() for p in s.state.values()),
           "images_per_s": size["batch_size"] / C.median(times)}
    del s
    _free(device)
    return row


def train_section(size: dict, device: str, budget: Budget) -> dict:
    rows, skipped = [], []
    for precision in size["precisions"]:
        for name in TRAIN_CONFIGS:
            if budget.over():
                skipped.append(f"{name} {precision}")
                continue
            rows.append(train_row(size, device, name, precision))
            print(f"  train {name:16s} {precision}: {rows[-1]['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    full = {r["precision"]: r for r in rows if r["config"] == "full"}
    for r in rows:
        f = full.get(r["precision"])
        if f:
            r["time_vs_full"] = r["step_s"] / f["step_s"]
            if r["peak_bytes"] and f["peak_bytes"]:
                r["mem_vs_full"] = r["peak_bytes"] / f["peak_bytes"]
    return {"rows": rows, "skipped": skipped}


def eval_section(size: dict, device: str, budget: Budget) -> dict:
    """Re-ranking pairs/s and FLOPs per pair, with one image's keys/values computed once and once per pair."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if budget.over():
        return {"skipped": "budget"}
    C.cut_layers(size["preset"], size["layers"])
    data = C.spec_dict(size["preset"], size["image_size"], adapters=[T.VCRA64], side="qasn.v1",
                       k_test=size["itm_pairs"], itm_batch=size["itm_pairs"])
    _, built = C.build_from_dict(data, device)
    bb, task = built.backbone, built.task
    bb.model.eval()
    n_img, k = size["eval_chunks"], size["itm_pairs"]
    cfg = bb.model.config.vision_config
    n_tok = (size["image_size"] // cfg.patch_size) ** 2 + 1
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(n_img, n_tok, cfg.hidden_size, generator=g)
    texts = [C.CAPTIONS[i % len(C.CAPTIONS)] for i in range(k)]
    tok = bb.tokenize(texts, "cpu")
    sims = torch.randn(n_img, k, generator=g)
    out = {"pairs": n_img * k, "text_tokens": int(tok["input_ids"].shape[1]), "image_tokens": n_tok}
    for label, broadcast in (("once per image", True), ("once per pair", False)):
        bb.fuse_broadcasts_image = broadcast
        with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            with FlopCounterMode(display=False) as fc:
                task._rerank(bb, sims[:1], embeds[:1], tok, device, image_queries=True)
            C.sync(device)
            t0 = time.perf_counter()
            task._rerank(bb, sims, embeds, tok, device, image_queries=True)
            C.sync(device)
            dt = time.perf_counter() - t0
        out[label] = {"pairs_per_s": n_img * k / dt, "gflop_per_pair": fc.get_total_flops() / k / 1e9}
    per_pair = out["once per image"]
    out["flickr30k_pairs"] = 768_000
    out["flickr30k_rerank_s"] = 768_000 / per_pair["pairs_per_s"]
    del built, bb, task
    _free(device)
    return out


def loader_section(size: dict, device: str, budget: Budget, consume_images_per_s: float | None) -> dict:
    """Images/s of a DataLoader with N workers over the shapes data at the model's input size."""
    from torch.utils.data import DataLoader

    from unitrans.engine.build import build
    from unitrans.spec import validate_dict

    if budget.over():
        return {"skipped": "budget"}
    rows = []
    with tempfile.TemporaryDirectory() as root:
        C.cut_layers(size["preset"], size["layers"])
        data = C.spec_dict(size["preset"], size["image_size"])
        data["data"] = {"name": "shapes_retrieval.v1", "root": root, "n_train": size["loader_images"], "n_val": 4,
                        "n_test": 4, "image_size": size["image_size"]}
        built = build(validate_dict(data), "cpu", with_data=True)
        bb = built.backbone
        dm = built.data.setup(bb.image_size, bb.image_mean, bb.image_std)
        for workers in size["loader_workers"]:
            if budget.over():
                break
            loader = DataLoader(dm.train, batch_size=size["batch_size"], shuffle=True, collate_fn=dm.collate,
                                num_workers=workers, persistent_workers=False)
            t0, n = time.perf_counter(), 0
            for batch in loader:
                n += len(batch["image"])
            dt = time.perf_counter() - t0  # includes starting the workers, as each epoch of a run does
            rows.append({"workers": workers, "images_per_s": n / dt,
                         "images_per_s_per_worker": n / dt / max(workers, 1)})
        del built, dm
    out = {"rows": rows, "gpu_consumes_images_per_s": consume_images_per_s}
    per_worker = [r["images_per_s_per_worker"] for r in rows if r["workers"] == 1]
    if consume_images_per_s and per_worker:
        out["workers_needed"] = math.ceil(consume_images_per_s / per_worker[0])
    return out


def table7(train: dict) -> str:
    rows = [dict(r, peak_gib=(r["peak_bytes"] or 0) / 2**30) for r in train["rows"]]
    return C.table(rows, [("config", "config", ""), ("precision", "precision", ""), ("step_s", "step (s)", ".3f"),
                          ("time_vs_full", "time x full", ".2f"), ("peak_gib", "peak (GiB)", ".2f"),
                          ("mem_vs_full", "memory x full", ".2f"), ("images_per_s", "images/s", ".1f")])


def run_suite(smoke: bool, device: str, budget_s: float) -> dict:
    """Every section; the preset's depth is cut for the run and restored after it (the suite may run in-process)."""
    from unitrans_blip import backbone as blip

    size = SMOKE_SIZE if smoke else FULL_SIZE
    saved = dict(blip.PRESETS[size["preset"]])
    try:
        return _sections(size, device, Budget(budget_s))
    finally:
        blip.PRESETS[size["preset"]] = saved


def _sections(size: dict, device: str, budget: Budget) -> dict:
    result: dict = {"size": size, "device": device, "smoke": size is SMOKE_SIZE, "machine": C.machine()}
    result["train"] = train_section(size, device, budget)
    consume = next((r["images_per_s"] for r in result["train"]["rows"]
                    if r["config"] == "vcra+qasn+mcam" and r["precision"] == "bf16"), None)
    result["eval"] = eval_section(size, device, budget)
    result["loader"] = loader_section(size, device, budget, consume)
    result["wall_s"] = time.time() - budget.t0
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (for the test suite)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip what is left after this many seconds")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_suite_<device>.json)")
    args = ap.parse_args(argv)
    import torch

    device = args.device or ("cpu" if args.smoke else "cuda")
    if args.smoke:
        torch.set_num_threads(1)  # tiny models: one thread is fastest and does not fight other jobs
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; run it on a machine with an NVIDIA GPU, or use --smoke",
              file=sys.stderr)
        return 2
    result = run_suite(args.smoke, device, args.budget_s)
    print("Table 7 counterpart (time and memory as fractions of full fine-tuning, same precision):")
    print(table7(result["train"]))
    ev = result["eval"]
    if "once per image" in ev:
        print(f"eval: {ev['once per image']['pairs_per_s']:.1f} pairs/s with keys/values once per image "
              f"({ev['once per image']['gflop_per_pair']:.2f} GFLOP/pair), {ev['once per pair']['pairs_per_s']:.1f} "
              f"once per pair ({ev['once per pair']['gflop_per_pair']:.2f}); Flickr30K re-ranking "
              f"~{ev['flickr30k_rerank_s'] / 60:.1f} min")
    for r in result["loader"].get("rows", []):
        print(f"loader: {r['workers']} worker(s): {r['images_per_s']:.1f} images/s")
    if result["loader"].get("workers_needed"):
        print(f"loader: the GPU consumes {result['loader']['gpu_consumes_images_per_s']:.1f} images/s: "
              f"{result['loader']['workers_needed']} worker(s) keep it fed")
    name = f"gpu_suite_{device.split(':')[0]}{'_smoke' if args.smoke else ''}.json"
    path = Path(args.out) if args.out else C.RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
