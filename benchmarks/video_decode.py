"""Video input throughput: decoding only the sampled frames, and data-loader workers.

1. Decoded frames per second with decord: ``get_batch`` of the T sampled frames of each clip against decoding
   every frame of the clip (then keeping the sampled ones). Clips are written here with PyAV.
2. The share of training-step time spent waiting for data, ``num_workers`` 0 against 2, on the video quickstart's
   setting (examples/quickstart_video.toml: tiny BLIP, 4 frames per clip, batch 32).

    python benchmarks/video_decode.py                       # both parts, CPU, about 2 minutes
    python benchmarks/video_decode.py --part decode --clip-frames 240 --size 224
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_clips(folder: Path, n: int, frames: int, size: int, gop: int | None) -> list[Path]:
    from unitrans.data.video import write_video

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, (size, size, 3)).astype(np.uint8)
        clip = [np.roll(base, 2 * t, axis=1) for t in range(frames)]  # textured, moving: realistic coding cost
        path = folder / f"clip_{i:03d}.mp4"
        write_video(path, clip, fps=25, gop=gop)
        paths.append(path)
    return paths


def decode_benchmark(args) -> None:
    for gop in args.gop:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_clips(Path(tmp), args.clips, args.clip_frames, args.size, gop or None)
            print(f"{args.clips} clips of {args.clip_frames} frames at {args.size} px, keyframe every "
                  f"{gop or 250} frames:")
            _decode(paths, args)


def _decode(paths, args) -> None:
    import decord

    from unitrans.data.video import load_frames, sample_indices

    for strategy in ("uniform", "random"):
        t0 = time.perf_counter()
        n = 0
        for i, p in enumerate(paths):
            frames, _ = load_frames(p, args.frames, strategy, args.size, random.Random(i))
            n += len(frames)
        sampled = time.perf_counter() - t0
        print(f"get_batch of {args.frames} {strategy} frames / clip: {n / sampled:8.1f} sampled frames/s "
              f"({sampled / len(paths) * 1e3:.1f} ms/clip)")
    t0 = time.perf_counter()
    n_all = 0
    for i, p in enumerate(paths):
        vr = decord.VideoReader(str(p), width=args.size, height=args.size, num_threads=1)
        every = vr.get_batch(list(range(len(vr)))).asnumpy()  # decode every frame ...
        keep = every[sample_indices(len(vr), args.frames, "uniform")]  # ... keep the sampled ones
        n_all += len(every)
        del keep
    full = time.perf_counter() - t0
    n_kept = args.frames * len(paths)
    print(f"decode all {args.clip_frames} frames / clip:        {n_kept / full:8.1f} sampled frames/s "
          f"({full / len(paths) * 1e3:.1f} ms/clip; {n_all / full:.1f} decoded frames/s)")


def loader_benchmark(args) -> None:
    import torch
    from torch.utils.data import DataLoader

    from unitrans.engine.build import build
    from unitrans.engine.run import EpochSampler, seed_everything
    from unitrans.spec import load_spec

    overrides = [f"data.root={args.data_root}", "train.progress=false"]
    spec = load_spec(ROOT / "examples" / "quickstart_video.toml", overrides)
    seed_everything(spec.seed)
    built = build(spec, "cpu")
    bb = built.backbone
    data = built.data.setup(bb.image_size, bb.image_mean, bb.image_std)
    state = built.trainable_state()
    opt = torch.optim.AdamW(list(state.values()), lr=spec.train.lr)
    for workers in (0, 2):
        data.train.set_epoch(0, spec.seed)
        sampler = EpochSampler(len(data.train), spec.train.batch_size, 1, 0, spec.seed)
        loader = DataLoader(data.train, batch_size=spec.train.batch_size, sampler=sampler, collate_fn=data.collate,
                            num_workers=workers, persistent_workers=False)
        it = iter(loader)
        next(it)  # worker start-up is not part of a step
        wait = total = 0.0
        for _ in range(args.steps):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            terms = built.task.training_step(bb, batch, built.alignment)
            sum(terms.values()).backward()
            opt.step()
            t2 = time.perf_counter()
            wait += t1 - t0
            total += t2 - t0
        del it
        print(f"num_workers {workers}: {total / args.steps:.3f} s/step, waiting for data {wait / args.steps:.3f} "
              f"s/step = {100 * wait / total:.1f}% of step time")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "decode", "loader"), default="all")
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--clip-frames", type=int, default=250, help="frames per written clip")
    p.add_argument("--frames", type=int, default=8, help="frames sampled per clip (T)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--gop", type=int, nargs="+", default=[0, 25],
                   help="keyframe intervals to write (0: libx264's default, 250)")
    p.add_argument("--steps", type=int, default=6, help="training steps timed per num_workers setting")
    p.add_argument("--data-root", default="runs/data/shapes_video")
    args = p.parse_args(argv)
    if args.part in ("all", "decode"):
        decode_benchmark(args)
    if args.part in ("all", "loader"):
        loader_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
