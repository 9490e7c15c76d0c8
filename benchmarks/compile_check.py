"""Does ``torch.compile`` pay for a training step? (issue 19, item 5.)

For each configuration: the eager step's median, then the same model with every transformer layer of the frozen
backbone compiled in place (``nn.Module.compile``: the adapters' forward hooks on the layers' linears are traced
with them), the first compiled step (compile time included) and the median of the next steps. One configuration
per interpreter, one after another.

  python benchmarks/compile_check.py --layers 12                       # 2-core CPU, BLIP-base depth
  python benchmarks/compile_check.py --layers 12 --device cuda --image-size 384 --batch-size 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

CONFIGS = ("floor", "vcra", "vcra+qasn+mcam")


def _layers(model):
    """The transformer layers of BLIP's towers: every element of an ``nn.ModuleList`` named ``layer(s)``."""
    from torch import nn

    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers"):
            out.extend(module)
    return out


def _timed(step, device: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        C.sync(device)
        times.append(time.perf_counter() - t0)
    return times


def worker(job: dict) -> None:
    import torch

    from train_step import Setup

    s = Setup(job)
    s.step()  # warm-up (lazy kernels, allocator)
    eager = _timed(s.step, job["device"], job["steps"])
    layers = _layers(s.built.backbone.model)
    for layer in layers:
        layer.compile()
    t0 = time.perf_counter()
    try:
        s.step()
    except Exception as exc:  # a compiler failure is a result too
        C.emit({"name": job["name"], "eager_s": C.median(eager), "error": f"{type(exc).__name__}: {exc}"[:300]})
        return
    first = time.perf_counter() - t0
    compiled = _timed(s.step, job["device"], job["steps"])
    C.emit({"name": job["name"], "layers_compiled": len(layers), "eager_s": C.median(eager),
            "first_compiled_s": first, "compiled_s": C.median(compiled)})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS))
    args = p.parse_args(argv)
    rows = []
    for name in args.configs.split(","):
        job = dict(name=name, device=args.device, layers=args.layers, image_size=args.image_size,
                   batch_size=args.batch_size, steps=args.steps)
        try:
            r = C.run_worker(Path(__file__), job, timeout=3600)
        except C.WorkerDied as exc:
            r = {"name": name, "error": str(exc)}
        if "compiled_s" in r:
            r["compiled_x_eager"] = r["compiled_s"] / r["eager_s"]
        rows.append(r)
        print(r, flush=True)
    print(C.table(rows, [("name", "config", ""), ("eager_s", "eager (s)", ".3f"),
                         ("first_compiled_s", "first compiled step (s)", ".1f"),
                         ("compiled_s", "compiled (s)", ".3f"), ("compiled_x_eager", "compiled x eager", ".2f"),
                         ("error", "error", "")]))
    name = f"compile_{args.device.split(':')[0]}_l{args.layers}.json"
    print(f"wrote {C.write_json(name, {'machine': C.machine(), 'rows': rows, 'args': vars(args)})}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        import json

        worker(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
