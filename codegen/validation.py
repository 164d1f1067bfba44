"""Validation of code fine-tuning (codegen/train.py): the loss on held-out pairs and greedy generations.

    evaluate(model, tokenizer, valid_examples, valid_pairs, args, autocast)
        -> (validation loss: mean over every code token, chrF of greedy generations or None, generations)
    generate_code(model, tokenizer, prompts, max_new_tokens, batch_size, autocast)
        -> greedy completions of the prompts, with code_eval's stop rules

Under torchrun the ranks share the work (each takes every world-th validation batch and its distributed.shard
of the prompts) and every rank returns the same numbers: the loss summed and counted over all ranks, the
generations gathered in prompt order and scored alike. The model must then run forwards without the other
ranks (distributed.Parallel.local).
"""
import contextlib

import torch
from tqdm import tqdm

import distributed
from codegen.examples import collate, loss_sum
from codegen.generate import complete_all
from codegen.metrics import chrf


def generate_code(model, tokenizer, prompts, max_new_tokens: int = 128, batch_size: int = 8, autocast=None,
                  on_batch=None):
    """Greedy completions of the prompts, decoded and cut exactly as code_eval and code_generate cut
    theirs (codegen.generate.complete_all: EOS, a sentinel, a new top-level statement, or the budget),
    so that the chrF logged during training is the chrF code_eval reports (on other pairs)."""
    with (autocast or contextlib.nullcontext)():
        return [c.text for c in complete_all(model, tokenizer, prompts, max_new_tokens, batch_size,
                                             on_batch=on_batch)]


@torch.no_grad()
def evaluate(model, tokenizer, valid_examples, valid_pairs, args, autocast):
    """(validation loss: mean over every code token, chrF of greedy generations or None, generations)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(valid_examples)), key=lambda i: len(valid_examples[i][0]))
    starts = range(0, len(order), args.batch_size)[distributed.rank() :: distributed.world_size()]
    pairs = valid_pairs[: max(args.eval_samples, 0)]
    prompts = distributed.shard([p["prompt"] for p in pairs])
    examples = sum(len(order[start : start + args.batch_size]) for start in starts)
    bar = tqdm(total=examples + len(prompts), desc="validation (loss, then generations)", unit="ex", leave=False,
               disable=getattr(args, "quiet", False) or not distributed.is_main())
    for start in starts:
        batch = [valid_examples[i] for i in order[start : start + args.batch_size]]
        tokens, targets = collate(batch, tokenizer.pad_id)
        with autocast():
            s, n = loss_sum(model, tokens.to(model.device), targets.to(model.device))
        total, count = total + s.item(), count + n
        bar.update(len(batch))
    total, count = distributed.all_reduce([total, count])
    valid_loss = total / max(count, 1)
    score, hyps = None, []
    if pairs:
        hyps = distributed.gather(generate_code(model, tokenizer, prompts, args.eval_max_new_tokens,
                                                max(args.batch_size, 1), autocast, bar.update) if prompts else [])
        score = chrf(hyps, [p["code"] for p in pairs])
    bar.close()
    model.train(was_training)
    return valid_loss, score, hyps

