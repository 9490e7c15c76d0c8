"""Captioning and VQA heads on tiny random BLIPs: rank = brute force, prompt stripping, refusals, data loaders,
and one end-to-end run per quickstart through ``cli.main`` plus ``unitrans score`` on its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_backbone
from metric_checks import official_vqa_accuracy
from unitrans import cli
from unitrans.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ["red", "blue", "yes", "no", "2", "circle", "left of", "red square", "green triangle", "purple"]


@pytest.fixture(scope="module")
def vqa_bb():
    return tiny_backbone(seed=3, task_model="vqa")


@pytest.fixture(scope="module")
def caption_bb():
    return tiny_backbone(seed=4, task_model="captioning")


def _question_states(bb, questions, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixel = torch.randn(len(questions), 3, bb.image_size, bb.image_size, generator=g)
    with torch.no_grad():
        return bb.encode_question(questions, bb.encode_image(pixel))


@torch.no_grad()
def _brute_force_log_likelihood(bb, states, mask, answer: str) -> float:
    """One question, one answer, no padding: sum over the tokens after [DEC] of log p(token | prefix)."""
    ids = bb.tokenizer([answer], return_tensors="pt")["input_ids"]
    ids[:, 0] = bb.bos_token_id
    logits = bb.model.text_decoder(input_ids=ids, encoder_hidden_states=states, encoder_attention_mask=mask).logits
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    return sum(float(logp[t, ids[0, t + 1]]) for t in range(ids.shape[1] - 1))


def test_rank_picks_the_brute_force_best(vqa_bb):
    from unitrans.tasks.vqa import VQA

    questions = ["what color is the circle?", "how many shapes are there?", "is there a red square?",
                 "what shape is left of the blue square?"]
    states, mask = _question_states(vqa_bb, questions)
    cand_ids, cand_mask = vqa_bb.decoder_tokenize(CANDIDATES, "cpu")
    task = VQA(inference="rank", k_test=len(CANDIDATES))
    picked = task.rank(vqa_bb, states, mask, cand_ids, cand_mask).tolist()
    for q in range(len(questions)):
        scores = [_brute_force_log_likelihood(vqa_bb, states[q:q + 1], mask[q:q + 1], a) for a in CANDIDATES]
        best = max(range(len(CANDIDATES)), key=scores.__getitem__)
        assert picked[q] == best, (questions[q], scores)
    # answer() goes through the same ranking and returns the strings
    g = torch.Generator().manual_seed(0)
    pixel = torch.randn(len(questions), 3, vqa_bb.image_size, vqa_bb.image_size, generator=g)
    assert task.answer(vqa_bb, pixel, questions, CANDIDATES) == [CANDIDATES[i] for i in picked]


def test_rank_top_k_restricts_to_first_token_candidates(vqa_bb):
    from unitrans.tasks.vqa import VQA

    states, mask = _question_states(vqa_bb, ["what color is the square?", "is there a circle?"], seed=1)
    cand_ids, cand_mask = vqa_bb.decoder_tokenize(CANDIDATES, "cpu")
    with torch.no_grad():
        bos = cand_ids[:1, :1].expand(2, 1)
        first = torch.softmax(vqa_bb.model.text_decoder(input_ids=bos, encoder_hidden_states=states,
                                                        encoder_attention_mask=mask).logits[:, 0], -1)
        first = first[:, cand_ids[:, 1]]  # (Q, C)
    picked = VQA(k_test=2).rank(vqa_bb, states, mask, cand_ids, cand_mask).tolist()
    for q, p in enumerate(picked):
        assert p in first[q].topk(2).indices.tolist()


def test_vqa_generate_and_training_loss(vqa_bb):
    from unitrans.tasks.vqa import VQA

    task = VQA(inference="generate", max_answer_length=5)
    pixel = torch.randn(2, 3, vqa_bb.image_size, vqa_bb.image_size)
    answers = task.answer(vqa_bb, pixel, ["what color is it?", "how many?"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    batch = {"image": pixel, "question": ["what color is it?", "how many?"], "answer": ["red", "blue", "2"],
             "weight": torch.tensor([0.7, 0.3, 1.0]), "n": torch.tensor([2, 1])}
    loss = VQA(label_smoothing=0.0).training_step(vqa_bb, batch, None)["vqa_loss"]
    # by hand: weighted sum of the answers' negative log-likelihoods over the 2 questions
    with torch.no_grad():
        st, mk = vqa_bb.encode_question(batch["question"], vqa_bb.encode_image(pixel))
        nll = [-_brute_force_log_likelihood(vqa_bb, st[q:q + 1], mk[q:q + 1], a)
               for q, a in ((0, "red"), (0, "blue"), (1, "2"))]
    expected = (0.7 * nll[0] + 0.3 * nll[1] + 1.0 * nll[2]) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-4)


class _UnansweredSplit(torch.utils.data.Dataset):
    """Three questions without human answers (as VQAv2 test-dev), with an answer list."""

    answer_list = CANDIDATES

    def __len__(self):
        return 3

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randn(3, 64, 64, generator=g), "question": "what color is it?", "question_id": 10 + i,
                "answers": []}


def _collate(items):
    return {"image": torch.stack([x["image"] for x in items]), **{k: [x[k] for x in items] for k in
                                                                   ("question", "question_id", "answers")}}


def test_vqa_split_without_answers_says_where_its_answers_are(vqa_bb, tmp_path, capsys):
    from unitrans.tasks.vqa import VQA

    task = VQA(k_test=4)
    metrics = task.evaluate(vqa_bb, _UnansweredSplit(), 2, collate=_collate, output_dir=tmp_path, split="test")
    assert metrics == {"n_questions": 3.0}
    out = capsys.readouterr().out
    path = tmp_path / "vqa_result_test.json"
    assert f"its 3 answers are written to {path}, the file the evaluation server scores" in out
    assert "no human answers" in out and [r["question_id"] for r in json.loads(path.read_text())] == [10, 11, 12]
    task.evaluate(vqa_bb, _UnansweredSplit(), 2, collate=_collate, output_dir=None, split="test")
    assert "written to vqa_result_test.json in the output folder after training" in capsys.readouterr().out


def test_caption_generation_strips_the_prompt(caption_bb):
    from unitrans.tasks.captioning import Captioning

    task = Captioning(num_beams=3, max_length=12, min_length=5)
    g = torch.Generator().manual_seed(0)
    pixel = torch.randn(3, 3, caption_bb.image_size, caption_bb.image_size, generator=g)
    ours = task.captions(caption_bb, pixel)
    prompt = task.prompt_ids(caption_bb)
    tok = caption_bb.tokenizer
    hf_prompt = tok([task.options.prompt] * 3, return_tensors="pt")["input_ids"]  # [CLS] prompt [SEP], as HF expects
    with torch.no_grad():
        full = caption_bb.model.generate(pixel_values=pixel, input_ids=hf_prompt, num_beams=3, max_length=12,
                                         min_length=5)
    for row, caption in zip(full, ours):
        assert row[:len(prompt)].tolist() == prompt  # HF's own generate starts from [DEC] prompt too
        assert caption == tok.decode(row[len(prompt):], skip_special_tokens=True).strip()
        assert isinstance(caption, str) and not caption.startswith("a picture of")


def test_caption_training_masks_the_prompt(caption_bb):
    """The LM loss is the mean negative log-likelihood of the caption's tokens and [SEP] only: not of [DEC] and
    the prompt, nor of padding (captions of different lengths), computed here caption by caption."""
    from unitrans.tasks.captioning import Captioning

    task = Captioning(label_smoothing=0.0)
    captions = ["a red circle", "two blue squares left of a small star"]
    pixel = torch.randn(2, 3, caption_bb.image_size, caption_bb.image_size, generator=torch.Generator().manual_seed(5))
    loss = task.training_step(caption_bb, {"image": pixel, "caption": captions}, None)
    assert set(loss) == {"lm_loss"}
    n_prompt = len(task.prompt_ids(caption_bb))  # [DEC] a picture of
    assert n_prompt == 4
    with torch.no_grad():
        image_embeds = caption_bb.encode_image(pixel)
    caption_nll, prompt_nll = [], []
    for b, caption in enumerate(captions):
        ids = caption_bb.tokenizer([task.options.prompt + caption], return_tensors="pt")["input_ids"]  # no padding
        ids[:, 0] = caption_bb.bos_token_id
        with torch.no_grad():
            logits = caption_bb.model.text_decoder(input_ids=ids, encoder_hidden_states=image_embeds[b:b + 1]).logits
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        for t in range(ids.shape[1] - 1):  # position t predicts token t + 1
            (prompt_nll if t + 1 < n_prompt else caption_nll).append(-float(logp[t, ids[0, t + 1]]))
    assert len(caption_nll) == sum(len(caption_bb.tokenizer.tokenize(c)) + 1 for c in captions)  # pieces, [SEP]
    assert float(loss["lm_loss"]) == pytest.approx(sum(caption_nll) / len(caption_nll), rel=1e-5)
    unmasked = (sum(caption_nll) + sum(prompt_nll)) / (len(caption_nll) + len(prompt_nll))
    assert float(loss["lm_loss"]) != pytest.approx(unmasked, rel=1e-3)  # the prompt's tokens would change it


def test_tasks_refuse_backbones_without_a_decoder(caption_bb):
    from unitrans.tasks.captioning import Captioning
    from unitrans.tasks.vqa import VQA

    retrieval = tiny_backbone(task_model="retrieval")
    with pytest.raises(UserError, match='capability EncoderDecoder .*task_model = "captioning"'):
        Captioning().check_backbone(retrieval)
    with pytest.raises(UserError, match='capability QuestionEncoder .*implements: EncoderDecoder, Exportable.*"vqa"'):
        VQA().check_backbone(caption_bb)
    with pytest.raises(UserError, match='capability QuestionEncoder .*task_model = "vqa"'):
        VQA().check_backbone(retrieval)


# ---- data ----------------------------------------------------------------------------------------------------
def test_caption_data_ids_and_missing_files(tmp_path):
    from unitrans.data.blip_json import DataError
    from unitrans.data.caption_json import BlipCaptionData, image_id_from_path

    assert image_id_from_path("val2014/COCO_val2014_000000391895.jpg") == 391895
    with pytest.raises(DataError, match="nope_test.json"):
        BlipCaptionData(tmp_path, test_file=tmp_path / "nope_test.json").setup(32, (0.5,) * 3, (0.5,) * 3)
    (tmp_path / "test.json").write_text(json.dumps([{"image": "a/COCO_x_000000000007.jpg", "caption": ["hi"]}]))
    with pytest.raises(DataError, match="gt.json"):
        BlipCaptionData(tmp_path, test_file=tmp_path / "test.json",
                        test_gt_file=tmp_path / "gt.json").setup(32, (0.5,) * 3, (0.5,) * 3)
    module = BlipCaptionData(tmp_path, test_file=tmp_path / "test.json").setup(32, (0.5,) * 3, (0.5,) * 3)
    assert module.test.references == {7: ["hi"]}


def test_vqa_data_weights_and_answer_list(tmp_path):
    from unitrans.data.blip_json import DataError
    from unitrans.data.vqa_json import BlipVQAData, answer_weights, pre_question

    assert answer_weights(["2", "2", "two", "2"]) == (["2", "two"], [0.75, 0.25])
    assert answer_weights(["tree"], "vg") == (["tree"], [0.2])
    assert pre_question("What color is the ball?!") == "what color is the ball?"
    with pytest.raises(DataError, match="answers.json"):
        BlipVQAData(tmp_path, test_file=None, answer_list=tmp_path / "answers.json").setup(32, (0.5,) * 3, (0.5,) * 3)


def test_shapes_vqa_files_are_consistent(tmp_path):
    from unitrans.data.shapes_tasks import make_shapes_vqa
    from unitrans.metrics.vqa import normalize_answer

    paths = make_shapes_vqa(tmp_path, questions_per_image=4, n_train=10, n_val=2, n_test=5, seed=1)
    layout = {e["image"]: e for e in json.loads(Path(paths["layout"]).read_text())}
    answers = json.loads(Path(paths["answer_list"]).read_text())
    for split in ("train", "val", "test"):
        for q in json.loads(Path(paths[f"vqa_{split}"]).read_text()):
            assert len(q["answer"]) == 10 and q["dataset"] == "vqa"
            scene = layout[q["image"]]
            normalized = [normalize_answer(a) for a in q["answer"]]
            if q["question"] == "how many shapes are there?":
                assert normalized.count(str(len(scene["objects"]))) >= 5
            assert max(set(normalized), key=normalized.count) in answers


# ---- end to end ----------------------------------------------------------------------------------------------
def _run_quickstart(tmp_path: Path, name: str) -> Path:
    out = tmp_path / "run"
    args = ["run", str(ROOT / "examples" / f"quickstart_{name}.toml"), "--output-dir", str(out),
            "--set", f"data.root={tmp_path / 'data'}", "--set", "data.n_train=24", "--set", "data.n_val=4",
            "--set", "data.n_test=6", "--set", "train.max_steps=3", "--set", "train.batch_size=8",
            "--set", "train.progress=false", "--set", "eval.batch_size=16"]
    assert cli.main(args) == 0
    return out


def test_caption_quickstart_end_to_end_and_score(tmp_path, capsys):
    pytest.importorskip("pycocoevalcap")  # the `eval` extra: the captioning task's metrics need it
    out = _run_quickstart(tmp_path, "caption")
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"bleu4", "cider"} <= set(metrics) and metrics["steps"] == 3
    assert (out / "metrics_initial.json").is_file()
    rows = json.loads((out / "captions_test.json").read_text())
    assert len(rows) == 6 and all(set(r) == {"image_id", "caption"} for r in rows)
    capsys.readouterr()
    gt = tmp_path / "data" / "test_gt.json"
    assert cli.main(["score", "caption", "--results", str(out / "captions_test.json"), "--annotations", str(gt)]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["bleu4"] == pytest.approx(metrics["bleu4"]) and scored["cider"] == pytest.approx(metrics["cider"])


def test_vqa_quickstart_end_to_end_and_score(tmp_path, capsys):
    out = _run_quickstart(tmp_path, "vqa")
    metrics = json.loads((out / "metrics.json").read_text())
    ann = tmp_path / "data" / "vqa_test.json"
    assert metrics["vqa_acc"] == pytest.approx(official_vqa_accuracy(out / "vqa_result_test.json", ann))
    rows = json.loads((out / "vqa_result_test.json").read_text())
    assert rows and all(set(r) == {"question_id", "answer"} for r in rows)
    capsys.readouterr()
    assert cli.main(["score", "vqa", "--results", str(out / "vqa_result_test.json"), "--annotations", str(ann)]) == 0
    assert json.loads(capsys.readouterr().out)["vqa_acc"] == pytest.approx(metrics["vqa_acc"])


def test_score_command_on_hand_written_files(tmp_path, capsys):
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"question_id": 1, "answer": "Two"}, {"question_id": 2, "answer": "red"}]))
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"question_id": 1, "question": "how many?", "answer": ["2"] * 10, "image": "x.jpg"},
                               {"question_id": 2, "question": "color?", "answer": ["red"] + ["blue"] * 9,
                                "image": "y.jpg"}]))
    assert cli.main(["score", "vqa", "--results", str(res), "--annotations", str(ann)]) == 0
    assert json.loads(capsys.readouterr().out)["vqa_acc"] == pytest.approx(65.0)
    assert cli.main(["score", "vqa", "--results", str(tmp_path / "missing.json"), "--annotations", str(ann)]) == 2
    assert "missing.json" in capsys.readouterr().err


class _AnsweredSplit(_UnansweredSplit):
    """The same questions, each with ten human answers "two"; the only candidate answer is "2"."""

    answer_list = ["2"]

    def __getitem__(self, i):
        return {**super().__getitem__(i), "answers": ["two"] * 10}


def test_vqa_task_scores_by_the_official_rules_unless_told_to_normalize(vqa_bb):
    from unitrans.tasks import vqa_v1

    official = vqa_v1(k_test=1).evaluate(vqa_bb, _AnsweredSplit(), 3, collate=_collate)
    assert official["vqa_acc"] == 0.0 and official["acc"] == 0.0  # "2" is not what the humans wrote
    lenient = vqa_v1(k_test=1, normalize_answers=True).evaluate(vqa_bb, _AnsweredSplit(), 3, collate=_collate)
    assert lenient["vqa_acc"] == 100.0 and lenient["acc"] == 100.0
