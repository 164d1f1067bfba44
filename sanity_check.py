"""Compare a loaded checkpoint's outputs with the course's reference tensors (sanity_check.data).

    python sanity_check.py [--pretrained-model-path stories42M.pt] [--data sanity_check.data]
                           [--norm rmsnorm|layernorm] [--causal|--no-causal]

The course's reference was computed without a causal mask (every position attends to every position,
pads included), which is what is checked by default. The sanity_check.data that setup.sh places is the
original course's, computed with RMSNorm, hence the default norm; this assignment variant's own file
was computed with its LayerNorm (--norm layernorm). On a mismatch the other settings (norm x causal)
are tried, and the report says which one, if any, matches. Exit status: 0 match, 1 mismatch, 2 a
missing or unusable checkpoint or reference file.
"""
import argparse
import itertools
import sys
from pathlib import Path

import torch

from llama import load_pretrained
from utils import UsageError

# Two token sequences (the second one padded), as in the course's sanity check.
SENT_IDS = torch.tensor([[101, 7592, 2088, 102, 0, 0, 0, 0],
                         [101, 7592, 15756, 2897, 2005, 17953, 2361, 102]])
OUTPUTS = ("logits", "hidden_states")


def load_reference(path) -> dict:
    try:
        reference = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise UsageError(f"{path}: not a readable reference file ({type(e).__name__}: {e}); "
                         "run `bash setup.sh` to place sanity_check.data") from None
    if not isinstance(reference, dict) or not all(isinstance(reference.get(k), torch.Tensor) for k in OUTPUTS):
        raise UsageError(f"{path}: expected a dict of tensors {OUTPUTS}, as in the course's sanity_check.data")
    return reference


def load_model(path, norm, causal):
    try:
        model = load_pretrained(path, norm_type=norm, causal=causal).eval()
    except ValueError as e:  # CheckpointError, or model_args that make no valid config
        raise UsageError(str(e)) from None
    needed = {"vocab_size": int(SENT_IDS.max()) + 1, "max_seq_len": SENT_IDS.shape[1]}  # by the sanity-check tokens
    for name, least in needed.items():
        if getattr(model.config, name) < least:
            raise UsageError(f"{path}: {name} {getattr(model.config, name)} is too small for the sanity-check tokens "
                             f"(they need {least}); use stories42M.pt")
    return model


def check_shapes(outputs: dict, reference: dict, args):
    for name in OUTPUTS:
        if outputs[name].shape != reference[name].shape:
            raise UsageError(f"{args.checkpoint}: {name} of shape {tuple(outputs[name].shape)}, but {args.data} has "
                             f"{tuple(reference[name].shape)}: not the checkpoint the reference was computed with")


def outputs_of(args, norm, causal) -> dict:
    model = load_model(args.checkpoint, norm, causal)
    with torch.no_grad():
        return dict(zip(OUTPUTS, model(SENT_IDS)))


def matches(outputs: dict, reference: dict, args) -> bool:
    return all(torch.allclose(outputs[k], reference[k], atol=args.atol, rtol=args.rtol) for k in OUTPUTS)


def compare(outputs: dict, reference: dict, args) -> bool:
    """Print each output's largest difference from the reference; True when all are close."""
    for name in OUTPUTS:
        diff = (outputs[name] - reference[name]).abs().max().item()
        ok = torch.allclose(outputs[name], reference[name], atol=args.atol, rtol=args.rtol)
        print(f"{name}: max |diff| = {diff:.3e} ({'ok' if ok else 'MISMATCH'})")
    return matches(outputs, reference, args)


def settings(norm, causal) -> str:
    return f"--norm {norm} --{'' if causal else 'no-'}causal"


def diagnose(reference: dict, args) -> None:
    """After a mismatch: try the other norm x causal settings and say which one, if any, matches."""
    found = [(norm, causal) for norm, causal in itertools.product(("rmsnorm", "layernorm"), (False, True))
             if (norm, causal) != (args.norm, args.causal)
             and matches(outputs_of(args, norm, causal), reference, args)]
    if found:
        print(f"diagnosis: the reference matches this checkpoint with {' and with '.join(settings(*f) for f in found)} "
              f"(checked: {settings(args.norm, args.causal)}). The implementation computes the reference; "
              "rerun with those flags, or use the reference file made with your settings.")
    else:
        print("diagnosis: no setting of --norm and --causal matches: either the checkpoint is not the one the "
              "reference was computed with, or the model computes something else (norms, attention, RoPE, "
              "feed-forward).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained-model-path", "--checkpoint", dest="checkpoint", default="stories42M.pt",
                        help="the checkpoint to check (default: %(default)s)")
    parser.add_argument("--data", default="sanity_check.data", help="reference tensors (default: %(default)s)")
    parser.add_argument("--norm", choices=("rmsnorm", "layernorm"), default="rmsnorm",
                        help="norm to build the model with (default: %(default)s, the norm of the course's file)")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=False,
                        help="causal attention mask (default: off, as the course's reference computed it)")
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default: %(default)s)")
    parser.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (default: %(default)s)")
    args = parser.parse_args(argv)
    for path, what in ((args.checkpoint, "checkpoint"), (args.data, "reference data")):
        if not Path(path).is_file():
            print(f"sanity_check: {what} {path} not found. Run `bash setup.sh` (it downloads stories42M.pt "
                  f"when the network allows), or pass --pretrained-model-path / --data.", file=sys.stderr)
            return 2
    torch.manual_seed(1337)
    try:
        reference = load_reference(args.data)
        outputs = outputs_of(args, args.norm, args.causal)
        check_shapes(outputs, reference, args)
        ok = compare(outputs, reference, args)
        print("Your Llama implementation is correct!" if ok else "Sanity check FAILED")
        if not ok:
            diagnose(reference, args)
    except UsageError as e:
        print(f"sanity_check: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
