# Sourced by bench/codegen_lora_vs_full.sh and bench/codegen_qlora.sh: the corpus and the base model they share.
#   codegen_data OUT          stdlib docstring->function pairs in OUT/data, split by source file (kept if there)
#   pretrain_code_base OUT BASE DIM LAYERS HEADS STEPS [OPTION...]
#                             a small Llama pre-trained from scratch (`run_llama.py --option pretrain`, Llama 2
#                             tokenizer) on the source files of OUT/data's training split, whole, validated on
#                             those of its validation split (no test file is seen), written to BASE
codegen_data() {
  [ -f "$1/data/train.jsonl" ] || python3 -m codegen.data --out "$1/data"
}

split_files() {  # the stdlib source files of one split (each pair records its file's path under the stdlib)
  local stdlib
  stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
  python3 -c 'import json, sys; print("\n".join(sorted({json.loads(l)["path"] for l in open(sys.argv[1])})))' "$1" |
    sed "s|^|$stdlib/|"
}

pretrain_code_base() {
  local out=$1 base=$2 dim=$3 layers=$4 heads=$5 steps=$6 train_files valid_files
  shift 6
  mapfile -t train_files < <(split_files "$out/data/train.jsonl")
  mapfile -t valid_files < <(split_files "$out/data/valid.jsonl")
  python3 run_llama.py --option pretrain --train_text "${train_files[@]}" --valid_text "${valid_files[@]}" \
      --dim "$dim" --n_layers "$layers" --n_heads "$heads" --max_seq_len 256 --lr 1e-3 --warmup_steps 50 \
      --max_steps "$steps" --time_budget 0 --eval_interval 200 --quiet --out "$base" "$@"
}
