"""ITM re-ranking of retrieval evaluation: ``Retrieval._rerank`` (chunks of ``itm_batch`` pairs) against a naive
loop (one ITM forward per pair), throughput and peak memory, for several ``k_test`` and two data-set sizes.

Each data-set size runs in its own interpreter on the frozen BLIP-base architecture (random init). Image tokens
``(I, N, Dv)`` and ITC similarities are synthetic (re-ranking does not depend on their values); there are 5
captions per image, and the queries are the images (image -> text re-ranking, ``I x k`` pairs). Memory: peak RSS
sampled every 2 ms during the call, minus the RSS just before it (the image tokens, the model and the tokenised
texts are already resident, so the figure is what re-ranking itself allocates). The naive loop scores the first
``--naive-pairs`` pairs only (its rate does not depend on how many).

  python benchmarks/retrieval_eval.py                           # 2-core CPU default, ~3 min
  python benchmarks/retrieval_eval.py --layers 12 --sizes 64,256 --k 16,128 --itm-batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def worker(job: dict) -> None:
    import torch

    C.cut_layers("base", job["layers"])
    dev = job["device"]
    torch.manual_seed(0)
    _, built = C.build_from_dict(C.spec_dict("base", job["image_size"], itm_batch=job["itm_batch"]), dev)
    bb, task = built.backbone, built.task
    bb.model.eval()
    n_img = job["size"]
    cfg = bb.model.config.vision_config
    n_tok = (job["image_size"] // cfg.patch_size) ** 2 + 1
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(n_img, n_tok, cfg.hidden_size, generator=g)  # (I, N, Dv) on the CPU, as evaluate keeps it
    texts = [C.CAPTIONS[(i * 3 + j) % len(C.CAPTIONS)] for i in range(n_img) for j in range(5)]
    tok = bb.tokenize(texts, "cpu")
    sims = torch.randn(n_img, len(texts), generator=g)  # (I, T)
    results = []
    with torch.no_grad():
        bb.itm_logits(bb.fuse(tok["input_ids"][:2].to(dev), tok["attention_mask"][:2].to(dev),
                              embeds[:2].to(dev)))  # warm-up
        for k in job["k"]:
            task.k_test = k
            C.sync(dev)
            if dev.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            before = C.rss_bytes()
            t0 = time.perf_counter()
            with C.RssPeak() as mem:
                task._rerank(bb, sims, embeds, tok, dev, image_queries=True)
                C.sync(dev)
            dt = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() if dev.startswith("cuda") else mem.peak - before
            results.append({"method": f"_rerank (itm_batch {job['itm_batch']})", "k": k, "pairs": n_img * k,
                            "seconds": dt, "pairs_per_s": n_img * k / dt, "peak_bytes": peak})
        # naive: one ITM forward per pair, over the first pairs of the largest k
        k = max(job["k"])
        top = sims.topk(k, dim=1).indices
        pairs = [(i, int(top[i, j])) for i in range(n_img) for j in range(k)][: job["naive_pairs"]]
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        before = C.rss_bytes()
        t0 = time.perf_counter()
        with C.RssPeak() as mem:
            for i, t in pairs:
                bb.itm_logits(bb.fuse(tok["input_ids"][t:t + 1].to(dev), tok["attention_mask"][t:t + 1].to(dev),
                                      embeds[i:i + 1].to(dev)))
            C.sync(dev)
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if dev.startswith("cuda") else mem.peak - before
        results.append({"method": "naive per-pair loop", "k": k, "pairs": len(pairs), "seconds": dt,
                        "pairs_per_s": len(pairs) / dt, "peak_bytes": peak})
    C.emit({"size": n_img, "texts": len(texts), "embeds_bytes": embeds.numel() * 4, "results": results})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=2, help="transformer layers per branch (BLIP-base: 12)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--sizes", default="8,32", help="data-set sizes in images (5 captions each)")
    ap.add_argument("--k", default="4,16", help="k_test values")
    ap.add_argument("--itm-batch", type=int, default=32)
    ap.add_argument("--naive-pairs", type=int, default=32)
    ap.add_argument("--tag", default="")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    t_start = time.time()
    ks = [int(k) for k in args.k.split(",")]
    rows, raw = [], []
    for size in [int(s) for s in args.sizes.split(",")]:
        job = dict(device=args.device, layers=args.layers, image_size=args.image_size, size=size, k=ks,
                   itm_batch=args.itm_batch, naive_pairs=args.naive_pairs)
        res = C.run_worker(Path(__file__), job)
        raw.append(res)
        for r in res["results"]:
            rows.append(dict(r, images=size, texts=res["texts"], embeds_mib=res["embeds_bytes"] / 2**20,
                             peak_mib=r["peak_bytes"] / 2**20))
        print(f"  size {size} done", file=sys.stderr, flush=True)
    mem = ("cuda.max_memory_allocated" if args.device.startswith("cuda")
           else "peak RSS during the call - RSS before it")
    header = (f"BLIP-base architecture, random init, {args.layers} layer(s) per branch, {args.image_size} px "
              f"(image tokens precomputed), fp32, device {args.device}, "
              f"no_grad + eval; image->text re-ranking; memory = {mem}")
    cols = [("images", "images", "d"), ("texts", "texts", "d"), ("embeds_mib", "image tokens (MiB)", ".0f"),
            ("method", "method", ""), ("k", "k_test", "d"), ("pairs", "pairs", "d"), ("seconds", "time (s)", ".2f"),
            ("pairs_per_s", "pairs/s", ".1f"), ("peak_mib", "peak mem (MiB)", ".0f")]
    print(header)
    print(C.table(rows, cols))
    payload = {"setting": vars(args), "header": header, "machine": C.machine(), "rows": rows,
               "wall_s": time.time() - t_start, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    path = C.write_json(f"retrieval_eval_{args.device.split(':')[0]}{'_' + args.tag if args.tag else ''}.json",
                        payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
