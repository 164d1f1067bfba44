"""Training on several processes with PyTorch's own engine (torchrun, DDP, FSDP2): everything distributed is here.

    torchrun --nproc_per_node 2 run_llama.py --option codegen ...                     one machine, 2 ranks
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 run_llama.py ...

torchrun starts one process per device, a "rank", with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT in its environment; `setup` joins them into a process group (nccl on CUDA, gloo on CPU) and
gives each its device. Without torchrun nothing here does anything: no process group, world size 1, every
helper the identity, a training run's outputs exactly those of a plain `python run_llama.py`.

Data parallelism that changes no number. Every rank draws the same global batches (the same seed): each
micro-batch is the batch_size x world examples one process with that batch size would draw, and each rank
takes its share (`shard`), padded to the global batch's longest example. Every rank knows the whole batch, so
each counts its N target tokens alone; a rank backpropagates its summed loss times W / N (W ranks), and since
DDP and FSDP2 average the gradients over the ranks, the step's gradient is

    (1 / W) * sum_r  W * grad(loss_r) / N  =  grad(loss over the whole global batch) / N,

what one process computes on the whole batch: 2 ranks x batch b = 1 process x batch 2b, up to float sums.

    DDP (default)   each rank holds the whole model, its gradients and optimizer state; after each backward the
                    gradients are all-reduced (averaged), in buckets overlapped with the backward; `no_sync`
                    skips that for the micro-batches of a gradient-accumulation step but the last.
    FSDP2 (--fsdp)  `fully_shard` on each transformer layer and on the whole model: every parameter (frozen base
                    weights and LoRA adapters alike), its gradient and its optimizer state live 1/W on each rank;
                    a layer's weights are all-gathered just before its forward (and again for its backward) and
                    freed after, its gradients reduce-scattered.

A rank that dies makes the others' next collective fail at once (gloo: "connection closed by peer"); one that
hangs makes it fail after --dist_timeout seconds. Either way `failure` recognises the error and the command
line ends with one `error:` line and exit status 1, having written nothing half-way (checkpoints are written
whole or not at all: utils.atomic_write).

Pieces: add_arguments (--fsdp, --dist_timeout); launched, setup, teardown; rank, world_size, is_main, active,
barrier, describe; shard (a global batch's share of one rank), all_reduce, gather, broadcast (metrics across ranks);
seed_ranks (own dropout masks per rank); Parallel (the model as the ranks train it: DDP or FSDP2, with
accumulation, local forwards for evaluation, and full state dicts for checkpoints); failure (a lost rank).
"""
import contextlib
import copy
import datetime
import os

import torch
import torch.distributed as dist

from utils import DeviceError, pick_device

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 600.0


def add_arguments(group) -> None:
    """--fsdp and --dist_timeout, for every training option."""
    group.add_argument("--fsdp", action="store_true",
                       help="under torchrun: shard parameters, gradients and optimizer state across the ranks with "
                            "FSDP2 instead of replicating them with DDP (default: DDP)")
    group.add_argument("--dist_timeout", type=float, default=DEFAULT_TIMEOUT_S,
                       help="under torchrun: seconds a rank waits for the others in a collective before the job "
                            "ends with an error (a dead or hung rank) (default: %(default)s)")


# ----------------------------------------------------------------------------------------------
# the process group


def launched() -> bool:
    """Whether torchrun (or anything setting its environment) started this process."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def setup(device="cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """This rank's device (device: what utils.pick_device takes, --device's name or --use_gpu's bool); under
    torchrun, first the process group (nccl on CUDA, gloo on CPU) with a collective timeout of timeout_s,
    and on CUDA the GPU numbered LOCAL_RANK. Without torchrun: pick_device, nothing else."""
    device = pick_device(device)
    if not launched():
        return device
    if timeout_s <= 0:
        raise DeviceError(f"--dist_timeout={timeout_s}: must be > 0 seconds")
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device.type}: torchrun runs on CUDA (nccl) or the CPU (gloo); pass --device "
                          "cuda or cpu")
    if device.type == "cuda":
        local, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= count:
            raise DeviceError(f"LOCAL_RANK={local} but this machine has {count} GPU(s): pass --nproc_per_node "
                              f"{count} or less to torchrun")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not active():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return device


def teardown(wait: bool = True) -> None:
    """Leave the process group (after waiting for every rank, unless wait=False: a failed run)."""
    if active():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one rank that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def describe() -> str:
    """'1 process', or e.g. '2 ranks (gloo)'; the training mode is said by Parallel.describe."""
    return f"{world_size()} ranks ({dist.get_backend()})" if active() else "1 process"


# ----------------------------------------------------------------------------------------------
# data and metrics across ranks


def shard(items, rank_: int = None, world: int = None) -> list:
    """This rank's share of a global batch: contiguous, the first len % world ranks one item more
    (numpy.array_split's division), so the shares in rank order are the batch. A rank may get none."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} outside a world of {world}")
    base, extra = divmod(len(items), world)
    start = rank_ * base + min(rank_, extra)
    return list(items[start : start + base + (rank_ < extra)])


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(values: list, op: str = "sum") -> list:
    """The element-wise sum (or "max") of these numbers over the ranks, in float64; unchanged in one process."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order (any picklable items), on every rank."""
    if not active():
        return list(items)
    lists = [None] * world_size()
    dist.all_gather_object(lists, list(items))
    return [item for part in lists for item in part]


def broadcast(value):
    """Rank 0's value (any picklable object) on every rank: a decision all ranks must take alike."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_ranks(seed: int) -> None:
    """With several ranks, give each its own torch generator stream, so that dropout masks differ between
    ranks (the model, identical on every rank, is built before this); nothing in one process."""
    if world_size() > 1:
        torch.manual_seed(seed * 1_000_003 + rank())


def failure(error: BaseException, timeout_s: float = DEFAULT_TIMEOUT_S):
    """The one-line message for a collective that failed because another rank died, hung past the timeout
    or lost its connection; None for any other error (a bug keeps its traceback)."""
    if not active() or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    markers = ("gloo", "nccl", "NCCL", "Connection closed by peer", "Timed out", "timed out", "Connection reset")
    if not isinstance(error, dist.DistError) and not any(m in text for m in markers):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return (f"rank {rank()} of {world_size()}: a collective operation failed: another rank died, hung for more "
            f"than --dist_timeout={timeout_s:g}s or lost its connection ({first[:300]}); stopping. Checkpoints "
            "are only ever written whole: resume from the last one with --resume")


# ----------------------------------------------------------------------------------------------
# the model as the ranks train it


class Parallel:
    """The model as every rank trains it: the model itself (one process), DDP, or FSDP2 (fsdp=True).

        par = Parallel(model, optimizer, fsdp=args.fsdp, frozen_rows=partial)
        par.model                   forward and backward in training (DDP: the wrapper)
        par.optimizer               the same optimizer object (FSDP2: over the sharded parameters, state sharded)
        par.accumulating(last)      context: no gradient all-reduce unless last (DDP's no_sync)
        par.finish_gradients()      after the step's backwards (FSDP2: re-freezes the frozen rows)
        par.local()                 context -> a module whose forwards need no other rank (evaluation, generation)
        par.full()                  context -> (model, optimizer) with whole weights and state on rank 0, for a
                                    checkpoint, else (None, None); every rank must enter it (FSDP2 gathers)

    frozen_rows: [(parameter, first trainable row)] whose earlier rows must not train (a gradient hook zeroes
    them, codegen.model_setup.setup_trainable). DDP keeps the parameters and their hooks; FSDP2 replaces the
    parameters by sharded ones, so finish_gradients zeroes those rows of the sharded gradient instead.
    Under FSDP2 the whole model is loaded on each rank first and sharded here; rank 0 keeps a CPU copy of it
    to write checkpoints from."""

    def __init__(self, model: torch.nn.Module, optimizer, fsdp: bool = False, frozen_rows=()):
        self.module, self.optimizer, self.model = model, optimizer, model
        self.kind = ("fsdp" if fsdp else "ddp") if active() else "single"
        self.masks, self.replica = [], None
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device = next(model.parameters()).device
            self.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                 forward_sync_buffers=False, gradient_as_bucket_view=True)
        elif self.kind == "fsdp":
            self._shard(frozen_rows)

    def describe(self) -> str:
        return {"single": "1 process", "ddp": f"DDP over {describe()}", "fsdp": f"FSDP2 over {describe()}"}[self.kind]

    def _shard(self, frozen_rows) -> None:
        """fully_shard each transformer layer, then the whole model (embedding, final norm, output); point the
        optimizer at the sharded parameters and shard its state (restored from a checkpoint or empty)."""
        from torch.distributed.fsdp import fully_shard

        from llama import LlamaLayer

        model, optimizer = self.module, self.optimizer
        if is_main():
            self.replica = copy.deepcopy(model).to("cpu")
        names = {id(p): name for name, p in model.named_parameters()}
        saved = optimizer.state_dict()
        for layer in [m for m in model.modules() if isinstance(m, LlamaLayer)]:
            fully_shard(layer)
        fully_shard(model)
        params = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [params[names[id(p)]] for p in group["params"]]
        optimizer.state.clear()
        optimizer.load_state_dict(_sharded_optimizer_state(saved, optimizer))
        for weight, start in frozen_rows:
            sharded = params[names[id(weight)]]
            mask = torch.ones(sharded.shape[0], 1, dtype=sharded.dtype, device=sharded.device)
            mask[:start] = 0
            self.masks.append((sharded, _like(mask, sharded)))

    def accumulating(self, last: bool):
        """Context for one micro-batch's forward and backward: DDP all-reduces the gradients only on the last."""
        return self.model.no_sync() if self.kind == "ddp" and not last else contextlib.nullcontext()

    def finish_gradients(self) -> None:
        """After the backwards of a step, before clipping: the frozen rows' gradients zeroed (FSDP2)."""
        for param, mask in self.masks:
            if param.grad is not None:
                param.grad.mul_(mask)

    @contextlib.contextmanager
    def local(self):
        """A module to run forwards on without the other ranks (each its own number of them): the model under
        DDP; under FSDP2 the model with every layer's weights gathered once, kept whole until the end.

        The parameters are left as found: decoding.decode re-lays some weights in memory on the CPU
        (decoding_layout: same values, new storage), which would cut an FSDP2 parameter off the buffer its
        all-gathers fill (training on stale weights) and make DDP copy those gradients into its buckets."""
        if self.kind == "single":
            yield self.module
            return
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
        for m in modules:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        kept = [(p, p.data) for p in self.module.parameters()]
        try:
            yield self.module
        finally:
            for p, data in kept:
                p.data = data
            for m in modules:
                m.reshard()
                m.set_reshard_after_forward(m is not self.module, recurse=False)  # fully_shard's defaults

    @contextlib.contextmanager
    def full(self):
        """(model, optimizer) with the whole weights and optimizer state, on rank 0; (None, None) elsewhere."""
        if self.kind != "fsdp":
            yield (self.module, self.optimizer) if is_main() else (None, None)
            return
        weights = {k: _whole(v) for k, v in self.module.state_dict().items()}
        state = self.optimizer.state_dict()
        state = {**state, "state": {i: {k: _whole(v) for k, v in s.items()} for i, s in state["state"].items()}}
        if not is_main():
            yield None, None
            return
        self.replica.load_state_dict(weights)
        yield self.replica, _SavedOptimizer(state)


class _SavedOptimizer:
    """What a checkpoint writer asks of an optimizer: its state_dict (here gathered whole)."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def _whole(value):
    """A DTensor shard gathered whole (a collective), on the CPU; other values as they are."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    return value.detach().cpu() if torch.is_tensor(value) else value


def _like(tensor: torch.Tensor, sharded):
    """A whole tensor cut as the sharded parameter is (every rank holds the whole, so nothing is sent)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(sharded.device), sharded.device_mesh, sharded.placements, src_data_rank=None)


def _sharded_optimizer_state(saved: dict, optimizer) -> dict:
    """An optimizer state dict (whole tensors) with every tensor of a parameter's shape cut as that parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in saved["state"].items():
        p = params[index]
        state[index] = {k: _like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in entry.items()}
    return {**saved, "state": state}
