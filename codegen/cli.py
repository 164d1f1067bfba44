"""`python run_llama.py --option {codegen,code_eval,code_generate,serve}`: each option lives in its
own module, which adds its flags with add_arguments(parser) and runs with run(args) -> exit status."""
import argparse
import importlib
import sys

from quantize import KINDS

OPTIONS = {
    "codegen": "codegen.train",  # fine-tune on code (full, LoRA, FIM)
    "code_eval": "codegen.evaluate",  # metrics, sandboxed execution, pass@k
    "code_generate": "codegen.generate",  # prompt -> code, streamed to stdout
    "serve": "codegen.serve",  # a local web page doing the same
}


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="run_llama.py", description=__doc__, add_help=False)
    parser.add_argument("-h", "--help", action="store_true")  # answered once the option's flags are in
    parser.add_argument("--option", choices=sorted(OPTIONS), required=True)
    parser.add_argument("--pretrained-model-path", default="stories42M.pt")
    parser.add_argument("--tokenizer", default=None,
                        help="a SentencePiece .model, a tokenizer.json or a model folder (default: a Hugging Face "
                             "folder's own tokenizer, else tokenizer.model)")
    parser.add_argument("--adapter", default=None,
                        help="a LoRA adapter folded into the model: a PEFT folder, or a LoRA code training's "
                             "best_adapter.pt (onto its base checkpoint)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the dtype the weights are stored in (default float32; --bf16 is autocast, apart)")
    parser.add_argument("--quantize", choices=KINDS, default="none",
                        help="hold the model's linear layers (not the embedding, nor the output projection) in 4-bit "
                             "NF4 or per-row int8 (quantize.py); with --option codegen, the frozen base of a LoRA "
                             "training (QLoRA) (default: none)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--use_gpu", action="store_true")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                        help="code models are always causal (next-token prediction); --no-causal is refused")
    option = parser.parse_known_args(argv)[0].option
    module = importlib.import_module(OPTIONS[option])
    module.add_arguments(parser)
    if "-h" in argv or "--help" in argv:  # before parsing: an option's required flags must not block its help
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if not args.causal:
        print(f"error: --no-causal: --option {option} predicts the next token, which a non-causal model would see "
              "in its input; code models are always causal", file=sys.stderr)
        return 2
    try:
        return module.run(args)
    except (ValueError, FileNotFoundError) as e:  # UsageError, DataError, CheckpointError, DeviceError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
