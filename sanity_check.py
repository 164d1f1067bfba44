"""Compare a loaded checkpoint's outputs with the course's reference tensors (sanity_check.data).

    python sanity_check.py [--checkpoint stories42M.pt] [--data sanity_check.data] [--norm rmsnorm]

The reference was computed with RMSNorm, so that is the default; --norm layernorm checks the
assignment's LayerNorm instead (and is expected to differ). Exit status: 0 match, 1 mismatch,
2 a missing or unusable checkpoint or reference file.
"""
import argparse
import sys
from pathlib import Path

import torch

from llama import load_pretrained

# Two token sequences (the second one padded), as in the course's sanity check.
SENT_IDS = torch.tensor([[101, 7592, 2088, 102, 0, 0, 0, 0],
                         [101, 7592, 15756, 2897, 2005, 17953, 2361, 102]])
OUTPUTS = ("logits", "hidden_states")


class InputError(Exception):
    """A checkpoint or reference file that cannot be checked; main() prints it and exits with 2."""


def load_reference(path) -> dict:
    try:
        reference = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise InputError(f"{path}: not a readable reference file ({type(e).__name__}: {e}); "
                         "run `bash setup.sh` to place sanity_check.data") from None
    if not isinstance(reference, dict) or not all(isinstance(reference.get(k), torch.Tensor) for k in OUTPUTS):
        raise InputError(f"{path}: expected a dict of tensors {OUTPUTS}, as in the course's sanity_check.data")
    return reference


def load_model(path, norm):
    try:
        model = load_pretrained(path, norm_type=norm).eval()
    except ValueError as e:  # CheckpointError, or model_args that make no valid config
        raise InputError(str(e)) from None
    needed = {"vocab_size": int(SENT_IDS.max()) + 1, "max_seq_len": SENT_IDS.shape[1]}  # by the sanity-check tokens
    for name, least in needed.items():
        if getattr(model.config, name) < least:
            raise InputError(f"{path}: {name} {getattr(model.config, name)} is too small for the sanity-check tokens "
                             f"(they need {least}); use stories42M.pt")
    return model


def check_shapes(outputs: dict, reference: dict, args):
    for name in OUTPUTS:
        if outputs[name].shape != reference[name].shape:
            raise InputError(f"{args.checkpoint}: {name} of shape {tuple(outputs[name].shape)}, but {args.data} has "
                             f"{tuple(reference[name].shape)}: not the checkpoint the reference was computed with")


def compare(outputs: dict, reference: dict, args) -> bool:
    """Print each output's largest difference from the reference; True when all are close."""
    ok = True
    for name in OUTPUTS:
        actual, expected = outputs[name], reference[name]
        diff = (actual - expected).abs().max().item()
        match = torch.allclose(actual, expected, atol=args.atol, rtol=args.rtol)
        ok &= match
        print(f"{name}: max |diff| = {diff:.3e} ({'ok' if match else 'MISMATCH'})")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="stories42M.pt")
    parser.add_argument("--data", default="sanity_check.data")
    parser.add_argument("--norm", choices=("rmsnorm", "layernorm"), default="rmsnorm")
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--rtol", type=float, default=1e-3)
    args = parser.parse_args(argv)
    for path, what in ((args.checkpoint, "checkpoint"), (args.data, "reference data")):
        if not Path(path).is_file():
            print(f"sanity_check: {what} {path} not found. Run `bash setup.sh` (it downloads stories42M.pt "
                  f"when the network allows), or pass --checkpoint / --data.", file=sys.stderr)
            return 2
    torch.manual_seed(1337)
    try:
        reference = load_reference(args.data)
        model = load_model(args.checkpoint, args.norm)
        with torch.no_grad():
            outputs = dict(zip(OUTPUTS, model(SENT_IDS)))
        check_shapes(outputs, reference, args)
    except InputError as e:
        print(f"sanity_check: {e}", file=sys.stderr)
        return 2
    ok = compare(outputs, reference, args)
    print("Your Llama implementation is correct!" if ok else "Sanity check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
