"""``easy_vqa.v1``: the easy-vqa package's real images and questions, through BLIP's VQA loader."""

from __future__ import annotations

import json

import pytest

easy_vqa = pytest.importorskip("easy_vqa")


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    from unitrans import registry

    root = tmp_path_factory.mktemp("easy_vqa")
    builder = registry.get("datasets", "easy_vqa.v1")
    data = builder(root=str(root), n_val_images=20, max_train=40, max_val=10, max_test=12, seed=3)
    return data.setup(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_items_load_with_answers_in_the_list(module):
    answers = module.extras["answer_list"]
    assert sorted(answers) == sorted(easy_vqa.get_answers()) and len(answers) == 13
    assert (len(module.train), len(module.val), len(module.test)) == (40, 10, 12)
    for i in range(3):
        item = module.train[i]
        assert item["image"].shape == (3, 32, 32)
        assert item["weights"] == [pytest.approx(1.0)] and item["answers"][0] in answers  # one answer, given by all 10 "humans"
        ev = module.test[i]
        assert ev["answers"] == [ev["answers"][0]] * 10 and ev["answers"][0] in answers
    batch = module.collate([module.val[0], module.val[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and len(batch["question_id"]) == 2


def test_splits_are_the_package_questions_and_disjoint(module):
    paths = module.extras["easy_vqa"]
    texts, answers, image_ids = easy_vqa.get_test_questions()
    truth = {(f"test/images/{i}.png", q): a for q, a, i in zip(texts, answers, image_ids)}
    for e in json.loads(open(paths["vqa_test"]).read()):
        assert truth[(e["image"], e["question"])] == e["answer"][0]
    n_images = len(easy_vqa.get_train_image_paths())
    train = json.loads(open(paths["vqa_train"]).read())
    val = json.loads(open(paths["vqa_val"]).read())
    assert all(int(e["image"].split("/")[-1][:-4]) < n_images - 20 for e in train)
    assert all(int(e["image"].split("/")[-1][:-4]) >= n_images - 20 for e in val)
    ids = [e["question_id"] for e in train + val] + [e["question_id"] for e in json.loads(open(paths["vqa_test"]).read())]
    assert len(ids) == len(set(ids))


def test_rewrites_only_when_parameters_change(tmp_path):
    from unitrans.data.easy_vqa import make_easy_vqa

    paths = make_easy_vqa(tmp_path, n_val_images=5, max_train=7, max_val=3, max_test=4)
    stamp = (tmp_path / "vqa_train.json").stat().st_mtime_ns
    assert make_easy_vqa(tmp_path, n_val_images=5, max_train=7, max_val=3, max_test=4) == paths
    assert (tmp_path / "vqa_train.json").stat().st_mtime_ns == stamp
    make_easy_vqa(tmp_path, n_val_images=5, max_train=9, max_val=3, max_test=4)
    assert len(json.loads((tmp_path / "vqa_train.json").read_text())) == 9
