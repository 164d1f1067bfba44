#!/usr/bin/env bash
# Code fine-tuning on the standard-library corpus, one base, the same steps, four ways, end to end through the CLI
# (RUNS, in this order by default):
#   base        the base itself, and base-nf4 with its block linear layers in NF4 (what quantization alone costs):
#               one LoRA step at lr 0, which leaves B = 0, evaluated like the runs below
#   full        every weight trains (AdamW, lr 3e-4)
#   lora        LoRA (rank RANK, alpha 2 x RANK, every projection) on the fp32 base (AdamW, lr 1e-3)
#   qlora       the same LoRA on the base's block linear layers held in NF4 + double quantization (--quantize nf4)
#   qlora8      qlora with Adam's moments in 8 bits (--optim adamw8bit)
# 1. data and base: bench/codegen_base.sh, as bench/codegen_lora_vs_full.sh uses it (stdlib docstring->function pairs split by
#    file; a small Llama pre-trained from scratch on the training split's source files), skipped when $BASE exists
#    (BASE=runs/lora_vs_full/base.pt reuses that script's base);
# 2. the fine-tunings, FT_STEPS steps each, same data order and seed; each writes $OUT/RUN/summary.json;
# 3. code_eval of each best.pt (LoRA merged; for QLoRA into the dequantized base) on the first EVAL_LIMIT test
#    pairs (0 skips it);
# 4. one table: best validation loss, chrF, s/step, peak RSS (ru_maxrss, as code training reports it), and the
#    bytes of the weights and of the optimizer state as last.pt holds them.
# RANK defaults to 32 so that every LoRA matrix has >= 4096 elements: AdamW8bit (like bitsandbytes') keeps smaller
# tensors' moments in float32, and at dim 128 a rank-8 adapter would leave --optim adamw8bit nothing to quantize.
# The NF4 layers are the blocks' linear layers only: the tied 32000-row embedding (and so the output projection)
# stays in float32, and at this toy scale it is most of the model.
#   OUT=runs/qlora PRE_STEPS=300 FT_STEPS=150 bash bench/codegen_qlora.sh   # the defaults: ~16 min on this 2-core CPU
#   RUNS="lora qlora" BASE=runs/lora_vs_full/base.pt bash bench/codegen_qlora.sh   # a subset, on an existing base
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/qlora}; BASE=${BASE:-$OUT/base.pt}; DIM=${DIM:-128}; LAYERS=${LAYERS:-4}; HEADS=${HEADS:-4}
PRE_STEPS=${PRE_STEPS:-300}; FT_STEPS=${FT_STEPS:-150}; EVAL_EVERY=${EVAL_EVERY:-50}; EVAL_LIMIT=${EVAL_LIMIT:-30}
RANK=${RANK:-32}; RUNS=${RUNS:-base base-nf4 full lora qlora qlora8}; EXTRA=${EXTRA:-}  # EXTRA: e.g. --use_gpu
# One thread by default: on this shared 2-core machine a second OpenMP thread made steps 2x slower, not faster
# (bench/README.md, "Threads"); give the core count on an idle machine.
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p "$OUT"
source bench/codegen_base.sh
codegen_data "$OUT"
# shellcheck disable=SC2086  # EXTRA holds several options
[ -f "$BASE" ] || pretrain_code_base "$OUT" "$BASE" "$DIM" "$LAYERS" "$HEADS" "$PRE_STEPS" $EXTRA
common=(--pretrained-model-path "$BASE" --train_data "$OUT/data/train.jsonl" --valid_data "$OUT/data/valid.jsonl"
        --max_len 256 --batch_size 8 --valid_limit 64 --eval_samples 16 --warmup_steps 20 --max_steps "$FT_STEPS"
        --eval_every "$EVAL_EVERY" --quiet $EXTRA)
lora=(--mode lora --lora_rank "$RANK" --lora_alpha $((2 * RANK)) --lr 1e-3
      --lora_targets compute_query,compute_key,compute_value,compute_output,w1,w2,w3)
for run in $RUNS; do
  case $run in
    base)     flags=("${lora[@]}" --lr 0 --max_steps 1) ;;
    base-nf4) flags=("${lora[@]}" --lr 0 --max_steps 1 --quantize nf4) ;;
    full)     flags=(--mode full --lr 3e-4) ;;
    lora)     flags=("${lora[@]}") ;;
    qlora)    flags=("${lora[@]}" --quantize nf4) ;;
    qlora8)   flags=("${lora[@]}" --quantize nf4 --optim adamw8bit) ;;
    *) echo "error: RUNS: unknown run '$run' (choose among base base-nf4 full lora qlora qlora8)" >&2; exit 2 ;;
  esac
  echo "== $run: ${flags[*]}"
  python3 run_llama.py --option codegen "${common[@]}" "${flags[@]}" --out_dir "$OUT/$run"
  if [ "$EVAL_LIMIT" -gt 0 ]; then
    python3 run_llama.py --option code_eval --pretrained-model-path "$OUT/$run/best.pt" --data "$OUT/data/test.jsonl" \
        --limit "$EVAL_LIMIT" --max_new_tokens 128 --out_dir "$OUT/eval-$run" --quiet $EXTRA > /dev/null
  fi
done
# The table. s/step: median wall time per step over the log's --log_every windows that hold no evaluation and
# follow none (evaluations and checkpoint writes excluded). Weights, optimizer state: the bytes of last.pt's tensors
# (tied ones once), the base's (for QLoRA its packed NF4 codes and statistics, and the fp32 embedding and norms)
# + the adapters'. For the base rows, the lr-0 LoRA and its optimizer are left out.
python3 - "$OUT" $RUNS <<'EOF'
import csv, json, statistics, sys, torch
out, runs = sys.argv[1], sys.argv[2:]
def mib(tensors):
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}  # tied ones once
    return sum(storages.values()) / 2**20
def seconds_per_step(log):
    rows = list(csv.DictReader(open(log)))
    times = [(float(b["elapsed"]) - float(a["elapsed"])) / (int(b["step"]) - int(a["step"]))
             for a, b in zip(rows, rows[1:]) if not a["valid_loss"] and not b["valid_loss"]]
    return f"{statistics.median(times):.2f}" if times else "-"  # -: every window held an evaluation
def test_chrf(run):
    try:
        return f'{json.load(open(f"{out}/eval-{run}/report.json"))["test_set"]["metrics"]["chrf"]:.2f}'
    except (OSError, KeyError):
        return "-"
lora_loss = json.load(open(f"{out}/lora/summary.json"))["best_valid_loss"] if "lora" in runs else None
print("| run | trainable | best valid loss | vs lora | chrF (valid, 16) | chrF (test) | s/step | peak RSS MiB "
      "| weights MiB (base + adapters) | optimizer state MiB |")
print("|---|---|---|---|---|---|---|---|---|---|")
for run in runs:
    s = json.load(open(f"{out}/{run}/summary.json"))
    last = torch.load(f"{out}/{run}/last.pt", map_location="cpu", weights_only=False)
    base = mib(t for k, t in last["model"].items() if ".lora_" not in k)
    adapters = mib(t for k, t in last["model"].items() if ".lora_" in k)
    moments = mib(t for state in last["optimizer"]["state"].values() for t in state.values() if torch.is_tensor(t))
    is_base = run.startswith("base")
    weights = f"{base:.2f}" + ("" if is_base or not adapters else f" + {adapters:.2f}")
    versus = f'{100 * (s["best_valid_loss"] / lora_loss - 1):+.2f} %' if lora_loss else "-"
    steps = "-" if is_base else seconds_per_step(f"{out}/{run}/log.csv")
    print(f'| {run} | {"-" if is_base else format(s["trainable_parameters"], ",")} | {s["best_valid_loss"]:.4f} '
          f'| {versus} | {s["chrf"]:.2f} | {test_chrf(run)} | {steps} | {s["peak_memory_bytes"] / 2**20:.0f} '
          f'| {weights} | {"-" if is_base else f"{moments:.3f}"} |')
EOF
