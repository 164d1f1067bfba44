#!/usr/bin/env bash
# LoRA vs full fine-tuning on the standard-library corpus, end to end through the CLI:
#   1. build docstring->function pairs from the running Python's stdlib (split by source file);
#   2. pre-train a small Llama from scratch (`run_llama.py --option pretrain`, Llama 2 tokenizer: stories260K's
#      512-token vocab is too small for Python) on the source files of the training split, whole, validated on
#      those of the validation split (no test file is seen);
#   3. fine-tune that base on the pairs, fully and with LoRA (rank 8 on every projection), same steps;
#   4. evaluate all three on the test split (chrF, BLEU, ROUGE-L, syntax and execution rates).
# The base's log is $OUT/base-log.csv; each fine-tuning run's summary.json (time per epoch, peak memory,
# trainable parameters, best validation loss) and eval report.json land in $OUT. Sizes are variables so a
# GPU run can scale them up:
#   OUT=runs/lora_vs_full DIM=512 LAYERS=8 PRE_STEPS=5000 FT_STEPS=1500 EXTRA=--use_gpu bash bench/codegen_lora_vs_full.sh
# (bench/gpu.sh codegen runs exactly that, with bf16 autocast for training).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/lora_vs_full}; DIM=${DIM:-128}; LAYERS=${LAYERS:-4}; HEADS=${HEADS:-4}
PRE_STEPS=${PRE_STEPS:-800}; FT_STEPS=${FT_STEPS:-300}; EVAL_LIMIT=${EVAL_LIMIT:-60}; EXTRA=${EXTRA:-}
TRAIN_EXTRA=${TRAIN_EXTRA:-}  # training-only options, e.g. --bf16
mkdir -p "$OUT"
source bench/codegen_base.sh
codegen_data "$OUT"
# shellcheck disable=SC2086  # EXTRA and TRAIN_EXTRA hold several options
pretrain_code_base "$OUT" "$OUT/base.pt" "$DIM" "$LAYERS" "$HEADS" "$PRE_STEPS" $EXTRA $TRAIN_EXTRA
common=(--train_data "$OUT/data/train.jsonl" --valid_data "$OUT/data/valid.jsonl" --max_len 256 --batch_size 8
        --valid_limit 64 --eval_samples 16 --quiet $EXTRA $TRAIN_EXTRA)
train() { python3 run_llama.py --option codegen "${common[@]}" "$@"; }
train --pretrained-model-path "$OUT/base.pt" --mode full --lr 3e-4 --warmup_steps 20 --max_steps "$FT_STEPS" \
      --eval_every 100 --out_dir "$OUT/full"
train --pretrained-model-path "$OUT/base.pt" --mode lora --lora_rank 8 --lora_alpha 16 \
      --lora_targets compute_query,compute_key,compute_value,compute_output,w1,w2,w3 --lr 1e-3 --warmup_steps 20 \
      --max_steps "$FT_STEPS" --eval_every 100 --out_dir "$OUT/lora"
for run in base full lora; do
  model="$OUT/$run/best.pt"; [ "$run" = base ] && model="$OUT/base.pt"
  python3 run_llama.py --option code_eval --pretrained-model-path "$model" --data "$OUT/data/test.jsonl" \
      --limit "$EVAL_LIMIT" --max_new_tokens 128 --out_dir "$OUT/eval-$run" --quiet $EXTRA
done
echo "results: $OUT/base-log.csv, $OUT/{full,lora}/summary.json and $OUT/eval-{base,full,lora}/report.json"
