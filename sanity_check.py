"""Compare a loaded checkpoint's outputs with the course's reference tensors (sanity_check.data).

    python sanity_check.py [--checkpoint stories42M.pt] [--data sanity_check.data] [--norm rmsnorm]

The reference was computed with RMSNorm, so that is the default; --norm layernorm checks the
assignment's LayerNorm instead (and is expected to differ). Exit status: 0 match, 1 mismatch,
2 missing checkpoint or data.
"""
import argparse
import sys
from pathlib import Path

import torch

from llama import load_pretrained

# Two token sequences (the second one padded), as in the course's sanity check.
SENT_IDS = torch.tensor([[101, 7592, 2088, 102, 0, 0, 0, 0],
                         [101, 7592, 15756, 2897, 2005, 17953, 2361, 102]])


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
    reference = torch.load(args.data, map_location="cpu", weights_only=True)
    model = load_pretrained(args.checkpoint, norm_type=args.norm).eval()
    with torch.no_grad():
        logits, hidden_states = model(SENT_IDS)
    ok = True
    for name, actual in (("logits", logits), ("hidden_states", hidden_states)):
        expected = reference[name]
        diff = (actual - expected).abs().max().item()
        match = torch.allclose(actual, expected, atol=args.atol, rtol=args.rtol)
        ok &= match
        print(f"{name}: max |diff| = {diff:.3e} ({'ok' if match else 'MISMATCH'})")
    print("Your Llama implementation is correct!" if ok else "Sanity check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
