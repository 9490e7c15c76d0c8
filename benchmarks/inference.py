"""Inference time: frozen BLIP, BLIP + VCRA (unmerged: forward hooks), BLIP + VCRA merged into the weights.

Two models of the same random-init BLIP-base architecture live in one process: the frozen backbone, and the same
backbone with the paper's VCRA (r=64 on vision / text / fusion q, k, v; λb randomised so the update is not zero).
The VCRA model is merged and unmerged between measurements (``VCRA.merge()`` / ``unmerge()``), and the three
states are timed interleaved over ``--rounds`` rounds, ``--repeats`` forwards each, in eval mode under
``torch.no_grad()`` (as ``Retrieval.evaluate`` runs). Measured forwards, per batch:

  features   encode_image + image_feat, encode_text + text_feat (the ITC pass of retrieval evaluation)
  itm        fuse + itm_logits on (text, image tokens) pairs (the re-ranking pass)

It also counts the forward hooks on the model's linears in each state: merged must be 0 (no adapter code on the
path), and checks that merged and unmerged outputs agree.

  python benchmarks/inference.py                       # 2-core CPU default: 4 layers per branch, ~2 min
  python benchmarks/inference.py --layers 12 --image-size 384 --batch-size 16 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def linear_hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules() if isinstance(m, torch.nn.Linear))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4, help="transformer layers per branch (BLIP-base: 12)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per state and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    dev = args.device
    C.cut_layers("base", args.layers)
    t_start = time.time()

    torch.manual_seed(0)
    _, frozen = C.build_from_dict(C.spec_dict("base", args.image_size), dev)
    torch.manual_seed(0)
    vcra_spec = {"name": "vcra.v1", "rank": 64, "targets": C.PAPER_TARGETS}
    _, adapted = C.build_from_dict(C.spec_dict("base", args.image_size, adapters=[vcra_spec]), dev)
    adapter = adapted.adapters[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.lambda_b.values():  # a trained-looking, non-zero update
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    for b in (frozen, adapted):
        b.backbone.model.eval()
        b.trainable.eval()

    batch = C.synthetic_batch(args.batch_size, args.image_size, dev)
    tok = frozen.backbone.tokenize(batch["caption"], dev)

    def features(bb):
        img = bb.encode_image(batch["image"])
        return bb.image_feat(img), bb.text_feat(bb.encode_text(**tok)), img

    with torch.no_grad():
        image_embeds = frozen.backbone.encode_image(batch["image"])  # ITM input: the same tokens for every state

    def itm(bb):
        return bb.itm_logits(bb.fuse(tok["input_ids"], tok["attention_mask"], image_embeds))

    states = {"frozen": (frozen, None), "vcra unmerged": (adapted, "unmerge"), "vcra merged": (adapted, "merge")}
    hooks, times = {}, {(s, w): [] for s in states for w in ("features", "itm")}
    outputs = {}
    merged = False
    with torch.no_grad():
        for r in range(args.rounds):
            order = list(states)[r % 3:] + list(states)[:r % 3]
            for name in order:
                built, action = states[name]
                if action == "merge" and not merged:
                    adapter.merge()
                    merged = True
                if action == "unmerge" and merged:
                    adapter.unmerge()
                    merged = False
                hooks[name] = linear_hooks(built.backbone.model)
                for what, fn in (("features", features), ("itm", itm)):
                    out = fn(built.backbone)  # warm-up, and the output compared below
                    outputs[(name, what)] = out[0] if isinstance(out, tuple) else out
                    for _ in range(args.repeats):
                        C.sync(dev)
                        t0 = time.perf_counter()
                        fn(built.backbone)
                        C.sync(dev)
                        times[(name, what)].append(time.perf_counter() - t0)
    diff = {w: float((outputs[("vcra merged", w)] - outputs[("vcra unmerged", w)]).abs().max()) for w in ("features", "itm")}
    rows = []
    for name in states:
        row = {"state": name, "linear_hooks": hooks[name]}
        for what in ("features", "itm"):
            row[f"{what}_s"] = C.median(times[(name, what)])
            row[f"{what}_vs_frozen"] = row[f"{what}_s"] / C.median(times[("frozen", what)])
        rows.append(row)
    header = (f"BLIP-base architecture, random init, {args.layers} layer(s) per branch, {args.image_size} px, batch "
              f"{args.batch_size} (features: images + texts; itm: {args.batch_size} pairs), fp32, device {dev}, "
              f"no_grad + eval; median of {args.repeats} x {args.rounds} interleaved rounds. VCRA r=64 on "
              f"vision/text/fusion q,k,v. max |merged - unmerged|: features {diff['features']:.2e}, itm {diff['itm']:.2e}")
    cols = [("state", "state", ""), ("linear_hooks", "hooks on linears", "d"), ("features_s", "features (s)", ".4f"),
            ("features_vs_frozen", "x frozen", ".3f"), ("itm_s", "ITM forward (s)", ".4f"),
            ("itm_vs_frozen", "x frozen", ".3f")]
    print(header)
    print(C.table(rows, cols))
    payload = {"setting": vars(args), "header": header, "machine": C.machine(), "rows": rows,
               "max_abs_diff_merged_vs_unmerged": diff,
               "all_times_s": {f"{s}/{w}": v for (s, w), v in times.items()}, "wall_s": time.time() - t_start,
               "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    path = C.write_json(f"inference_{dev.split(':')[0]}{'_' + args.tag if args.tag else ''}.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
