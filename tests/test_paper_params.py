"""The paper's "# Tunable": ``params`` on every paper and ablation spec (BLIP-base architecture, built on the meta
device: no weights, no download), each count pinned to its closed form written here, and to the paper's printed
number where a structure explains it (README, "Parameter accounting", says line by line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unitrans.engine.params import count_spec
from unitrans.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
D, R, LAYERS = 768, 64, 12  # BLIP-base width, the paper's rank, layers per branch
PAIR = 2 * D * R  # one A (r, d) and B (d, r)
LAMBDA = D + R  # one λa (r) and λb (d)
QASN = LAYERS * (R + 3 * D)  # per fusion block: λa, λb, α, β
TEMP = 1  # BLIP's learned temperature (retrieval specs with the recipe on)
HEADS = 2 * (D * 256 + 256) + (D * 2 + 2)  # vision_proj, text_proj (768 -> 256) and the ITM head (768 -> 2)
N_RETRIEVAL = LAYERS * 2 * 4  # (q, kv) in the ViT, the text-only pass, the fused-pass self-attention, cross-attention
N_VQA = LAYERS * 2 * 5  # ViT, question encoder (fused self-attention, cross-attention), decoder (self, cross)
N_CAPTION = LAYERS * 2 * 3  # ViT, decoder (self, cross)

CASES = {  # spec -> (closed form, the paper's printed count in millions or None, where it is printed)
    "ablation/frozen.toml": (0, 0.0, "Table 8"),
    "ablation/full_finetune.toml": (223_744_258 + TEMP, None, "Table 8: 223M (BLIP-base)"),
    "ablation/lora_r32.toml": (216 * 2 * D * 32 + TEMP, 10.6, "Tables 2, 3, 6, 8, 9"),
    "ablation/scaling_vectors.toml": (2 * PAIR + N_RETRIEVAL * LAMBDA + 3 + TEMP, 0.28, "Tables 8, 9"),
    "ablation/shared_random.toml": (PAIR + N_RETRIEVAL * LAMBDA + 3 + TEMP, 0.18, "Tables 8, 9"),
    "ablation/qasn.toml": (PAIR + N_RETRIEVAL * LAMBDA + 3 + TEMP + QASN, 0.21, "Tables 8, 9"),
    "ablation/mcam.toml": (PAIR + N_RETRIEVAL * LAMBDA + 3 + TEMP + QASN, 0.21, "Tables 8, 9"),
    "ablation/didemo_linear_probe.toml": (HEADS + TEMP, 0.4, "Table 9"),
    "paper/flickr30k_vcra.toml": (PAIR + N_RETRIEVAL * LAMBDA + 3 + TEMP + QASN, 0.2, "Table 2"),
    "paper/coco_retrieval_vcra.toml": (PAIR + N_RETRIEVAL * LAMBDA + 3 + TEMP + QASN, 0.2, "Table 3"),
    "paper/didemo_vcra.toml": (PAIR + N_RETRIEVAL * LAMBDA + 3 + TEMP + QASN, 0.2, "Table 6"),
    "paper/vqav2_vcra.toml": (2 * PAIR + N_VQA * LAMBDA + 3 + QASN, 0.3, "Table 4"),
    "paper/msrvtt_qa_vcra.toml": (2 * PAIR + N_VQA * LAMBDA + 3 + QASN, 0.3, "Table 6"),
    "paper/coco_caption_vcra.toml": (2 * PAIR + N_CAPTION * LAMBDA + 2, 0.26, "Table 7, captioning"),
}


def _printed(count: int, paper: float) -> bool:
    """The paper prints counts in millions with as many decimals as it gives (0.2M, 0.21M, 10.6M)."""
    decimals = len(repr(paper).split(".")[1]) if "." in repr(paper) else 0
    return round(count / 1e6, decimals) == paper


@pytest.mark.parametrize("name", sorted(CASES))
def test_tunable_count_of_every_paper_spec(name):
    closed_form, paper, where = CASES[name]
    counts = count_spec(load_spec(EXAMPLES / name))
    assert counts["trainable"] == closed_form, where
    if paper is not None:
        assert _printed(counts["trainable"], paper), f"{name}: {counts['trainable']:,} is not {where}'s {paper}M"


def test_full_fine_tuning_is_blips_223m():
    assert int(CASES["ablation/full_finetune.toml"][0] / 1e6) == 223


@pytest.mark.parametrize("rank", [8, 256])
def test_rank_sweep_counts(rank):
    """Fig. 4's sweep: 2·d·r + 96·(d + r) + 12·(r + 3d) + 3 + 1 at each rank."""
    spec = load_spec(EXAMPLES / "paper/flickr30k_rank_sweep.toml", [f"adapters.0.rank={rank}"])
    expected = 2 * D * rank + N_RETRIEVAL * (D + rank) + LAYERS * (rank + 3 * D) + 3 + TEMP
    assert count_spec(spec)["trainable"] == expected


def test_the_old_structure_gave_72_pairs_and_missed_the_paper():
    """Without the fused-pass points (the 72-pair structure) the count is 158,211: the paper's 0.18M needs 96."""
    spec = load_spec(EXAMPLES / "ablation/shared_random.toml",
                     ['adapters.0.targets=["vision.attn.[qkv]", "text.attn.[qkv]", "fusion.attn.[qkv]"]',
                      "task.learn_temperature=false"])
    assert count_spec(spec)["trainable"] == PAIR + LAYERS * 2 * 3 * LAMBDA + 3 == 158_211
    assert not _printed(158_211, 0.18)
