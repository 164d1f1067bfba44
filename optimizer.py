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
"""
import math

import torch


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True,
                 foreach=False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta} - should be in [0.0, 1.0)")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps} - should be >= 0.0")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} - should be >= 0.0")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
