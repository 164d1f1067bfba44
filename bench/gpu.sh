#!/usr/bin/env bash
# Everything that needs a GPU, most important first, each step logged to $OUT as it finishes:
#
#   bash bench/gpu.sh checks    # CUDA tests, then bench/decode.py and bench/train.py --device cuda (~5 min)
#   bash bench/gpu.sh codegen   # LoRA vs full fine-tuning for code at GPU scale (~5-10 min)
#   bash bench/gpu.sh distributed  # 1 process vs DDP vs FSDP2 on every GPU here: step time, peak memory (~3 min)
#   bash bench/gpu.sh all       # all three, in that order: under a hard time limit, what finished is in $OUT
#
# A failing step is reported and the next one still runs (GPU time is scarce); the exit status says
# whether all passed. Logs and JSON go to $OUT (default runs/gpu). The assets the tests need are the
# ones setup.sh placed in the repository root (data/, reference/, tokenizer.model, ...); when running
# through a device tool that copies only tracked files, carry those paths along.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()

step() {  # step NAME COMMAND...: run it, tee its output to $OUT/NAME.txt, remember a failure
  local name=$1; shift
  echo "=== $name: $* ($(date +%T))"
  "$@" 2>&1 | tee "$OUT/$name.txt"
  local status=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] || { echo "=== $name FAILED (exit $status)"; failed+=("$name"); }
}

checks() {
  step tests python3 -m pytest -q -p no:cacheprovider -rs tests/test_llama.py tests/test_decoding.py tests/test_quantize.py -k cuda
  step decode python3 bench/decode.py --device cuda --json
  # HF transformers against our eager paths (the compiled ones were timed above; compiling again costs minutes)
  step decode_hf python3 bench/decode.py --device cuda --norm_type rmsnorm --batch_sizes 1,32 --reference-tokens 64 \
    --no-compile --json
  step train python3 bench/train.py --device cuda --json
  # a Hugging Face folder in the Llama-3.2-1B shape: load, decode beside transformers, a LoRA step
  step hf python3 bench/hf.py --device cuda --folder "$OUT/llama1b" --json
}

codegen() {
  step codegen env OUT="$OUT/lora_vs_full" DIM="${DIM:-512}" LAYERS="${LAYERS:-8}" HEADS="${HEADS:-8}" \
    PRE_STEPS="${PRE_STEPS:-5000}" FT_STEPS="${FT_STEPS:-1500}" EXTRA=--use_gpu TRAIN_EXTRA=--bf16 \
    bash bench/codegen_lora_vs_full.sh
}

distributed() {  # on 1 GPU: DDP's overhead against no DDP; on several: FSDP2's peak memory against DDP's
  local n; n=$(nvidia-smi -L | wc -l)
  step distributed_42m python3 bench/distributed.py --device cuda --nproc "$n" --shape stories42M --batch 16 \
    --seq_len 256 --json
  step distributed_1b python3 bench/distributed.py --device cuda --nproc "$n" --shape Llama-3.2-1B --batch 8 \
    --seq_len 512 --json
}

step gpu nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step torch python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
case "${1:-checks}" in
  checks) checks ;;
  codegen) codegen ;;
  distributed) distributed ;;
  all) checks; codegen; distributed ;;
  *) echo "usage: bash bench/gpu.sh checks|codegen|distributed|all" >&2; exit 2 ;;
esac
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]}"
  exit 1
fi
echo "all steps passed; logs in $OUT"
