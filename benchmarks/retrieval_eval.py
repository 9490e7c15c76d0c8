"""ITM re-ranking of retrieval evaluation: ``Retrieval._rerank`` with each image's cross-attention keys and values
computed once for all its candidate texts (chunks of one image, the default for BLIP) and once per pair (chunks of
``itm_batch`` pairs, one image copy per pair: the path of a backbone that cannot broadcast one image), against a
naive loop (one ITM forward per pair); throughput, exact FLOPs per pair and peak memory, for several ``k_test`` and
data-set sizes, with VCRA + QASN attached (``--adapters none``: the frozen backbone).

Each data-set size runs in its own interpreter on the BLIP-base architecture (random init), in eval mode under
``no_grad`` (and bf16 autocast with ``--bf16``). Image tokens ``(I, N, Dv)`` and ITC similarities are synthetic
(re-ranking does not depend on their values); there are 5 captions per image (and at least k_test texts), and
the queries are the images (image -> text re-ranking, ``I x k`` pairs). FLOPs (``FlopCounterMode``, exact): a
pair's text side and an image's side are counted on one and two texts fused with one image; a pair costs text +
image / (texts sharing the image's keys and values).
Memory: peak RSS sampled every 2 ms during the call, minus the RSS just before it. The naive loop scores the first
``--naive-pairs`` pairs only (its rate does not depend on how many).

  python benchmarks/retrieval_eval.py                                   # 2-core CPU default, 2 layers
  python benchmarks/retrieval_eval.py --layers 12 --image-size 384 --sizes 2 --k 128 --itm-batch 128 --naive-pairs 0
  python benchmarks/retrieval_eval.py --layers 12 --image-size 384 --sizes 64 --k 128 --itm-batch 128 --device cuda \
      --bf16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PAPER = [{"name": "vcra.v1", "rank": 64, "targets": C.PAPER_TARGETS}]
PATHS = [("_rerank, k/v once per image", True), ("_rerank, k/v once per pair", False)]


def _timed(dev: str, fn) -> tuple[float, int]:
    """Seconds and peak bytes (CUDA: allocated; CPU: RSS over the RSS before) of ``fn()``."""
    import torch

    C.sync(dev)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = C.rss_bytes()
    t0 = time.perf_counter()
    with C.RssPeak() as mem:
        fn()
        C.sync(dev)
    dt = time.perf_counter() - t0
    return dt, torch.cuda.max_memory_allocated() if dev.startswith("cuda") else mem.peak - before


def pair_flops(bb, tok, embeds, dev) -> tuple[float, float]:
    """``(text, image)``: FLOPs of one pair's text side and of one image's side (its tokens' cross-attention
    keys and values), from ``FlopCounterMode`` on one and two texts fused with one image. A chunk of m texts with
    one image costs ``m * text + image``; one image copy per pair costs ``text + image`` per pair."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for m in (1, 2):
        with FlopCounterMode(display=False) as fc:
            bb.itm_logits(bb.fuse(tok["input_ids"][:m].to(dev), tok["attention_mask"][:m].to(dev), embeds[:1].to(dev)))
        counts.append(fc.get_total_flops())
    text = counts[1] - counts[0]
    return float(text), float(counts[0] - text)


def worker(job: dict) -> None:
    import contextlib

    import torch

    C.cut_layers("base", job["layers"])
    dev = job["device"]
    torch.manual_seed(0)
    adapters, side = (PAPER, "qasn.v1") if job["adapters"] == "paper" else ((), None)
    _, built = C.build_from_dict(C.spec_dict("base", job["image_size"], adapters=adapters, side=side,
                                             itm_batch=job["itm_batch"]), dev)
    bb, task = built.backbone, built.task
    bb.model.eval()
    n_img = job["size"]
    cfg = bb.model.config.vision_config
    n_tok = (job["image_size"] // cfg.patch_size) ** 2 + 1
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(n_img, n_tok, cfg.hidden_size, generator=g)  # (I, N, Dv) on the CPU, as evaluate keeps it
    n_txt = max(5 * n_img, max(job["k"]))  # 5 captions per image, and at least k_test candidates per query
    texts = [C.CAPTIONS[(i * 3 + j) % len(C.CAPTIONS)] for i in range(n_txt // 5 + 1) for j in range(5)][:n_txt]
    tok = bb.tokenize(texts, "cpu")
    sims = torch.randn(n_img, len(texts), generator=g)  # (I, T)
    results = []
    amp = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16) if job["bf16"] else contextlib.nullcontext()
    with torch.no_grad(), amp:
        bb.itm_logits(bb.fuse(tok["input_ids"][:2].to(dev), tok["attention_mask"][:2].to(dev),
                              embeds[:2].to(dev)))  # warm-up
        text, image = pair_flops(bb, tok, embeds, dev)
        for k in [min(k, n_txt) for k in job["k"]]:
            task.k_test = k
            for label, broadcast in PATHS:
                bb.fuse_broadcasts_image = broadcast
                chunk = min(k, task.itm_batch) if broadcast else 1  # texts that share one image's keys/values
                dt, peak = _timed(dev, lambda: task._rerank(bb, sims, embeds, tok, dev, image_queries=True))
                results.append({"method": label, "k": k, "pairs": n_img * k, "seconds": dt,
                                "pairs_per_s": n_img * k / dt, "peak_bytes": peak,
                                "gflop_per_pair": (text + image / chunk) / 1e9})
        if job["naive_pairs"]:  # one ITM forward per pair, over the first pairs of the largest k
            k = max(job["k"])
            top = sims.topk(k, dim=1).indices
            pairs = [(i, int(top[i, j])) for i in range(n_img) for j in range(k)][: job["naive_pairs"]]

            def naive():
                for i, t in pairs:
                    bb.itm_logits(bb.fuse(tok["input_ids"][t:t + 1].to(dev), tok["attention_mask"][t:t + 1].to(dev),
                                          embeds[i:i + 1].to(dev)))

            dt, peak = _timed(dev, naive)
            results.append({"method": "naive per-pair loop", "k": k, "pairs": len(pairs), "seconds": dt,
                            "pairs_per_s": len(pairs) / dt, "peak_bytes": peak})
    C.emit({"size": n_img, "texts": len(texts), "embeds_bytes": embeds.numel() * 4, "text_tokens":
            int(tok["input_ids"].shape[1]), "image_tokens": n_tok, "text_gflop": text / 1e9,
            "image_gflop": image / 1e9, "results": results})


def flickr30k_estimate(res: dict, rows: list[dict], itm_batch: int, images=1000, texts=5000, k=128) -> dict:
    """FLOPs of BLIP's Flickr30K test re-ranking (image->text: ``images x k`` pairs; text->image: ``texts x k``
    pairs, grouped by image into chunks of at most ``itm_batch``, at least ``texts * k / itm_batch`` chunks) with
    each image's keys and values once per chunk, and once per pair; the time at the rate this run measured."""
    t, i = res["text_gflop"], res["image_gflop"]
    pairs = (images + texts) * k
    chunks = images * math.ceil(k / itm_batch) + math.ceil(texts * k / itm_batch)
    once_per_chunk, once_per_pair = pairs * t + chunks * i, pairs * (t + i)
    fast = [r for r in rows if r["method"].startswith("_rerank, k/v once per image")]
    rate = max((r["pairs_per_s"] * r["gflop_per_pair"] for r in fast), default=None)  # GFLOP/s achieved
    out = {"pairs": pairs, "chunks_at_least": chunks, "tflop_once_per_image": once_per_chunk / 1e3,
           "tflop_once_per_pair": once_per_pair / 1e3, "gflop_per_s_measured": rate}
    text = (f"Flickr30K test re-ranking ({pairs:,} pairs, k_test {k}): {once_per_chunk / 1e3:,.0f} TFLOP with "
            f"keys/values once per image and chunk (at least {chunks:,} chunks), {once_per_pair / 1e3:,.0f} TFLOP "
            f"once per pair")
    if rate:
        out["hours_here"] = once_per_chunk / rate / 3600
        text += f"; at the {rate:.1f} GFLOP/s measured here: {out['hours_here']:.1f} h"
    out["text"] = text
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=2, help="transformer layers per branch (BLIP-base: 12)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--sizes", default="8,32", help="data-set sizes in images (5 captions each)")
    ap.add_argument("--k", default="4,16", help="k_test values")
    ap.add_argument("--itm-batch", type=int, default=32)
    ap.add_argument("--naive-pairs", type=int, default=32)
    ap.add_argument("--adapters", choices=["paper", "none"], default="paper",
                    help="paper: VCRA r=64 + QASN attached (unmerged); none: the frozen backbone")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (as a bf16 spec evaluates)")
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
                   itm_batch=args.itm_batch, naive_pairs=args.naive_pairs, adapters=args.adapters, bf16=args.bf16)
        res = C.run_worker(Path(__file__), job)
        raw.append(res)
        for r in res["results"]:
            rows.append(dict(r, images=size, texts=res["texts"], embeds_mib=res["embeds_bytes"] / 2**20,
                             peak_mib=r["peak_bytes"] / 2**20))
        print(f"  size {size} done", file=sys.stderr, flush=True)
    mem = ("cuda.max_memory_allocated" if args.device.startswith("cuda")
           else "peak RSS during the call - RSS before it")
    header = (f"BLIP-base architecture, random init, {args.layers} layer(s) per branch, {args.image_size} px "
              f"(image tokens precomputed), {'bf16 autocast' if args.bf16 else 'fp32'}, device {args.device}, "
              f"adapters: {args.adapters}, no_grad + eval; image->text re-ranking; memory = {mem}")
    cols = [("images", "images", "d"), ("texts", "texts", "d"), ("embeds_mib", "image tokens (MiB)", ".0f"),
            ("method", "method", ""), ("k", "k_test", "d"), ("pairs", "pairs", "d"),
            ("gflop_per_pair", "GFLOP/pair", ".2f"), ("seconds", "time (s)", ".2f"),
            ("pairs_per_s", "pairs/s", ".1f"), ("peak_mib", "peak mem (MiB)", ".0f")]
    print(header)
    print(C.table(rows, cols))
    estimate = flickr30k_estimate(raw[0], rows, args.itm_batch)
    print(estimate["text"])
    payload = {"setting": vars(args), "header": header, "machine": C.machine(), "rows": rows,
               "flickr30k": estimate, "pair_gflop": [{k: r[k] for k in ("size", "text_tokens", "image_tokens",
                                                                     "text_gflop", "image_gflop")} for r in raw],
               "wall_s": time.time() - t_start, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    path = C.write_json(f"retrieval_eval_{args.device.split(':')[0]}{'_' + args.tag if args.tag else ''}.json",
                        payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
