"""Training-step time and peak memory of the retrieval task on the BLIP-base architecture (random init).

A step is the real code path of ``unitrans run``: ``Retrieval.training_step`` (ITC or ITC + MCAM on the unimodal
features, ITM on hard negatives through the fusion encoder), ``backward()`` and an ``AdamW`` step over
``built.trainable_state()``, in train mode. Every configuration runs in its own interpreter (so one
configuration's allocations cannot hide in another's peak), is built and warmed up, then runs ``--steps`` steps;
the configurations are interleaved over ``--rounds`` rounds in a rotating order, and the table shows medians of
every measured step.

Rows:
  full          backbone.freeze = false, ITC + ITM (Table 7's "1.00")
  floor         frozen backbone; a trainable scalar is attached to the output of the vision embeddings and one
                to that of the text embeddings (identity in forward, zero gradient for the scalar, nothing
                saved), so backward runs through every activation of every tower but computes no weight
                gradient: the least any method that trains something inside the towers can cost
  lora          our LoRA r=32 on vision / text / fusion q, k, v (vision slices of the fused qkv)
  vcra          our VCRA r=64 on the same points (one shared A, B; trained)
  vcra+qasn+mcam  the paper's configuration (examples/paper/flickr30k_vcra.toml)
  uniadapter-r128, uniadapter-r512, vera-r64  the paper's comparison rows (COMPARISON_CONFIGS; Table 7)
  PEFT comparison (text + fusion q, k, v only: PEFT cannot target row slices of the fused vision qkv; the "x
  floor" of these rows is against floor@tf, the floor with a trainable scalar on the text embeddings only):
  floor@tf,
  peft-lora, peft-vera (peft.inject_adapter_in_model on the text encoder), lora@tf, vcra@tf (A, B trained),
  vcra-frozenAB@tf (train_projections = false: the same trainable set as VeRA)

Exact figures (machine-independent; ``_cost.py``), measured once per configuration on one step after warm-up:
FLOPs of the forward and of backward + optimizer (``FlopCounterMode``: matrix products, convolutions,
attention; elementwise work not counted), bytes autograd saves for backward (unique storages, parameters and
buffers excluded), and the peak of tensor bytes alive during the step (on top of weights and optimizer state),
with ``A-inputs``: the bytes of the distinct inputs of the adapters' targeted linears that need saving, the
bound on what a trained shared A adds over the floor.

Timing and memory (machine-dependent): CPU: peak RSS of the worker process sampled every 2 ms by a thread during
the measured steps, minus the RSS after imports and before the model is built. CUDA:
``torch.cuda.max_memory_allocated``.

Workers: by default one interpreter at a time, each built fresh for every (round, configuration), in an order
that rotates every round (the same interleaving as before, and only one model in memory: a 12-layer run fits a
24 GB machine). ``--keep-alive`` keeps one interpreter per configuration for the whole run (faster at small
depth; needs memory for all of them at once). A worker that dies is reported with its cause (exit status,
signal, the kernel's OOM killer) and the run goes on without that configuration.

  python benchmarks/train_step.py                                  # 2-core CPU default: 2 layers per branch
  python benchmarks/train_step.py --layers 12 --rounds 2 --steps 2   # full BLIP-base depth (24 GB machine)
  python benchmarks/train_step.py --layers 12 --exact-only           # the exact columns only (one step each)
  python benchmarks/train_step.py --layers 12 --profile vcra         # where the time goes, per op group
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
PAPER = dict(adapters=[VCRA64], side="qasn.v1", alignment="mcam.v1")
CONFIGS = {
    "full": dict(freeze=False),
    "floor": dict(floor=True),
    "lora": dict(adapters=[LORA32]),
    "vcra": dict(adapters=[VCRA64]),
    "vcra/per-call": dict(adapters=[VCRA64], per_call=True),
    "vcra+qasn+mcam": PAPER,
    "vcra+qasn+mcam/per-call": dict(PAPER, per_call=True),
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
    """Trainable scalars attached to the embedding outputs (``towers``: "all" = vision and text, "text" = text
    only): gradients flow through every activation of those towers, no weight gradient is computed."""
    import torch
    from _cost import touch
    from torch import nn

    m = backbone.model
    scalars = nn.ParameterDict({"text": nn.Parameter(torch.ones(()))})
    m.text_encoder.embeddings.register_forward_hook(lambda mod, a, out: touch(out, scalars["text"]))
    if towers == "all":
        scalars["vision"] = nn.Parameter(torch.ones(()))
        m.vision_model.embeddings.register_forward_hook(lambda mod, a, out: touch(out, scalars["vision"]))
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


def _adapted_linears(built, cfg) -> list:
    """The frozen linears that carry a trained update (ours: the adapters' points; PEFT: its wrapped layers)."""
    mods = {id(p.module): p.module for a in built.adapters for p in getattr(a, "points", [])}
    if cfg.get("peft"):
        mods.update({id(m): m for n, m in built.backbone.model.named_modules()
                     if n.endswith(("query.base_layer", "key.base_layer", "value.base_layer"))})
    return list(mods.values())


class _AInputs:
    """While active, the distinct storages of the inputs of ``linears`` in forwards with grad enabled (``bytes``):
    what training a down-projection shared by those linears must keep for its gradient."""

    def __init__(self, linears, exclude: set[int]):
        self.linears, self.exclude, self.seen, self.bytes, self.handles = linears, exclude, set(), 0, []

    def _pre(self, mod, args) -> None:
        import torch

        st = args[0].untyped_storage()
        if torch.is_grad_enabled() and st.data_ptr() not in self.exclude and st.data_ptr() not in self.seen:
            self.seen.add(st.data_ptr())
            self.bytes += st.nbytes()

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self._pre) for m in self.linears]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class Setup:
    """One configuration, built: the model, the optimizer over the trainable tensors and a fixed batch."""

    def __init__(self, job: dict):
        import torch

        preset = job.get("preset", "base")
        C.cut_layers(preset, job["layers"])
        self.device, self.cfg = job["device"], CONFIGS[job["name"]]
        self.bf16 = job.get("precision", "fp32") == "bf16"  # autocast around the forward, as `unitrans run` does
        cfg = self.cfg
        torch.manual_seed(0)
        data = C.spec_dict(preset, job["image_size"], freeze=cfg.get("freeze", True),
                           adapters=cfg.get("adapters", ()), side=cfg.get("side"),
                           alignment=cfg.get("alignment", "itc.v1"))
        self.spec, self.built = C.build_from_dict(data, self.device)
        built, extra = self.built, {}
        if cfg.get("per_call"):  # caches stay inside one attention's call (no A x shared across calls)
            for adapter in built.adapters:
                adapter.reuse_across_calls = False
        if cfg.get("floor"):
            towers = "all" if cfg["floor"] is True else cfg["floor"]
            extra = dict(_floor_hooks(built.backbone, towers).to(self.device).named_parameters())
        if cfg.get("peft"):
            self.tuner = _peft_inject(built.backbone, cfg["peft"])  # kept alive for the run
        self.state = dict(built.trainable_state(), **{f"floor.{k}": v for k, v in extra.items()})
        params = list(self.state.values())
        self.opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
                                      {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=1e-4)
        self.batch = C.synthetic_batch(job["batch_size"], job["image_size"], self.device)
        built.backbone.model.train()
        built.trainable.train()
        self.seq_len = built.backbone.tokenize(self.batch["caption"], "cpu")["input_ids"].shape[1]

    def forward(self):
        import torch

        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.bf16):
            terms = self.built.task.training_step(self.built.backbone, self.batch, self.built.alignment)
        return sum(terms.values())

    def backward_and_step(self, loss) -> None:
        loss.backward()
        self.opt.step()

    def step(self) -> None:
        self.backward_and_step(self.forward())

    def model_tensors(self) -> list:
        """Weights, buffers, optimizer state: what lives whatever the step does."""
        import torch

        model = self.built.backbone.model
        ts = [*model.parameters(), *model.buffers(), *self.built.trainable.parameters(), *self.state.values()]
        for st in self.opt.state.values():
            ts += [v for v in st.values() if isinstance(v, torch.Tensor)]
        return ts

    def exact(self) -> dict:
        """FLOPs, saved bytes, A-inputs and peak step bytes of one step (``_cost.py``)."""
        import _cost

        tensors = self.model_tensors()
        exclude = _cost.model_storages(tensors)
        resident = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
        flops = _cost.count_flops(self.forward, self.backward_and_step)
        with _AInputs(_adapted_linears(self.built, self.cfg), exclude) as rec:
            mem = _cost.memory_costs(self.forward, self.backward_and_step, exclude)
        return dict(flops, **mem, a_inputs_bytes=rec.bytes, resident_bytes=resident)


def worker(job: dict) -> None:
    import torch

    device = job["device"]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base_rss = C.rss_bytes()
    s = Setup(job)
    for _ in range(job["warmup"]):
        s.step()
    C.sync(device)
    info = {"name": job["name"], "trainable": sum(p.numel() for p in s.state.values()), "seq_len": s.seq_len,
            "memory_metric": "cuda.max_memory_allocated" if device.startswith("cuda") else "peak RSS - import RSS"}
    if job.get("exact"):
        info["exact"] = s.exact()
    C.emit(dict(info, ready=True))
    for line in sys.stdin:  # "run N" (measure N steps) or "profile"; the driver then closes stdin
        if line.startswith("profile"):
            C.emit(dict(info, profile=profile_step(s)))
            continue
        n = int(line.split()[1])
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        with C.RssPeak() as mem:
            for _ in range(n):
                t0 = time.perf_counter()
                s.step()
                C.sync(device)
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else mem.peak - base_rss
        C.emit(dict(info, times=times, peak_bytes=peak))


# ---- where the time goes -----------------------------------------------------------------------------------------
OP_GROUPS = [  # (group, substrings of aten op names), first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul",
                "aten::_mkl", "aten::convolution", "aten::_convolution", "aten::mkldnn")),
    ("attention softmax", ("softmax",)),
    ("norm", ("layer_norm", "native_layer_norm")),
    ("activation", ("gelu", "sigmoid", "tanh", "relu")),
    ("optimizer", ("_foreach", "adam", "lerp", "addcdiv", "addcmul")),
    ("copy / layout", ("copy_", "cat", "clone", "contiguous", "to_copy", "_to_copy", "expand", "permute",
                       "transpose", "view", "reshape", "slice", "select", "index", "gather", "scatter", "t")),
    ("elementwise", ("add", "mul", "div", "sub", "where", "masked", "fill", "zero", "ones", "empty", "rsub",
                     "neg", "pow", "sqrt", "exp", "log", "clamp", "dropout", "bernoulli")),
    ("reduction", ("sum", "mean", "max", "min", "norm", "topk", "multinomial", "nll", "cross_entropy")),
]


def op_group(name: str) -> str:
    short = name.split("::")[-1]
    for group, keys in OP_GROUPS:
        if any(k == name or k.split("::")[-1] in short for k in keys):
            return group
    return "other"


def profile_step(s: Setup) -> dict:
    """Self CPU (or CUDA) time of one step per op group, from ``torch.profiler``: ``{group: [ms, calls]}``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        s.step()
        C.sync(s.device)
    groups: dict[str, list[float]] = {}
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        t = (ev.self_device_time_total if s.device.startswith("cuda") else ev.self_cpu_time_total) / 1e3
        g = groups.setdefault(op_group(ev.key), [0.0, 0])
        g[0] += t
        g[1] += ev.count
    return {k: v for k, v in sorted(groups.items(), key=lambda kv: -kv[1][0])}


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
def _rotations(names: list[str], rounds: int):
    for r in range(rounds):
        yield r, names[r % len(names):] + names[:r % len(names)]  # rotate so no config always runs first


def collect(names: list[str], setting: dict, keep_alive: bool, exact_only: bool, partial=None) -> tuple[dict, dict]:
    """Run the rounds; returns ``(runs by config, failures by config)``. One interpreter at a time unless
    ``keep_alive``; every interpreter is ended before this returns, whatever happens. ``partial(runs, failed)``
    is called after every result (the driver saves what it has, so a run cut short keeps it)."""
    runs: dict[str, list[dict]] = {n: [] for n in names}
    failed: dict[str, str] = {}
    live: dict[str, C.Worker] = {}
    script = Path(__file__)
    rounds = 1 if exact_only else setting["rounds"]
    try:
        for r, order in _rotations(names, rounds):
            for name in order:
                if name in failed:
                    continue
                try:
                    w = live.get(name)
                    if w is None:
                        w = C.Worker(script, dict(setting, name=name, exact=not runs[name]))
                        if keep_alive:
                            live[name] = w
                    res = dict(w.ready, times=[], peak_bytes=None) if exact_only else w.ask(f"run {setting['steps']}")
                    if not keep_alive:
                        w.close()
                except C.WorkerDied as exc:
                    failed[name] = str(exc).splitlines()[0]
                    print(f"  {failed[name]}", file=sys.stderr, flush=True)
                    live.pop(name, None)
                    continue
                res.setdefault("exact", w.ready.get("exact"))
                runs[name].append(res)
                if partial is not None:
                    partial(runs, failed)
                msg = (f"median {C.median(res['times']):.3f} s  peak {res['peak_bytes'] / 2**20:.0f} MiB"
                       if res["times"] else "exact figures")
                print(f"  round {r + 1}/{rounds} {name:24s} {msg}", file=sys.stderr, flush=True)
    finally:
        for w in live.values():
            w.close()
    return runs, failed


def rows_of(names, runs) -> list[dict]:
    """One row per configuration that ran: timing medians and the exact figures of its first run."""
    rows = []
    for name in names:
        if not runs[name]:
            continue
        times = [t for res in runs[name] for t in res["times"]]
        peaks = [res["peak_bytes"] for res in runs[name] if res["peak_bytes"] is not None]
        ex = next((res["exact"] for res in runs[name] if res.get("exact")), {})
        row = {"config": name, "trainable": runs[name][0]["trainable"], "seq_len": runs[name][0]["seq_len"]}
        if times:
            row.update(step_s=C.median(times), min_s=min(times), max_s=max(times),
                       round_medians_s=[C.median(res["times"]) for res in runs[name]])
        if peaks:
            row["peak_mib"] = C.median(peaks) / 2**20
        if ex:
            row.update(gflop=ex["total"] / 1e9, fwd_gflop=ex["forward"] / 1e9, saved_mib=ex["saved_bytes"] / 2**20,
                       a_inputs_mib=ex["a_inputs_bytes"] / 2**20, peak_step_mib=ex["peak_step_bytes"] / 2**20,
                       resident_mib=ex["resident_bytes"] / 2**20,
                       exact_mem_mib=(ex["peak_step_bytes"] + ex["resident_bytes"]) / 2**20, exact=ex)
        rows.append(row)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Ratios to full fine-tuning, to the floor of the same towers, to PEFT; the saved bytes over the floor."""
    by = {r["config"]: r for r in rows}

    def ratio(r, key, other, out):
        if other in by and r.get(key) is not None and by[other].get(key):
            r[out] = r[key] / by[other][key]

    for r in rows:
        floor = "floor@tf" if r["config"].endswith("@tf") else "floor"  # the floor of the same towers
        ratio(r, "step_s", "full", "time_vs_full")
        ratio(r, "peak_mib", "full", "mem_vs_full")
        ratio(r, "step_s", floor, "time_vs_floor")
        ratio(r, "peak_mib", floor, "mem_vs_floor")
        ratio(r, "gflop", floor, "flop_vs_floor")
        ratio(r, "saved_mib", floor, "saved_vs_floor")
        ratio(r, "exact_mem_mib", floor, "exact_mem_vs_floor")
        ratio(r, "exact_mem_mib", "full", "exact_mem_vs_full")
        if floor in by and r.get("saved_mib") is not None and by[floor].get("saved_mib") is not None:
            r["saved_over_floor_mib"] = r["saved_mib"] - by[floor]["saved_mib"]
        if r["config"].startswith("vcra") and r["config"].endswith("@tf"):
            ratio(r, "step_s", "peft-vera@tf", "time_vs_peft_vera")
        if r["config"] == "lora@tf":
            ratio(r, "step_s", "peft-lora@tf", "time_vs_peft_lora")
        if "floor@tf" in by and r["config"].endswith("@tf") and r.get("step_s") and by["floor@tf"].get("step_s"):
            r["overhead_ms"] = 1e3 * (r["step_s"] - by["floor@tf"]["step_s"])


EXACT_COLS = [("config", "config", ""), ("trainable", "# trainable", ","), ("gflop", "GFLOP/step", ".1f"),
              ("flop_vs_floor", "FLOP x floor", ".4f"), ("saved_mib", "saved (MiB)", ".1f"),
              ("saved_vs_floor", "saved x floor", ".3f"), ("saved_over_floor_mib", "saved over floor (MiB)", ".2f"),
              ("a_inputs_mib", "A-inputs (MiB)", ".2f"), ("exact_mem_mib", "weights+opt+peak (MiB)", ".0f"),
              ("exact_mem_vs_floor", "mem x floor", ".3f"), ("exact_mem_vs_full", "mem x full", ".3f")]
TIME_COLS = [("config", "config", ""), ("step_s", "step (s)", ".3f"), ("min_s", "min (s)", ".3f"),
             ("time_vs_full", "x full", ".2f"), ("time_vs_floor", "x floor", ".2f"),
             ("time_vs_peft_vera", "x PEFT VeRA", ".2f"), ("time_vs_peft_lora", "x PEFT LoRA", ".2f"),
             ("overhead_ms", "over floor@tf (ms)", ".0f"), ("peak_mib", "peak mem (MiB)", ".0f"),
             ("mem_vs_floor", "mem x floor", ".2f"), ("mem_vs_full", "mem x full", ".2f")]


def profile_main(args, name: str) -> int:
    """Print (and save) where one step of ``name`` spends its time, by op group."""
    setting = dict(device=args.device, layers=args.layers, image_size=args.image_size, batch_size=args.batch_size,
                   warmup=max(1, args.warmup), name=name, exact=False)
    w = C.Worker(Path(__file__), setting)
    try:
        res = w.ask("profile")["profile"]
    finally:
        w.close()
    total = sum(v[0] for v in res.values())
    rows = [{"group": g, "ms": v[0], "share": v[0] / total, "calls": v[1]} for g, v in res.items()]
    print(f"{name}: {args.layers} layers, {args.image_size} px, batch {args.batch_size}, one step, self time by "
          f"op group (total {total:.0f} ms)")
    print(C.table(rows, [("group", "op group", ""), ("ms", "self time (ms)", ".0f"), ("share", "share", ".1%"),
                         ("calls", "calls", "d")]))
    tag = f"_{args.tag}" if args.tag else ""
    fname = "profile_{}_{}{}.json".format(name.replace("/", "-"), args.device.split(":")[0], tag)
    print(f"wrote {C.write_json(fname, dict(setting=setting, rows=rows, machine=C.machine()))}")
    return 0


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
    ap.add_argument("--keep-alive", action="store_true",
                    help="one live interpreter per configuration for the whole run (memory for all at once)")
    ap.add_argument("--exact-only", action="store_true", help="only the machine-independent columns (one step each)")
    ap.add_argument("--profile", metavar="CONFIG", help="print one step's self time per op group and exit")
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
    unknown = [n for n in names + ([args.profile] if args.profile else []) if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    if args.profile:
        return profile_main(args, args.profile)
    setting = dict(device=args.device, layers=args.layers, image_size=args.image_size, batch_size=args.batch_size,
                   warmup=args.warmup, steps=args.steps, rounds=args.rounds)
    t_start = time.time()
    dev = args.device.split(":")[0]
    fname = f"train_step_{dev}{'_' + args.tag if args.tag else ''}.json"

    def partial(runs, failed):
        rows = rows_of(names, runs)
        add_ratios(rows)
        C.write_json(fname, {"setting": setting, "partial": True, "rows": rows, "failed": failed})

    runs, failed = collect(names, setting, args.keep_alive, args.exact_only, partial)
    rows = rows_of(names, runs)
    add_ratios(rows)
    seq = rows[0]["seq_len"] if rows else "?"
    mem_metric = "cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS - import RSS"
    header = (f"BLIP-base architecture, random init, {args.layers} layer(s) per branch (vision, text/fusion), "
              f"{args.image_size} px, batch {args.batch_size}, text length {seq} tokens, fp32, device {args.device}")
    print(header + "\nExact (one step; FLOPs of matrix products/attention; saved = bytes autograd keeps for "
          "backward; mem = weights + optimizer state + peak tensor bytes of the step):")
    print(C.table(rows, EXACT_COLS))
    if not args.exact_only:
        print(f"\nTimed: median of {args.steps} steps x {args.rounds} interleaved rounds after {args.warmup} "
              f"warm-up step(s); memory = {mem_metric}")
        print(C.table(rows, TIME_COLS))
    for name, why in failed.items():
        print(f"FAILED {name}: {why}")
    payload = {"setting": setting, "header": header, "machine": C.machine(), "rows": rows, "failed": failed,
               "wall_s": time.time() - t_start, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    path = C.write_json(fname, payload)
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
