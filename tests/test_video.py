"""Video: frame sampling against hand computations, decord reads what PyAV wrote, the on_error policy, BLIP on
videos (mean [CLS], temporal embedding identity at init) and one end-to-end run of the video quickstart."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("decord")
pytest.importorskip("av")

from unitrans.data.blip_json import DataError  # noqa: E402
from unitrans.data.video import frame_range, load_frames, sample_indices, write_video  # noqa: E402
from unitrans.data import entries  # noqa: E402
from unitrans.data.base import MediaDataset  # noqa: E402
from unitrans.data.video_json import VideoClips, VideoQAData, VideoRetrievalData  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def VideoRetrievalTrainDataset(ann_file, root, clips):
    return MediaDataset(entries.pairs_train(Path(ann_file), Path(root), 30, "video"), clips, train=True)


def VideoRetrievalEvalDataset(ann_file, root, clips):
    return MediaDataset(entries.pairs_eval(Path(ann_file), Path(root), 30, "video"), clips, train=False)


def colour_of(t: int) -> tuple[int, int, int]:
    """A flat colour per frame index, far apart from its neighbours (the red channel identifies the frame)."""
    return (8 + 15 * t, 240 - 12 * t, 60 + 7 * (t % 5))


def flat_frames(n: int, size: int = 32) -> np.ndarray:
    return np.stack([np.full((size, size, 3), colour_of(t), np.uint8) for t in range(n)])  # (n, S, S, 3)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clips") / "flat.mp4"
    write_video(path, flat_frames(16), fps=8)
    return path


# ---- sampling ---------------------------------------------------------------------------------------------------
def test_uniform_is_segment_midpoints():
    assert sample_indices(16, 4, "uniform") == [2, 6, 10, 14]
    assert sample_indices(10, 3, "uniform") == [1, 5, 8]  # floor(0.5*10/3), floor(1.5*10/3), floor(2.5*10/3)
    assert sample_indices(3, 6, "uniform") == [0, 0, 1, 1, 2, 2]  # fewer frames than T: repeats
    # start 0.5 s, end 1.5 s at 8 fps: frames [4, 12); midpoints of 4 segments of 2
    assert frame_range(16, 8.0, 0.5, 1.5) == (4, 12)
    assert sample_indices(16, 4, "uniform", fps=8.0, start=0.5, end=1.5) == [5, 7, 9, 11]
    assert frame_range(16, 8.0, 5.0, 9.0) == (15, 16)  # past the end: the last frame
    assert sample_indices(16, 2, "uniform", fps=8.0, start=1.0) == [10, 14]  # [8, 16)


def test_random_draws_one_frame_per_segment_deterministically():
    for seed in range(20):
        idx = sample_indices(16, 4, "random", random.Random(seed), fps=8.0, start=0.5, end=1.5)
        assert all(4 + 2 * k <= i < 6 + 2 * k for k, i in enumerate(idx)), idx
        assert idx == sample_indices(16, 4, "random", random.Random(seed), fps=8.0, start=0.5, end=1.5)
    draws = {tuple(sample_indices(100, 5, "random", random.Random(s))) for s in range(10)}
    assert len(draws) > 5
    for s in range(10):  # segments of 20: [0,20), [20,40), ...
        assert all(20 * k <= i < 20 * (k + 1) for k, i in enumerate(sample_indices(100, 5, "random",
                                                                                 random.Random(s))))


def test_headtail_halves():
    for seed in range(20):
        idx = sample_indices(16, 4, "headtail", random.Random(seed))
        head, tail = idx[:2], idx[2:]
        assert head == sorted(head) and tail == sorted(tail) and len(set(head)) == 2 and len(set(tail)) == 2
        assert all(0 <= i < 8 for i in head) and all(8 <= i < 16 for i in tail)
    assert sample_indices(16, 4, "headtail") == [2, 6, 10, 14]  # no generator: midpoints of each half
    idx = sample_indices(16, 3, "headtail", random.Random(0), fps=8.0, start=0.5, end=1.5)  # [4, 12): 1 + 2
    assert 4 <= idx[0] < 8 and all(8 <= i < 12 for i in idx[1:])


# ---- decoding ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_frames_read_equal_frames_written(tmp_path, codec):
    path = tmp_path / f"{codec}.mp4"
    written = flat_frames(12)
    write_video(path, written, fps=8, codec=codec)
    frames, idx = load_frames(path, 4, "uniform", size=None)
    assert idx == [1, 4, 7, 10] and frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    err = np.abs(frames.astype(float) - written[idx].astype(float)).mean()
    assert err < 10, f"mean abs error {err:.2f}/255"
    small, _ = load_frames(path, 2, "uniform", size=16)  # the decoder resizes
    assert small.shape == (2, 16, 16, 3)


def test_start_end_times_through_the_loader(tmp_path, clip):
    ann = tmp_path / "test.json"
    ann.write_text(json.dumps([{"video": clip.name, "caption": ["a"], "times": [0.5, 1.5]},
                               {"video": clip.name, "caption": "b", "start": 1.0}]))
    ds = VideoRetrievalEvalDataset(ann, clip.parent, VideoClips(4, "uniform", 32, MEAN, STD))
    assert ds.texts == ["a", "b"] and ds.img2txt == [[0], [1]] and ds.txt2img == [0, 1]
    video = ds[0]["image"]  # (T, 3, S, S), normalised
    assert video.shape == (4, 3, 32, 32)
    red = ((video[:, 0].mean(dim=(1, 2)) * 0.5 + 0.5) * 255).round()
    expected = torch.tensor([colour_of(i)[0] for i in (5, 7, 9, 11)], dtype=torch.float)
    assert (red - expected).abs().max() < 10, (red, expected)
    red = ((ds[1]["image"][:, 0].mean(dim=(1, 2)) * 0.5 + 0.5) * 255).round()  # [8, 16): 9, 11, 13, 15
    assert (red - torch.tensor([colour_of(i)[0] for i in (9, 11, 13, 15)], dtype=torch.float)).abs().max() < 10


def camera_pan(n: int = 72, height: int = 120, width: int = 160, step: int = 3) -> np.ndarray:
    """``(n, H, W, 3)`` frames of a camera panning ``step`` px a frame over a smooth random landscape."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (height // 8 + 1, (width + step * n) // 8 + 1, 3)).astype(np.float32)
    scene = np.kron(coarse, np.ones((8, 8, 1), np.float32))[:height]  # blocks of 8 px
    scene = (scene + np.roll(scene, 4, 0) + np.roll(scene, 4, 1) + np.roll(scene, (4, 4), (0, 1))) / 4  # softer
    return np.stack([scene[:, step * t:step * t + width] for t in range(n)]).astype(np.uint8)


def test_a_camera_like_clip_decodes_the_sampled_frames(tmp_path):
    """A 4:3 clip with texture and motion, B-frames and a keyframe every 24 frames (PyAV, libx264): the frames
    decoded are the source frames at the sampled indices, not their neighbours."""
    source = camera_pan()
    path = tmp_path / "pan.mp4"
    write_video(path, source, fps=24, gop=24)
    frames, idx = load_frames(path, 8, "uniform")
    assert frames.shape == (8, 120, 160, 3) and idx == sorted(idx) and len(set(idx)) == 8
    for frame, i in zip(frames.astype(np.float32), idx):
        error = np.abs(frame - source[i]).mean()
        neighbour = np.abs(frame - source[i + 1 if i + 1 < len(source) else i - 1]).mean()
        assert error < 14 and neighbour > 2 * error, (i, error, neighbour)
    small, same = load_frames(path, 8, "uniform", size=64)
    assert small.shape == (8, 64, 64, 3) and same == idx


def test_train_items_are_deterministic_per_seed_epoch_item(tmp_path, clip):
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps([{"video": clip.name, "caption": f"clip {i}"} for i in range(3)]))
    ds = VideoRetrievalTrainDataset(ann, clip.parent, VideoClips(4, "random", 32, MEAN, STD))
    assert [r.fields["image_id"] for r in ds.records] == [0, 0, 0]  # one video: contrastive positives
    ds.set_epoch(3, seed=7)
    a, b = ds[1]["image"], ds[1]["image"]
    assert torch.equal(a, b)
    draws = set()
    for epoch in range(6):
        ds.set_epoch(epoch, seed=7)
        draws.add(ds[1]["image"][:, 0].mean(dim=(1, 2)).round(decimals=2).tolist().__str__())
    assert len(draws) > 1


# ---- errors -----------------------------------------------------------------------------------------------------
@pytest.fixture()
def broken(tmp_path, clip):
    (tmp_path / "garbage.mp4").write_bytes(b"\x00garbage, not a video" * 50)
    import shutil

    shutil.copy(clip, tmp_path / "good.mp4")
    entries = [{"video": "missing.mp4", "caption": "one"}, {"video": "garbage.mp4", "caption": "two"},
               {"video": "good.mp4", "caption": "three"}]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    (tmp_path / "test.json").write_text(json.dumps([{**e, "caption": [e["caption"]]} for e in entries]))
    return tmp_path


def test_missing_and_corrupt_videos_raise_naming_the_file(broken):
    data = VideoRetrievalData(broken, train_file=broken / "train.json", test_file=broken / "test.json",
                              num_frames_train=2, num_frames_eval=2).setup(32, MEAN, STD)
    for ds in (data.train, data.test):
        with pytest.raises(DataError, match="missing.mp4"):
            ds[0]
        with pytest.raises(DataError, match="garbage.mp4"):
            ds[1]
        assert ds[2]["image"].shape == (2, 3, 32, 32)


def test_skip_counts_and_replaces(broken, caplog):
    data = VideoRetrievalData(broken, train_file=broken / "train.json", test_file=broken / "test.json",
                              num_frames_train=2, num_frames_eval=2, on_error="skip").setup(32, MEAN, STD)
    with caplog.at_level(logging.WARNING, logger="unitrans.data"):
        item = data.train[0]  # missing -> garbage -> good
        assert item["caption"] == "three" and data.train.skipped == 2
        data.train[0]
        assert data.train.skipped == 4
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and any("missing.mp4" in w for w in warned) and any("garbage.mp4" in w for w in warned)
    blank = data.test[1]["image"]  # eval: a blank video keeps the index maps aligned
    assert data.test.skipped == 1 and blank.shape == (2, 3, 32, 32) and blank.std() == 0


def test_skip_counter_is_shared_with_loader_workers(broken):
    from unitrans.data.blip_json import collate_retrieval

    data = VideoRetrievalData(broken, train_file=broken / "train.json", num_frames_train=2, num_frames_eval=2,
                              on_error="skip").setup(32, MEAN, STD)
    loader = torch.utils.data.DataLoader(data.train, batch_size=1, num_workers=2, collate_fn=collate_retrieval)
    batches = list(loader)
    assert [b["caption"] for b in batches] == [["three"]] * 3 and batches[0]["image"].shape == (1, 2, 3, 32, 32)
    assert data.train.skipped == 3  # 2 for item 0, 1 for item 1, in worker processes


# ---- MSRVTT-QA format ------------------------------------------------------------------------------------------
def test_msrvtt_qa_items(tmp_path, clip):
    qa = [{"question_id": 7, "question": "What is shown?", "answer": "colours", "video": clip.name},
          {"question_id": 8, "question": "Is it red", "answer": "no", "video": clip.name, "times": [0, 1]}]
    (tmp_path / "qa_train.json").write_text(json.dumps(qa))
    (tmp_path / "qa_test.json").write_text(json.dumps(qa))
    (tmp_path / "ans2label.json").write_text(json.dumps({"no": 1, "colours": 0}))
    data = VideoQAData(clip.parent, train_file=tmp_path / "qa_train.json", test_file=tmp_path / "qa_test.json",
                       answer_list=tmp_path / "ans2label.json", num_frames_train=2,
                       num_frames_eval=3).setup(32, MEAN, STD)
    batch = data.collate([data.train[0], data.train[1]])
    assert batch["image"].shape == (2, 2, 3, 32, 32) and batch["question"] == ["what is shown?", "is it red"]
    assert batch["answer"] == ["colours", "no"] and batch["weight"].tolist() == [1.0, 1.0]
    assert batch["n"].tolist() == [1, 1]
    ev = data.collate([data.test[0]])
    assert ev["image"].shape == (1, 3, 3, 32, 32) and ev["question_id"] == [7]
    assert data.test.answer_list == ["colours", "no"]
    from unitrans.metrics.vqa import vqa_accuracy

    assert vqa_accuracy("colours", ev["answers"][0]) == 1.0 and vqa_accuracy("no", ev["answers"][0]) == 0.0


# ---- BLIP on video ---------------------------------------------------------------------------------------------
def _blip(temporal=False, seed=0):
    from unitrans_blip.backbone import BlipBackbone

    torch.manual_seed(seed)
    bb = BlipBackbone(preset="tiny", temporal_embedding=temporal, max_frames=8)
    bb.model.eval()
    return bb


@torch.no_grad()
def test_video_of_identical_frames_has_the_image_feature():
    bb = _blip()
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    video = image[:, None].expand(2, 5, 3, 64, 64)
    img_tokens, vid_tokens = bb.encode_image(image), bb.encode_image(video)
    assert vid_tokens.shape == (2, 5 * img_tokens.shape[1], img_tokens.shape[2])
    torch.testing.assert_close(bb.image_feat(vid_tokens), bb.image_feat(img_tokens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bb.encode_image(image[:, None]), img_tokens)  # one frame: the image exactly
    tok = bb.tokenize(["a red circle", "a blue square"], "cpu")
    fused = bb.fuse(tok["input_ids"], tok["attention_mask"], vid_tokens)  # cross-attention over all frames
    assert fused.shape[:2] == tok["input_ids"].shape


@torch.no_grad()
def test_temporal_embedding_is_identity_at_init_and_sees_order():
    plain, temporal = _blip(False), _blip(True)
    video = torch.randn(2, 4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert torch.count_nonzero(temporal.model.temporal_embedding) == 0
    torch.testing.assert_close(temporal.encode_image(video), plain.encode_image(video), atol=0, rtol=0)
    reverse = video.flip(1)
    # without it the mean [CLS] feature is blind to the frames' order ...
    noise = (plain.image_feat(plain.encode_image(video)) - plain.image_feat(plain.encode_image(reverse))).abs().max()
    assert noise < 1e-5  # float rounding of the mean's order only
    temporal.model.temporal_embedding.normal_(std=1.0)  # ... with a trained one it is not
    diff = temporal.image_feat(temporal.encode_image(video)) - temporal.image_feat(temporal.encode_image(reverse))
    assert diff.abs().max() > 100 * noise + 1e-5
    with pytest.raises(Exception, match="max_frames"):
        temporal.encode_image(torch.zeros(1, 9, 3, 64, 64))


def test_temporal_embedding_trains_and_counts_under_the_backbone():
    from unitrans.engine.build import build, count_parameters
    from unitrans.spec import validate_dict

    spec = validate_dict({
        "backbone": {"name": "blip.v1", "preset": "tiny", "temporal_embedding": True, "max_frames": 8},
        "adapters": [{"name": "vcra.v1", "targets": ["vision.attn.*"], "rank": 4}],
        "task": {"name": "retrieval.v1"}, "data": {"name": "shapes_video_retrieval.v1"},
    })
    built = build(spec, "cpu", with_data=False)
    assert "backbone.temporal_embedding" in built.trainable_state()
    counts = count_parameters(built)
    assert counts["by_component"]["backbone (blip.v1)"]["trainable"] == 8 * 64
    video = torch.randn(2, 3, 3, 64, 64)
    built.backbone.image_feat(built.backbone.encode_image(video)).sum().backward()
    assert built.backbone.model.temporal_embedding.grad is not None


# ---- end to end --------------------------------------------------------------------------------------------------
TINY = ["--set", "data.n_train=16", "--set", "data.n_val=4", "--set", "data.n_test=6", "--set", "data.clip_frames=8",
        "--set", "data.num_frames_train=2", "--set", "data.num_frames_eval=3", "--set", "train.batch_size=8",
        "--set", "eval.batch_size=6", "--set", "train.max_steps=3", "--set", "train.progress=false",
        "--set", "train.tensorboard=false"]


def test_video_quickstart_end_to_end(tmp_path):
    from unitrans import cli

    out = tmp_path / "run"
    args = ["run", str(ROOT / "examples" / "quickstart_video.toml"), "--output-dir", str(out),
            "--set", f"data.root={tmp_path / 'data'}", *TINY]
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3
    from metric_checks import check_retrieval_metrics

    check_retrieval_metrics(metrics, tmp_path / "data" / "ret_test.json")
    assert (out / "metrics_initial.json").is_file()
    params = json.loads((out / "params.json").read_text())
    assert params["by_component"]["backbone (blip.v1)"]["trainable"] > 0  # temporal embedding + train_parts


def test_video_qa_end_to_end(tmp_path):
    from unitrans import cli

    spec = tmp_path / "qa.toml"
    spec.write_text(f"""
seed = 0
alignment_loss = "none"
backbone = {{name = "blip.v1", preset = "tiny", task_model = "vqa", temporal_embedding = true}}
task = {{name = "vqa.v1", k_test = 4}}
data = {{name = "shapes_video_qa.v1", root = "{tmp_path / 'data'}"}}
[[adapters]]
name = "vcra.v1"
targets = ["vision.attn.*", "text.attn.*", "fusion.attn.*", "decoder.attn.*"]
rank = 4
""")
    out = tmp_path / "qa"
    assert cli.main(["run", str(spec), "--output-dir", str(out), *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    from metric_checks import official_vqa_accuracy

    assert metrics["vqa_acc"] == pytest.approx(official_vqa_accuracy(out / "vqa_result_test.json",
                                                                     tmp_path / "data" / "qa_test.json"))


def test_times_past_the_end_of_a_clip_warn_once_with_the_count(tmp_path, clip, caplog):
    """The clip lasts 2 s: three entries end after it (clamped to the clip), one ends inside it."""
    ann = tmp_path / "test.json"
    ann.write_text(json.dumps([{"video": clip.name, "caption": [f"c{k}"], "times": [0.5, end]}
                               for k, end in enumerate((5.0, 9.0, 1.5, 30.0))]))
    data = VideoRetrievalData(clip.parent, test_file=ann, num_frames_eval=2)
    with caplog.at_level(logging.WARNING, logger="unitrans.data"):
        report = data.preflight(deep=True)
    warned = [r.getMessage() for r in caplog.records if "past the end" in r.getMessage()]
    assert report.problems == [] and len(warned) == 1 and str(ann) in warned[0] and ": 3 entries" in warned[0]
    caplog.clear()
    test = data.setup(32, MEAN, STD).test
    with caplog.at_level(logging.WARNING, logger="unitrans.data"):
        for i in range(len(test)):
            assert test[i]["image"].shape == (2, 3, 32, 32)
    warned = [r.getMessage() for r in caplog.records if "pass the end" in r.getMessage()]
    assert len(warned) == 1 and clip.name in warned[0]
