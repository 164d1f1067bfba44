#!/usr/bin/env bash
# Everything that needs a GPU, in two parts that each fit a 10-minute command on one H100:
#
#   bash bench/gpu.sh checks    # CUDA tests, then bench/decode.py and bench/train.py --device cuda (~5 min)
#   bash bench/gpu.sh codegen   # LoRA vs full fine-tuning for code at GPU scale (~5-10 min)
#
# Logs and JSON go to $OUT (default runs/gpu). The assets the tests need are the ones setup.sh placed
# in the repository root (data/, reference/, tokenizer.model, ...); when running through a device
# tool that copies only tracked files, carry those paths along.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

case "${1:-checks}" in
  checks)
    # every CUDA-only test (they skip on CPU), then the benchmarks; stop at the first failure
    python3 -m pytest -q -p no:cacheprovider -rs tests/test_llama.py tests/test_generate.py -k cuda 2>&1 \
      | tee "$OUT/tests.txt"
    python3 bench/decode.py --device cuda --json 2>&1 | tee "$OUT/decode.txt"
    python3 bench/decode.py --device cuda --norm_type rmsnorm --batch_sizes 1 --reference-tokens 64 --json 2>&1 \
      | tee "$OUT/decode_hf.txt"
    python3 bench/train.py --device cuda --json 2>&1 | tee "$OUT/train.txt"
    ;;
  codegen)
    OUT="$OUT/lora_vs_full" DIM=${DIM:-512} LAYERS=${LAYERS:-8} HEADS=${HEADS:-8} PRE_STEPS=${PRE_STEPS:-5000} \
      FT_STEPS=${FT_STEPS:-1500} EXTRA=--use_gpu TRAIN_EXTRA=--bf16 bash bench/codegen_lora_vs_full.sh 2>&1 \
      | tee "$OUT/codegen.txt"
    ;;
  *)
    echo "usage: bash bench/gpu.sh checks|codegen" >&2
    exit 2
    ;;
esac
