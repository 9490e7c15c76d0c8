"""Training-step time and peak memory of the retrieval task on the BLIP-base architecture (random init).

A step is the real code path of ``unitrans run``: ``Retrieval.training_step`` (ITC or ITC + MCAM on the unimodal
features, ITM on hard negatives through the fusion encoder), ``backward()`` and an ``AdamW`` step over
``built.trainable_state()``, in train mode. Every configuration lives in its own interpreter (so one
configuration's allocations cannot hide in another's peak), is built and warmed up once, then the driver asks the
configurations for ``--steps`` steps each, interleaved over ``--rounds`` rounds in a rotating order (all live
interpreters but one wait idle on stdin); the table shows medians of every measured step.

Rows:
  full          backbone.freeze = false, ITC + ITM (Table 7's "1.00")
  floor         frozen backbone; one trainable scalar multiplies the output of the vision embeddings and one that
                of the text embeddings, so backward runs through every activation of every tower but computes
                no weight gradient: the least any method that trains something inside the towers can cost
  lora          our LoRA r=32 on vision / text / fusion q, k, v (vision slices of the fused qkv)
  vcra          our VCRA r=64 on the same points (one shared A, B; trained)
  vcra+qasn+mcam  the paper's configuration (examples/paper/flickr30k_vcra.toml)
  uniadapter-r128, uniadapter-r512, vera-r64  the paper's comparison rows (COMPARISON_CONFIGS; Table 7)
  PEFT comparison (text + fusion q, k, v only: PEFT cannot target row slices of the fused vision qkv; the "x
  floor" of these rows is against floor@tf, the floor with a trainable scalar on the text embeddings only):
  floor@tf,
  peft-lora, peft-vera (peft.inject_adapter_in_model on the text encoder), lora@tf, vcra@tf (A, B trained),
  vcra-frozenAB@tf (train_projections = false: the same trainable set as VeRA)

Memory: CPU: peak RSS of the worker process sampled every 2 ms by a thread during the measured steps, minus the
RSS after imports and before the model is built (so it holds weights, gradients, optimizer state and
activations, like ``torch.cuda.max_memory_allocated``). CUDA: ``torch.cuda.max_memory_allocated``.

  python benchmarks/train_step.py                       # 2-core CPU default: 2 layers per branch, ~6 min
  python benchmarks/train_step.py --layers 12 --rounds 3  # full BLIP-base depth
  python benchmarks/train_step.py --device cuda --layers 12 --image-size 384 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VCRA64 = {"name": "vcra.v1", "rank": 64, "targets": C.PAPER_TARGETS}
LORA32 = {"name": "lora.v1", "rank": 32, "targets": C.PAPER_TARGETS}
CONFIGS = {
    "full": dict(freeze=False),
    "floor": dict(floor=True),
    "lora": dict(adapters=[LORA32]),
    "vcra": dict(adapters=[VCRA64]),
    "vcra+qasn+mcam": dict(adapters=[VCRA64], side="qasn.v1", alignment="mcam.v1"),
    "floor@tf": dict(floor="text"),
    "peft-lora@tf": dict(peft="lora"),
    "peft-vera@tf": dict(peft="vera"),
    "lora@tf": dict(adapters=[dict(LORA32, targets=C.TEXT_FUSION_TARGETS)]),
    "vcra@tf": dict(adapters=[dict(VCRA64, targets=C.TEXT_FUSION_TARGETS)]),
    "vcra-frozenAB@tf": dict(adapters=[dict(VCRA64, targets=C.TEXT_FUSION_TARGETS, train_projections=False)]),
}
# The paper's comparison rows: Table 7's UniAdapter r=128 and r=512 (the published adapter on every sub-block point),
# and VeRA r=64 on the paper's points. One list, added to CONFIGS: `--configs full,uniadapter-r128,uniadapter-r512,
# vcra+qasn+mcam` gives Table 7's retrieval columns as ratios to full fine-tuning in one run.
COMPARISON_CONFIGS = {
    "uniadapter-r128": dict(adapters=[{"name": "uniadapter.v1", "rank": 128}]),
    "uniadapter-r512": dict(adapters=[{"name": "uniadapter.v1", "rank": 512}]),
    "vera-r64": dict(adapters=[{"name": "vera.v1", "rank": 64, "targets": C.PAPER_TARGETS}]),
}
CONFIGS.update(COMPARISON_CONFIGS)


# ---- worker ----------------------------------------------------------------------------------------------------
def _floor_hooks(backbone, towers: str):
    """Trainable scalars on the embedding outputs (``towers``: "all" = vision and text, "text" = text only):
    gradients flow through every activation of those towers, no weight gradient is computed."""
    import torch
    from torch import nn

    m = backbone.model
    scalars = nn.ParameterDict({"text": nn.Parameter(torch.ones(()))})
    m.text_encoder.embeddings.register_forward_hook(lambda mod, a, out: out * scalars["text"])
    if towers == "all":
        scalars["vision"] = nn.Parameter(torch.ones(()))
        m.vision_model.embeddings.register_forward_hook(lambda mod, a, out: out * scalars["vision"])
    return scalars


def _peft_inject(backbone, kind: str):
    """PEFT's LoRA r=32 / VeRA r=64 on the text encoder's query/key/value (self- and cross-attention)."""
    from peft import LoraConfig, VeraConfig, inject_adapter_in_model
    from peft.tuners.vera import VeraModel

    targets = ["query", "key", "value"]
    if kind == "lora":
        inject_adapter_in_model(LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules=targets),
                                backbone.model.text_encoder)
        tuner = None
    else:  # VeRA keeps its shared A, B on the tuner, so inject_adapter_in_model refuses it: wrap in place instead
        cfg = VeraConfig(r=64, vera_dropout=0.0, target_modules=targets, projection_prng_key=0, save_projection=True)
        tuner = VeraModel(backbone.model.text_encoder, cfg, "default")
    names = [n for n, p in backbone.model.named_parameters() if p.requires_grad]
    assert names and all(("lora_" in n or "vera_" in n) for n in names), names[:5]
    return tuner


def worker(job: dict) -> None:
    import torch

    C.cut_layers("base", job["layers"])
    device = job["device"]
    torch.manual_seed(0)
    cfg = CONFIGS[job["name"]]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base_rss = C.rss_bytes()
    data = C.spec_dict("base", job["image_size"], freeze=cfg.get("freeze", True), adapters=cfg.get("adapters", ()),
                       side=cfg.get("side"), alignment=cfg.get("alignment", "itc.v1"))
    spec, built = C.build_from_dict(data, device)
    extra = {}
    if cfg.get("floor"):
        towers = "all" if cfg["floor"] is True else cfg["floor"]
        extra = dict(_floor_hooks(built.backbone, towers).to(device).named_parameters())
    if cfg.get("peft"):
        tuner = _peft_inject(built.backbone, cfg["peft"])  # noqa: F841 (kept alive for the run)
    state = dict(built.trainable_state(), **{f"floor.{k}": v for k, v in extra.items()})
    n_trainable = sum(p.numel() for p in state.values())
    decay = [p for p in state.values() if p.ndim >= 2]
    no_decay = [p for p in state.values() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4)
    batch = C.synthetic_batch(job["batch_size"], job["image_size"], device)
    built.backbone.model.train()
    built.trainable.train()
    seq_len = built.backbone.tokenize(batch["caption"], "cpu")["input_ids"].shape[1]

    def step():
        opt.zero_grad(set_to_none=True)
        terms = built.task.training_step(built.backbone, batch, built.alignment)
        sum(terms.values()).backward()
        for adapter in built.adapters:  # as the training loop does
            adapter.clear_cache()
        opt.step()

    for _ in range(job["warmup"]):
        step()
    C.sync(device)
    info = {"name": job["name"], "trainable": n_trainable, "seq_len": seq_len,
            "memory_metric": "cuda.max_memory_allocated" if device.startswith("cuda") else "peak RSS - import RSS"}
    C.emit(dict(info, ready=True))
    for line in sys.stdin:  # the driver says "run N" for every round, then closes stdin
        n = int(line.split()[1])
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        with C.RssPeak() as mem:
            for _ in range(n):
                t0 = time.perf_counter()
                step()
                C.sync(device)
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else mem.peak - base_rss
        C.emit(dict(info, times=times, peak_bytes=peak))


def checkpoint_size(toml_path: Path) -> dict:
    """Size of ``adapter.safetensors`` for a spec's architecture (random init, no download), as ``unitrans run``
    writes it with :func:`unitrans.engine.checkpoint.save_adapter`."""
    import os
    import tempfile
    import tomllib

    from unitrans.engine.checkpoint import save_adapter

    data = tomllib.loads(Path(toml_path).read_text())
    data["backbone"]["random_init"] = True
    spec, built = C.build_from_dict(data)
    with tempfile.TemporaryDirectory() as d:
        manifest = save_adapter(built, spec, Path(d))
        size = os.path.getsize(Path(d) / "adapter.safetensors")
    return {"spec": str(toml_path), "numel": manifest["numel"], "bytes": size, "MB": size / 1e6,
            "tensors": len(manifest["tensors"])}


# ---- driver ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=2, help="transformer layers per branch (BLIP-base: 12)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per configuration and round")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every configuration")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    ap.add_argument("--checkpoint-size", metavar="SPEC", nargs="?", const="examples/paper/flickr30k_vcra.toml",
                    help="only report the adapter checkpoint size of SPEC's architecture (default: the paper's "
                         "Flickr30K configuration) and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.checkpoint_size:
        res = dict(checkpoint_size(Path(args.checkpoint_size)), machine=C.machine())
        print(f"{res['spec']}: adapter.safetensors {res['bytes']:,} bytes = {res['MB']:.3f} MB "
              f"({res['numel']:,} fp32 values in {res['tensors']} tensors)")
        print(f"wrote {C.write_json('checkpoint_size.json', res)}")
        return 0

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    setting = dict(device=args.device, layers=args.layers, image_size=args.image_size, batch_size=args.batch_size,
                   warmup=args.warmup, steps=args.steps, rounds=args.rounds)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    t_start = time.time()
    workers = {}
    for name in names:  # one live interpreter per configuration, built and warmed up once
        workers[name] = C.Worker(Path(__file__), dict(setting, name=name))
        print(f"  built {name} ({workers[name].ready['trainable']:,} trainable)", file=sys.stderr, flush=True)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate so no config always runs first
        for name in order:
            res = workers[name].ask(f"run {args.steps}")
            runs[name].append(res)
            print(f"  round {r + 1}/{args.rounds} {name:18s} median {C.median(res['times']):.3f} s  "
                  f"peak {res['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    for w in workers.values():
        w.close()
    rows = []
    for name in names:
        times = [t for res in runs[name] for t in res["times"]]
        rows.append({"config": name, "step_s": C.median(times), "min_s": min(times), "max_s": max(times),
                     "round_medians_s": [C.median(res["times"]) for res in runs[name]],
                     "peak_mib": C.median([res["peak_bytes"] for res in runs[name]]) / 2**20,
                     "trainable": runs[name][0]["trainable"], "seq_len": runs[name][0]["seq_len"]})
    by = {r["config"]: r for r in rows}
    for r in rows:
        if "full" in by:
            r["time_vs_full"] = r["step_s"] / by["full"]["step_s"]
            r["mem_vs_full"] = r["peak_mib"] / by["full"]["peak_mib"]
        floor = "floor@tf" if r["config"].endswith("@tf") else "floor"  # the floor of the same towers
        if floor in by:
            r["time_vs_floor"] = r["step_s"] / by[floor]["step_s"]
        if "peft-vera@tf" in by and r["config"].startswith("vcra") and r["config"].endswith("@tf"):
            r["time_vs_peft_vera"] = r["step_s"] / by["peft-vera@tf"]["step_s"]
        if "floor@tf" in by and r["config"].endswith("@tf"):  # the adapter's own cost, over the text-only floor
            r["overhead_ms"] = 1e3 * (r["step_s"] - by["floor@tf"]["step_s"])
        if "peft-lora@tf" in by and r["config"] == "lora@tf":
            r["time_vs_peft_lora"] = r["step_s"] / by["peft-lora@tf"]["step_s"]
    mem_metric = runs[names[0]][0]["memory_metric"]
    header = (f"BLIP-base architecture, random init, {args.layers} layer(s) per branch (vision, text/fusion), "
              f"{args.image_size} px, batch {args.batch_size}, text length {rows[0]['seq_len']} tokens, fp32, "
              f"device {args.device}; median of {args.steps} steps x {args.rounds} interleaved rounds after "
              f"{args.warmup} warm-up steps; memory = {mem_metric}")
    cols = [("config", "config", ""), ("trainable", "# trainable", ","), ("step_s", "step (s)", ".3f"),
            ("min_s", "min (s)", ".3f"), ("time_vs_full", "x full", ".2f"), ("time_vs_floor", "x floor", ".2f"),
            ("time_vs_peft_vera", "x PEFT VeRA", ".2f"), ("time_vs_peft_lora", "x PEFT LoRA", ".2f"),
            ("overhead_ms", "over floor@tf (ms)", ".0f"),
            ("peak_mib", "peak mem (MiB)", ".0f"), ("mem_vs_full", "mem x full", ".2f")]
    print(header)
    print(C.table(rows, cols))
    payload = {"setting": setting, "header": header, "machine": C.machine(), "rows": rows,
               "wall_s": time.time() - t_start, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    dev = args.device.split(":")[0]
    path = C.write_json(f"train_step_{dev}{'_' + args.tag if args.tag else ''}.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
