"""Data-parallel training steps: 1 process against 2 ranks (DDP, FSDP2), and the memory each mode needs.

    python3 bench/distributed.py                          # CPU: 1 process x batch 2b vs 2 ranks x b (gloo)
    python3 bench/distributed.py --device cuda --nproc 2  # the same on GPUs (nccl); 1 GPU: DDP's own overhead
    python3 bench/distributed.py --device cuda --nproc 8 --shape Llama-3.2-1B --batch 8 --seq_len 512
    python3 bench/distributed.py --memory                 # computed bytes per GPU: stories42M and Llama-3.2-1B
    python3 bench/distributed.py --tiny --json            # smoke run

Each variant is its own launch on the same global batch of random tokens (--batch sequences of --seq_len)
through a model of random weights (default: the stories15M shape, dim 288, 6 layers; --dim ... change it):
"1 process" runs the whole batch without torchrun; "DDP" and "FSDP2" run torchrun --nproc_per_node N, each
rank its distributed.shard of the batch, through distributed.Parallel as codegen training does. On the CPU each
process gets cores / N threads, so both sides use the same cores; a 1-process, 1-thread run is added as the
yardstick of one core.

Per variant: the optimizer step's wall time (the slowest rank's), tokens per second over all ranks, and for
DDP the same step inside no_sync (no gradient all-reduce), whose difference is the communication the backward
could not hide, plus one bare all-reduce of all the gradients. The machine's other load is measured as well
(/proc/stat's busy time less this benchmark's own CPU time): on a shared machine that is what moves the numbers.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import distributed  # noqa: E402
from config import LlamaConfig  # noqa: E402
from llama import Llama  # noqa: E402
from lora import expected_lora_parameters  # noqa: E402
from optimizer import AdamW  # noqa: E402

# ----------------------------------------------------------------------------------------------
# the memory each mode needs (computed)

SHAPES = {  # LlamaConfig arguments
    "stories42M": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=32000, hidden_dim=1376),
    "Llama-3.2-1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192),
}


def memory_table(ranks=(2, 8), lora_rank=8, targets=("compute_query", "compute_value")) -> list:
    """Bytes per GPU of weights, gradients and AdamW state (fp32: 4 + 4 + 8 bytes per trained parameter; tied
    embeddings counted once) in each mode; activations come on top (bench/gpu.sh measures them).

    FSDP2 keeps 1/N of everything, plus, while it trains, the root group (embedding/output and final norm,
    unsharded for the whole forward and backward, with its gradient) and about three layers' worth of gathered
    weights and gradients (the current layer, the prefetched next, a layer's unsharded gradient); while it
    evaluates (distributed.Parallel.local) the whole fp32 weights; and while it starts, the whole model, loaded on
    every rank before it is sharded."""
    rows = []
    for name, shape in SHAPES.items():
        with torch.device("meta"):
            model = Llama(LlamaConfig(**shape, max_seq_len=2048))
        total = sum(p.numel() for p in model.parameters())
        layer = sum(p.numel() for p in model.layers[0].parameters())
        root = total - layer * len(model.layers)
        lora = expected_lora_parameters(model.config, lora_rank, targets)
        for mode, trained in (("full", total), (f"LoRA r{lora_rank} q,v", lora)):
            states = 12 * trained  # gradient and AdamW's two moments
            rows.append({"shape": name, "mode": mode, "parallel": "DDP (any N)", "parameters": total,
                         "trained": trained, "bytes": 4 * total + states})
            for n in ranks:
                sharded = (4 * total + states) / n
                gathered = 4 * 3 * layer + 4 * root + (4 * root if mode == "full" else 0)
                evaluation = 4 * total + (4 * total + states - 4 * trained) / n  # no gradients then
                rows.append({"shape": name, "mode": mode, "parallel": f"FSDP2 N={n}", "parameters": total,
                             "trained": trained, "bytes": sharded + gathered, "evaluation_bytes": evaluation,
                             "start_bytes": 4 * total})
    return rows


def print_memory(rows) -> None:
    print(f"{'shape':13} {'mode':14} {'parallel':12} {'parameters':>13} {'trained':>13} {'train GiB':>10} "
          f"{'eval GiB':>9}")
    for r in rows:
        ev = r.get("evaluation_bytes")
        print(f"{r['shape']:13} {r['mode']:14} {r['parallel']:12} {r['parameters']:>13,} {r['trained']:>13,} "
              f"{r['bytes'] / 2**30:>10.2f} {'' if ev is None else f'{ev / 2**30:.2f}':>9}")


# ----------------------------------------------------------------------------------------------
# one variant (a rank of it, or the single process)


def worker(args) -> None:
    """One variant's rank (or the single process): rank 0 writes the result to the file args.worker."""
    device = distributed.setup(args.device, 300)
    world = distributed.world_size()
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    config = LlamaConfig(**model_shape(args), max_seq_len=args.seq_len)
    model = Llama(config).to(device).train()
    par = distributed.Parallel(model, AdamW(model.parameters(), lr=1e-5, foreach=device.type == "cuda"), args.fsdp)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    mine = tokens[distributed.shard(list(range(args.batch)))].to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(all_reduce: bool) -> float:
        distributed.barrier()
        sync()
        started = time.perf_counter()
        with par.accumulating(last=all_reduce):
            logits, _ = par.model(mine, targets=mine)
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), mine[:, 1:].reshape(-1)).backward()
        par.optimizer.step()
        par.optimizer.zero_grad(set_to_none=True)
        sync()
        return distributed.all_reduce([time.perf_counter() - started], "max")[0]  # the slowest rank's

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step(True)  # warm-up
    timed = {"step": [], "no_sync": []}
    for _ in range(args.steps):  # interleaved, so that the machine's load falls on both alike
        timed["step"].append(step(True))
        if par.kind == "ddp":
            timed["no_sync"].append(step(False))
    result = {"kind": par.kind, "world": world, "threads": torch.get_num_threads(),
              "step_s": min(timed["step"]), "no_sync_s": min(timed["no_sync"]) if timed["no_sync"] else None,
              "tokens_per_s": args.batch * args.seq_len / min(timed["step"]),
              "all_reduce_s": bare_all_reduce(model, device) if world > 1 else None,
              "peak_mb": distributed.all_reduce([peak_bytes(device)], "max")[0] / 2**20}
    if distributed.is_main():
        Path(args.worker).write_text(json.dumps(result))
    distributed.teardown()


def model_shape(args) -> dict:
    """--shape's LlamaConfig arguments, else --dim, --n_layers, --n_heads, --vocab_size's."""
    if args.shape:
        return SHAPES[args.shape]
    return dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, vocab_size=args.vocab_size)


def bare_all_reduce(model, device, repeats=3) -> float:
    """Seconds of one all-reduce of a buffer the size of every gradient."""
    import torch.distributed as dist

    buffer = torch.zeros(sum(p.numel() for p in model.parameters()), device=device)
    best = float("inf")
    for _ in range(repeats):
        distributed.barrier()
        started = time.perf_counter()
        dist.all_reduce(buffer)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------------------------
# the parent: launches, machine load, table


def cpu_busy_seconds() -> float:
    """Seconds of CPU time the whole machine has spent busy (/proc/stat; 0 where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch(args, nproc: int, fsdp: bool, threads: int = 0) -> dict:
    """One variant: this script with --worker, alone (nproc 0) or under torchrun; its rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        own = ["--worker", str(result), "--device", args.device, "--steps", str(args.steps), "--batch",
               str(args.batch), "--seq_len", str(args.seq_len), "--dim", str(args.dim), "--n_layers",
               str(args.n_layers), "--n_heads", str(args.n_heads), "--vocab_size", str(args.vocab_size)]
        own += ["--shape", args.shape] if args.shape else []
        own += (["--fsdp"] if fsdp else []) + (["--threads", str(threads)] if threads else [])
        runner = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc else []
        done = subprocess.run([sys.executable, *runner, __file__, *own], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{'torchrun x%d' % nproc if nproc else '1 process'} failed:\n{done.stderr[-4000:]}")
        return json.loads(result.read_text())


def compare(args) -> dict:
    busy, own, started = cpu_busy_seconds(), own_children_seconds(), time.time()
    variants = {"1 process": launch(args, 0, False), "DDP": launch(args, args.nproc, False),
                "FSDP2": launch(args, args.nproc, True)}
    if args.device == "cpu":  # a 1-thread process: what one core does alone, to read the others against
        variants["1 proc, 1 thread"] = launch(args, 0, False, threads=1)
    wall = time.time() - started
    others = max(0.0, (cpu_busy_seconds() - busy) - (own_children_seconds() - own)) / wall
    base = variants["1 process"]["tokens_per_s"]
    shape = model_shape(args)
    print(f"device {args.device}; global batch {args.batch} x {args.seq_len} tokens; model {args.shape or 'dim'} "
          f"{shape['dim']}, {shape['n_layers']} layers, vocab {shape['vocab_size']}; best of {args.steps} steps")
    print(f"{'variant':16} {'ranks':>5} {'threads':>7} {'step ms':>8} {'tokens/s':>9} {'vs 1':>6} {'no_sync ms':>10} "
          f"{'comm share':>10} {'all-reduce ms':>13} {'peak MiB':>9}")
    for name, r in variants.items():
        r["speedup"] = r["tokens_per_s"] / base
        r["comm_share"] = None if r["no_sync_s"] is None else max(0.0, 1 - r["no_sync_s"] / r["step_s"])
        no_sync = "-" if r["no_sync_s"] is None else f"{1000 * r['no_sync_s']:.1f}"
        share = "-" if r["comm_share"] is None else f"{100 * r['comm_share']:.0f} %"
        bare = "-" if r["all_reduce_s"] is None else f"{1000 * r['all_reduce_s']:.1f}"
        print(f"{name:16} {r['world']:>5} {r['threads']:>7} {1000 * r['step_s']:>8.1f} {r['tokens_per_s']:>9.0f} "
              f"{r['speedup']:>5.2f}x {no_sync:>10} {share:>10} {bare:>13} {r['peak_mb']:>9.0f}")
    print(f"other jobs on this machine used {others:.2f} of its {os.cpu_count()} cores on average meanwhile "
          f"(load average now {os.getloadavg()[0]:.2f})")
    return {"device": args.device, "results": variants, "other_load_cores": others}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the DDP and FSDP2 variants (default: 2)")
    parser.add_argument("--batch", type=int, default=8, help="global batch, sequences (default: %(default)s)")
    parser.add_argument("--seq_len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (default: %(default)s)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="a named model shape instead of --dim, --n_layers, --n_heads, --vocab_size")
    parser.add_argument("--dim", type=int, default=288)
    parser.add_argument("--n_layers", type=int, default=6)
    parser.add_argument("--n_heads", type=int, default=6)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)  # a worker's mode
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)  # a worker's threads
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one variant, write its result here
    parser.add_argument("--memory", action="store_true", help="print the computed memory table and stop")
    parser.add_argument("--tiny", action="store_true", help="tiny model and batch, for smoke tests")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args(argv)
    if args.tiny:
        args.dim, args.n_layers, args.n_heads, args.vocab_size, args.batch, args.seq_len, args.steps = \
            32, 2, 4, 512, 4, 16, 2
    if args.worker:
        return worker(args)
    if args.memory:
        rows = memory_table()
        print_memory(rows)
        summary = {"memory": rows}
    else:
        summary = compare(args)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
