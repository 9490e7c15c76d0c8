#!/usr/bin/env bash
# The small-scale Table 8, end to end, from a fresh clone (offline, CPU; about 1 h 50 min on 2 cores):
#   1. pretraining of the minilm BLIP on single-object shapes (ITC + ITM), exported   -> runs/table8/pretrained_blip
#   2. its answer decoder's pretraining on single-object shapes VQA, exported          -> runs/table8/pretrained_blip_vqa
#   3. the retrieval rows, 3 seeds    -> runs/table8_small/      (results.md/.json/.csv, plots)
#   4. the easy-VQA rows, 3 seeds     -> runs/table8_small_vqa/
# A finished stage is skipped, so rerunning after an interruption resumes; arguments go to both sweeps, e.g.
#   bash examples/ablation/table8_small.sh --seeds 0               # one seed (a third of the sweep time)
#   bash examples/ablation/table8_small.sh --set train.device=cuda
# PYTHON selects the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}

stage() {  # stage SPEC RUN_DIR EXPORT_DIR: train SPEC (resuming) and export it, unless EXPORT_DIR is complete
  if [ -f "$3/config.json" ] && [ -f "$3/model.safetensors" ]; then
    echo "[table8] $3 exists, skipped"
    return
  fi
  "$PY" -m unitrans run "$1" --resume  # a fresh start, or the continuation of an interrupted one
  "$PY" -m unitrans export "$1" --checkpoint "$2" --out "$3"
}

stage examples/ablation/table8_pretrain.toml runs/table8/pretrain runs/table8/pretrained_blip
stage examples/ablation/table8_pretrain_vqa.toml runs/table8/pretrain_vqa runs/table8/pretrained_blip_vqa
"$PY" -m unitrans sweep examples/ablation/table8_small.toml "$@"
"$PY" -m unitrans sweep examples/ablation/table8_small_vqa.toml "$@"
