"""
AdamW as the minllama assignment defines it (Loshchilov & Hutter, "Decoupled Weight Decay Regularization").

For every parameter p with gradient g, at step t (counted per parameter, starting at 1):

    m = b1 * m + (1 - b1) * g                          first moment (running mean of g)
    v = b2 * v + (1 - b2) * g * g                      second moment (running mean of g^2)
    step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)       bias correction, or just lr when correct_bias=False
    p = p - step_size * m / (sqrt(v) + eps)            the Adam update
    p = p - lr * weight_decay * p                      decoupled weight decay, after the update

The bias correction is the "efficient" form of Kingma & Ba (end of section 2): instead of dividing m and v by
(1 - b1^t) and (1 - b2^t) it folds both factors into the scalar step size, so eps is added to sqrt(v) rather than
to sqrt(v_hat). This is also how HuggingFace's original AdamW did it, and what the course's reference was made with.

Two implementations of the same update: a readable loop over parameters (the default, and the reference), and
`foreach=True`, which runs each line above once per param group with torch._foreach_* ops. The foreach ops execute
the same float operations in the same order, so on CPU the two give bit-for-bit identical parameters.

`AdamW8bit` is the same update with m and v stored in 8 bits (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization", https://arxiv.org/abs/2110.02861): 2 bytes of state per parameter instead of 8 (see its docstring).
"""
import math

import torch

from quantize import dequantize_blockwise, quantize_blockwise


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
                 foreach=False):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
            if params:
                update = _foreach_update if group["foreach"] else _loop_update
                update(params, [self._next_state(p) for p in params], group)
        return loss

    def _next_state(self, p):
        """The state of p, created on first use, with its step count advanced to the current step."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        return state


def _check_hyperparameters(lr, betas, eps, weight_decay):
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} - should be in [0.0, 1.0)")
    if eps < 0.0:
        raise ValueError(f"Invalid epsilon value: {eps} - should be >= 0.0")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} - should be >= 0.0")


def _closure_loss(closure):
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _step_size(group, t):
    lr = group["lr"]
    if not group["correct_bias"]:
        return lr
    beta1, beta2 = group["betas"]
    return lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)


def _loop_update(params, states, group):
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    for p, state in zip(params, states):
        grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        p.addcdiv_(exp_avg, denom, value=-_step_size(group, state["step"]))
        if weight_decay > 0.0:
            p.add_(p, alpha=-lr * weight_decay)


def _foreach_update(params, states, group):
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    grads = [p.grad for p in params]
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, eps)
    # step counts can differ inside a group (a param that had no grad on some steps), hence one step size each
    torch._foreach_addcdiv_(params, exp_avgs, denoms, [-_step_size(group, s["step"]) for s in states])
    if weight_decay > 0.0:
        torch._foreach_add_(params, params, alpha=-lr * weight_decay)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (the update above, loop form) with its moments m and v stored as 8-bit codes.

    Each step dequantizes m and v to float32, applies the update exactly as AdamW does, and quantizes them
    again, block-wise (quantize.quantize_blockwise): every block of block_size (256) values keeps a float32
    absmax, and each value the code of the nearest level of the 8-bit dynamic map, whose levels span 1e-7
    to 1 so that small moments keep a precision relative to their size. m, signed, uses the signed map; v,
    never negative, the unsigned one, which spends the sign bit on twice as many levels. The state of
    parameter p (opt.state[p]): "step", "exp_avg" and "exp_avg_sq" (uint8, p's shape), "exp_avg_absmax"
    and "exp_avg_sq_absmax" (float32, one per block): 2 bytes per parameter + 8 per 256, instead of 8.

    A positive v is never stored as 0 (rounded up to the smallest level instead): with v = 0 and m not, the
    next step would be m / eps, thousands of times too large. As in bitsandbytes' AdamW8bit, tensors of
    fewer than min_8bit_size (4096) elements (norm gains, biases) keep float32 moments, like AdamW: they
    weigh little, and coarse moments would hurt them most."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
                 block_size=256, min_8bit_size=4096):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        if block_size < 1 or min_8bit_size < 0:
            raise ValueError(f"Invalid block_size {block_size} or min_8bit_size {min_8bit_size}: should be >= 1, >= 0")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)
        self.block_size, self.min_8bit_size = block_size, min_8bit_size

    @torch.no_grad()
    def step(self, closure=None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self._next_state(p)
                grad, (exp_avg, exp_avg_sq) = p.grad.float(), self._moments(state)
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                p.addcdiv_(exp_avg, denom, value=-_step_size(group, state["step"]))
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
                self._store(state, exp_avg, exp_avg_sq)
        return loss

    def load_state_dict(self, state_dict):
        """torch.optim's, except that every state tensor keeps its saved dtype (torch casts floating-point
        parameters' state to their dtype: the uint8 codes would become floats)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(p.device, copy=True)

    def _next_state(self, p):
        """The state of p, created on first use (codes and absmax of zero moments), step advanced."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            if p.numel() < self.min_8bit_size:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            else:
                blocks = math.ceil(p.numel() / self.block_size)
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                    state[key + "_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        state["step"] += 1
        return state

    def _moments(self, state):
        """(m, v) in float32: dequantized, or the float32 moments of a small tensor themselves."""
        if "exp_avg_absmax" not in state:
            return state["exp_avg"], state["exp_avg_sq"]
        return tuple(dequantize_blockwise(state[key], state[key + "_absmax"], book, self.block_size)
                     .view(state[key].shape) for key, book in (("exp_avg", "dynamic"), ("exp_avg_sq", "udynamic")))

    def _store(self, state, exp_avg, exp_avg_sq):
        if "exp_avg_absmax" not in state:
            return  # updated in place
        for key, value, book in (("exp_avg", exp_avg, "dynamic"), ("exp_avg_sq", exp_avg_sq, "udynamic")):
            codes, absmax = quantize_blockwise(value, book, self.block_size)
            if key == "exp_avg_sq":  # a positive v rounded to 0 would make the next step m / eps: round it up
                codes[(codes == 0) & (value.view(-1) > 0)] = 1
            state[key], state[key + "_absmax"] = codes.view(value.shape), absmax
