"""Pre-flight: every data problem is found before any model is built, all at once, one line each; ``validate``
runs it as its second half; ``validate --deep`` opens every image once and lists every unreadable one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from unitrans import cli, registry
from unitrans.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """A user's folder: 5 images, a train file of 10 captions, a test file, and one image that is not an image."""
    (tmp_path / "img").mkdir()
    for k in range(5):
        Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(tmp_path / "img" / f"p{k}.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png at all")
    _json(tmp_path / "train.json", [{"image": f"p{k}.png", "caption": f"photo {k} {j}", "image_id": k}
                                    for k in range(5) for j in range(2)])
    _json(tmp_path / "test.json", [{"image": f"p{k}.png", "caption": [f"photo {k}"]} for k in range(3)])
    _json(tmp_path / "empty.json", [])
    return tmp_path


def _spec(folder: Path, data: dict, batch: int = 4, split: str = "test") -> Path:
    table = ", ".join(f'{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}' for k, v in data.items())
    path = folder / "spec.toml"
    path.write_text(f"""
output_dir = "{folder / 'run'}"
backbone = {{name = "blip.v1", preset = "tiny"}}
task = {{name = "retrieval.v1"}}
data = {{name = "blip_retrieval.v1", {table}}}
[train]
batch_size = {batch}
[eval]
split = "{split}"
""")
    return path


def _validate(spec: Path, *extra: str, capsys) -> tuple[int, str, str]:
    rc = cli.main(["validate", str(spec), *extra])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_builder_preflight_reports_every_file_problem_at_once(folder):
    make = registry.get("datasets", "blip_retrieval.v1")
    ok = make(image_root=str(folder / "img"), train_file=str(folder / "train.json"),
              test_file=str(folder / "test.json")).preflight(False)
    assert ok.problems == [] and ok.sizes == {"train": 10, "val": None, "test": 3} and ok.checked_files == 8
    bad = make(image_root=str(folder / "nope"), train_file=str(folder / "missing.json"),
               val_file=str(folder / "empty.json"), test_file=str(folder / "test.json")).preflight(False)
    text = "\n".join(bad.problems)
    assert len(bad.problems) == 3, bad.problems
    assert "image_root is not a directory" in text and "missing.json" in text and "val split is empty" in text
    lost = _json(folder / "lost.json", [{"image": f"gone{k}.png", "caption": ["x"]} for k in range(3)])
    report = make(image_root=str(folder / "img"), test_file=str(lost)).preflight(False)
    assert sorted(report.problems) == [f"image not found: {folder / 'img' / f'gone{k}.png'}" for k in range(3)]


def test_generated_data_reports_sizes_without_generating(tmp_path):
    root = tmp_path / "shapes"
    report = registry.get("datasets", "shapes_retrieval.v1")(root=str(root), n_train=7, captions_per_image=2,
                                                             n_val=3, n_test=4).preflight(False)
    assert report.sizes == {"train": 14, "val": 3, "test": 4} and report.problems == [] and not root.exists()
    report = registry.get("datasets", "shapes_video_qa.v1")(root=str(root), n_train=5).preflight(False)
    assert report.sizes["train"] == 15 and not root.exists()


def test_run_refuses_before_building_anything(folder, monkeypatch):
    import unitrans.engine.run as run

    def no_build(*a, **k):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(run, "build", no_build)
    spec_path = _spec(folder, {"image_root": folder / "img", "train_file": folder / "train.json",
                               "val_file": folder / "empty.json"}, batch=16)
    from unitrans.spec import load_spec

    with pytest.raises(UserError) as info:
        run.run(load_spec(spec_path, ["train.device=cpu"]))
    text = str(info.value)
    assert "(3 problems" in text and "val split is empty" in text
    assert "train.batch_size = 16 (the global batch) is larger than the train split (10 items)" in text
    assert "the largest batch that fits is 10" in text
    assert "eval.split = 'test' but the data gives no test split" in text
    assert not (folder / "run").exists()  # nothing written either


def test_largest_batch_respects_processes_and_accumulation():
    from types import SimpleNamespace

    from unitrans.engine.preflight import spec_problems

    spec = SimpleNamespace(train=SimpleNamespace(batch_size=32, grad_accum=2), eval=SimpleNamespace(split="val"))
    (line,) = spec_problems(spec, {"train": 13, "val": 4}, world=3)
    assert "largest batch that fits is 12" in line
    (line,) = spec_problems(spec, {"train": 5, "val": 4}, world=3)
    assert "no batch fits" in line and "6 items" in line
    assert spec_problems(spec, {"train": 32, "val": 1}, world=1) == []
    assert spec_problems(spec, {}, world=1) == []  # a plugin's builder without a pre-flight: nothing known


def test_validate_says_what_is_missing(folder, capsys):
    spec = _spec(folder, {"image_root": folder / "img", "train_file": folder / "nothere.json",
                          "test_file": folder / "test.json"})
    rc, out, err = _validate(spec, capsys=capsys)
    assert rc == 2 and f"ok: {spec}" in out and str(folder / "nothere.json") in err and "Traceback" not in err
    spec = _spec(folder, {"image_root": folder / "no_images", "train_file": folder / "train.json",
                          "test_file": folder / "test.json"})
    rc, out, err = _validate(spec, capsys=capsys)
    assert rc == 2 and f"image_root is not a directory: {folder / 'no_images'}" in err
    spec = _spec(folder, {"image_root": folder / "img", "train_file": folder / "train.json",
                          "test_file": folder / "test.json"})
    rc, out, err = _validate(spec, capsys=capsys)
    assert rc == 0 and "data: ok (train 10, test 3; 8 media files found)" in out, (out, err)
    # a spec for data that is elsewhere (the paper's): the spec is checked, the absence is said
    spec = _spec(folder, {"image_root": folder / "coco", "train_file": folder / "coco" / "train.json"})
    rc, out, err = _validate(spec, capsys=capsys)
    assert rc == 0 and "data: not checked: none of its files is on this machine" in out
    assert str(folder / "coco" / "train.json") in out


def test_validate_deep_lists_every_unreadable_image(folder, capsys):
    _json(folder / "test.json", [{"image": n, "caption": ["x"]} for n in ("p0.png", "bad.png", "p1.png", "gone.png")])
    spec = _spec(folder, {"image_root": folder / "img", "train_file": folder / "train.json",
                          "test_file": folder / "test.json"})
    rc, out, err = _validate(spec, capsys=capsys)
    assert rc == 2 and "gone.png" in err and "bad.png" not in err  # without --deep: existence only
    rc, out, err = _validate(spec, "--deep", capsys=capsys)
    assert rc == 2 and "(2 problems" in err and "gone.png" in err
    assert f"cannot read image {folder / 'img' / 'bad.png'}" in err


def test_validate_without_deep_stays_light(folder):
    spec = _spec(folder, {"image_root": folder / "img", "train_file": folder / "train.json",
                          "test_file": folder / "test.json"})
    code = ("import sys; from unitrans.cli import main; rc = main(['validate', sys.argv[1]]); "
            "heavy = [m for m in sys.modules if m.partition('.')[0] in ('torch', 'transformers', 'open_clip')]; "
            "print('@@', rc, heavy)")
    paths = [str(REPO), str(REPO / "plugins"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True, env=env, timeout=120)
    assert "@@ 0 []" in proc.stdout, proc.stdout + proc.stderr


def test_skipped_items_are_counted_in_metrics_json(folder):
    """Under on_error = "skip" a run records the unreadable items it met: in each evaluation (scored on a blank
    picture) and in training (replaced by a readable neighbour), summed in ``metrics.json``."""
    _json(folder / "train.json", [{"image": name, "caption": f"photo {k}", "image_id": k}
                                  for k, name in enumerate(["bad.png", "p0.png", "p1.png", "p2.png"])])
    _json(folder / "test.json", [{"image": name, "caption": [f"photo {k}"]}
                                 for k, name in enumerate(["p0.png", "bad.png", "p2.png"])])
    spec = _spec(folder, {"image_root": folder / "img", "train_file": folder / "train.json",
                          "test_file": folder / "test.json", "on_error": "skip"})
    text = spec.read_text().replace("[train]\n", "[train]\nmax_steps = 1\ndevice = \"cpu\"\n")
    spec.write_text(text.replace("[eval]\n", "[eval]\nat_start = true\n")
                    + "[[adapters]]\nname = \"lora.v1\"\ntargets = [\"text.attn.q\"]\n")
    assert cli.main(["run", str(spec)]) == 0
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    assert metrics["skipped_items"] == 1  # one evaluation over the test split: bad.png once
    assert metrics["skipped_train_items"] == 1  # one epoch of 4 items: bad.png once
    initial = json.loads((folder / "run" / "metrics_initial.json").read_text())
    assert initial["skipped_items"] == 1  # counted per evaluation, not accumulated
