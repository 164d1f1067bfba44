"""Prompt -> code completion with a Mini-Llama, streamed as it is produced.

    python run_llama.py --option code_generate --pretrained-model-path code.pt \\
        --prompt "$(cat prompt.py)" [--temperature 0.8 --top_p 0.95]      (or --prompt - to read stdin)

    complete(model, tokenizer, prompt, ...) -> str        one completion; on_text(delta) streams it
    generate_completions(model, tokenizer, prompt, n=..)  n completions of one prompt in one batch
    sample_top_p(logits, p, temperature, generator)       nucleus sampling (Holtzman et al. 2020)
    stop_at_top_level(text, prompt="") -> str             cut where a new top-level statement starts

Decoding runs token by token on a KV cache (llama.KVCache), so each step costs one position.
temperature 0 is greedy; otherwise top_p selects nucleus sampling, and without it the course's
epsilon sampling (llama.sample_next) is used. A completion ends at EOS (or a FIM sentinel), after
max_new_tokens, or as soon as the continuation starts a new top-level statement: a line at column
0 that is not blank (`def`, `class`, `if __name__`, `@`, or any other unindented code), outside
strings, brackets and backslash continuations, once the code before it has a body: a prompt that
ends inside a function stops at the first unindented line, one that ends at top level keeps its
first definition (stop_top_level=False: EOS and length only, for whole programs). Text is handed
to on_text as soon as it is final, so the concatenation of the deltas is exactly the returned
completion.
"""
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from llama import CheckpointError, KVCache, sample_next

_WHITESPACE = " \t\f\r\n\v"
_ANCHOR_TOKENS = 8  # prompt tokens decoded with the new ones, so their leading space survives decode


# ----------------------------------------------------------------------------------------------
# Where to stop: a new top-level statement


class _TopLevelScanner:
    """Just enough of Python's lexer to find the first line of the continuation that starts a new
    top-level statement. Scans prompt + continuation, whole lines at a time, and remembers where it
    got to, so calling cut() again with a longer continuation only scans the new lines.

    A column-0 line ends the completion only once the code it would follow has a body: an indented
    line since the last column-0 statement (in the prompt or the continuation). So a prompt that
    ends inside a function stops at the first unindented line, while a prompt that ends at top
    level (a comment, imports, a task in prose, nothing) keeps the first definition it asked for
    and stops after it."""

    def __init__(self, prompt: str = ""):
        self.prompt = prompt
        self._reset()

    def _reset(self):
        self.scanned = 0  # characters of prompt + continuation scanned (always just after a "\n")
        self.quote = None  # the open string's delimiter: ' " ''' """
        self.depth = 0  # open brackets
        self.continued = False  # the last scanned line ended with a backslash continuation
        self.body = False  # an indented line came after the last column-0 statement
        self.indent = False  # this line is indented and has shown only whitespace so far
        self.text = ""  # what was scanned, to check the next call extends it

    def _line_start(self, s: str, j: int) -> bool:
        """At a line start j at statement level: does the continuation stop here? Else update state."""
        if j >= len(s) or s[j] == "\n":
            return False  # not there yet, or a blank line
        if s[j] in _WHITESPACE:
            self.indent = True
            return False
        if j >= len(self.prompt) and self.body:
            return True
        self.body = False  # a new top-level statement: what follows is its body
        return False

    def cut(self, continuation: str) -> Optional[int]:
        """Index into `continuation` where it must be cut, or None while no top-level line started."""
        s = self.prompt + continuation
        if not s.startswith(self.text):  # the caller's text changed under us: start over
            self._reset()
        n_prompt = len(self.prompt)
        i = self.scanned
        at_statement_level = self.quote is None and self.depth == 0 and not self.continued
        if at_statement_level and (i == 0 or s[i - 1] == "\n") and self._line_start(s, i):
            return i - n_prompt
        end = s.rfind("\n") + 1  # scan whole lines only: a quote's lookahead stays inside them
        quote, depth, continued = self.quote, self.depth, self.continued
        while i < end:
            c = s[i]
            continued = False  # set again just below when this is a backslash continuation
            if self.indent and c not in _WHITESPACE:
                self.body, self.indent = True, False
            elif c == "\n":
                self.indent = False
            if quote is not None:
                if c == "\\":
                    i += 2  # skip the escaped character (a newline too: the string goes on)
                    continue
                if c == "\n" and len(quote) == 1:
                    quote = None  # unterminated one-line string: a syntax error; resynchronise
                elif c == quote[0] and s.startswith(quote, i):
                    i += len(quote)
                    quote = None
                    continue
            elif c == "#":
                i = s.index("\n", i)  # the comment runs to the end of the line
                continue
            elif c in "'\"":
                quote = c * 3 if s.startswith(c * 3, i) else c
                i += len(quote)
                continue
            elif c in "([{":
                depth += 1
            elif c in ")]}":
                depth = max(0, depth - 1)
            elif c == "\\" and s.startswith("\\\n", i):
                continued = True
                i += 2
                continue
            if c == "\n" and quote is None and depth == 0 and self._line_start(s, i + 1):
                return i + 1 - n_prompt
            i += 1
        self.scanned, self.quote, self.depth, self.continued = i, quote, depth, continued
        self.text = s[: self.scanned]
        return None


def stop_at_top_level(text: str, prompt: str = "") -> str:
    """`text` (the continuation of `prompt`) up to where it starts a new top-level statement.

    The cut comes before the first line of `text` that starts at column 0 with anything but
    whitespace (`def `, `class `, `if __name__`, `@`, a comment, any unindented code) once the code
    before it has a body (an indented line after the last column-0 statement, in the prompt or in
    `text`), unless that line lies inside a string, inside brackets, or after a backslash
    continuation. The first line of `text` is only a line start when `prompt` is empty or ends with
    a newline. Blank lines before the cut are kept."""
    cut = _TopLevelScanner(prompt).cut(text)
    return text if cut is None else text[:cut]


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_top_p(logits: torch.Tensor, p: float, temperature: float = 1.0, generator=None) -> torch.Tensor:
    """Nucleus sampling: logits (batch, vocab) -> token ids (batch, 1); a 1-D (vocab,) -> (1,).

    Divide the logits by the temperature and softmax; the nucleus is the smallest set of most likely
    tokens whose probability reaches p (a token is in it when the tokens more likely than it hold
    less than p); sample from the nucleus, renormalised. The most likely token is always in it, so
    p = 0 (or temperature 0) is the argmax. Ties are broken by token id, as argmax does."""
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    flat = logits.reshape(-1, logits.shape[-1])
    if temperature == 0.0:
        out = flat.argmax(dim=-1, keepdim=True)
    else:
        probs = F.softmax(flat.float() / temperature, dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep = mass_before < p
        keep[:, 0] = True
        weights = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(weights, num_samples=1, generator=generator)
        out = order.gather(-1, choice)
    return out.reshape(1) if logits.dim() == 1 else out


def _pick(logits, temperature, top_p, epsilon, generator):
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    if top_p is not None:
        return sample_top_p(logits, top_p, temperature, generator)
    return sample_next(logits, temperature, epsilon, generator)


# ----------------------------------------------------------------------------------------------
# Decoding


@dataclass
class Completion:
    text: str  # the continuation of the prompt, cut as described above
    tokens: int  # tokens generated for it (the stop token or the one that started a new statement included)
    stop_reason: str  # "eos", "top_level" or "length"
    seconds: float  # wall-clock time of the whole call (shared by the rows of one batch)
    prompt_tokens: int  # prompt tokens the model saw (fewer than the prompt's when it was truncated)


class _Row:
    """Decoding state of one completion."""

    def __init__(self, prompt: str, stop_top_level: bool):
        self.new: List[int] = []
        self.scanner = _TopLevelScanner(prompt) if stop_top_level else None
        self.text = ""  # the continuation decoded so far, cut if a stop was found
        self.emitted = ""  # what on_text has been given
        self.stop_reason: Optional[str] = None


def _fit(prompt_ids: List[int], max_new_tokens: int, max_seq_len: int, bos_id: int):
    """(prompt ids, max_new_tokens) that fit the context. As codegen.infill does: generation gets at
    most half of the context (or all that is left), the prompt loses its oldest tokens (BOS kept)."""
    if len(prompt_ids) + max_new_tokens <= max_seq_len:
        return prompt_ids, max_new_tokens
    max_new_tokens = max(max_seq_len - len(prompt_ids), min(max_new_tokens, max_seq_len // 2))
    keep = max_seq_len - max_new_tokens
    if len(prompt_ids) > keep:
        head = prompt_ids[:1] if prompt_ids and prompt_ids[0] == bos_id else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - (keep - len(head)):]
    return prompt_ids, max_new_tokens


def _stop_ids(tokenizer) -> set:
    ids = {tokenizer.eos_id}
    ids.update((getattr(tokenizer, "sentinels", None) or {}).values())  # FIM sentinels end plain completion
    return ids


def check_prompt(prompt: str) -> None:
    """A prompt must be text the tokenizer can take: a str without lone surrogates (what a JSON
    "\\ud800" or undecodable command-line bytes turn into)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"prompt is not valid Unicode text: {e.reason} at character {e.start}") from None


def _check_settings(max_new_tokens, temperature, top_p, epsilon):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")


@torch.inference_mode()
def generate_completions(model, tokenizer, prompt: str, n: int = 1, max_new_tokens: int = 256,
                         temperature: float = 0.0, top_p: Optional[float] = None, epsilon: float = 3e-4,
                         generator: Optional[torch.Generator] = None,
                         on_text: Optional[Callable[[str], None]] = None,
                         stop_top_level: bool = True) -> List[Completion]:
    """n completions of `prompt`, decoded together as one batch on a KV cache (all rows share the
    prompt, so there is no padding); each row stops on its own. on_text (n = 1 only) receives each
    piece of text as soon as it is final. See the module docstring for the stopping rules;
    stop_top_level=False keeps only EOS and max_new_tokens (for prompts asking for a whole program)."""
    check_prompt(prompt)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if on_text is not None and n != 1:
        raise ValueError("on_text streams a single completion: use n=1")
    _check_settings(max_new_tokens, temperature, top_p, epsilon)
    started = time.perf_counter()
    device = next(model.parameters()).device
    prompt_ids, max_new_tokens = _fit(tokenizer.encode(prompt, bos=True, eos=False), max_new_tokens,
                                      model.config.max_seq_len, tokenizer.bos_id)
    anchor = prompt_ids[-_ANCHOR_TOKENS:]
    anchor_text = tokenizer.decode(anchor)
    stop_ids = _stop_ids(tokenizer)
    rows = [_Row(prompt, stop_top_level) for _ in range(n)]

    def continuation(new: List[int]) -> str:
        text = tokenizer.decode(anchor + new)
        if text.startswith(anchor_text):
            return text[len(anchor_text):]
        base, full = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + new)  # rare: slow path
        common = next((k for k, (a, b) in enumerate(zip(base, full)) if a != b), min(len(base), len(full)))
        return full[common:]

    def emit(row: _Row, final: bool):
        if on_text is None:
            return
        ready = row.text if final else row.text.rstrip("\ufffd")  # hold back half a UTF-8 character
        if ready.startswith(row.emitted) and len(ready) > len(row.emitted):
            on_text(ready[len(row.emitted):])
            row.emitted = ready

    was_training = model.training
    model.eval()
    try:
        if max_new_tokens > 0:
            cache = KVCache(model.config, n, len(prompt_ids) + max_new_tokens, device, next(model.parameters()).dtype)
            idx = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)
            logits, _ = model(idx, cache=cache)
            for step in range(max_new_tokens):
                next_tokens = _pick(logits[:, -1, :], temperature, top_p, epsilon, generator)
                for row, token in zip(rows, next_tokens[:, 0].tolist()):
                    if row.stop_reason is not None:
                        continue
                    row.new.append(token)
                    if token in stop_ids:
                        row.stop_reason = "eos"
                        emit(row, final=True)
                        continue
                    text = continuation(row.new)
                    cut = row.scanner.cut(text) if row.scanner else None
                    row.text = text if cut is None else text[:cut]
                    if cut is not None:
                        row.stop_reason = "top_level"
                    emit(row, final=cut is not None)
                if all(row.stop_reason is not None for row in rows) or step == max_new_tokens - 1:
                    break
                logits, _ = model(next_tokens, cache=cache)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    out = []
    for row in rows:
        if row.stop_reason is None:
            row.stop_reason = "length"
            emit(row, final=True)
        text = row.text
        if on_text is not None and text != row.emitted:  # cannot happen; keep the streamed text the truth
            text = row.emitted
        out.append(Completion(text, len(row.new), row.stop_reason, seconds, len(prompt_ids)))
    return out


def complete(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: Optional[float] = None, epsilon: float = 3e-4, generator: Optional[torch.Generator] = None,
             on_text: Optional[Callable[[str], None]] = None) -> str:
    """The model's continuation of `prompt` (not including the prompt). temperature 0: greedy;
    otherwise nucleus sampling when top_p is given, else epsilon sampling. on_text(delta) is called
    with each piece of final text as it is produced; the pieces concatenate to the return value."""
    return generate_completions(model, tokenizer, prompt, 1, max_new_tokens, temperature, top_p, epsilon,
                                generator, on_text)[0].text


# ----------------------------------------------------------------------------------------------
# Command line: python run_llama.py --option code_generate --prompt "..."


def add_arguments(parser):
    group = parser.add_argument_group("code_generate")
    group.add_argument("--prompt", required=True,
                       help="code to continue, e.g. a def line and its docstring; '-' reads it from stdin")
    group.add_argument("--max_new_tokens", type=int, default=256, help="most tokens to generate (default 256)")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top_p", type=float, default=None,
                       help="nucleus sampling with this p (with --temperature > 0); default: epsilon sampling")
    group.add_argument("--epsilon", type=float, default=3e-4,
                       help="epsilon sampling's probability floor when --top_p is not given (default 3e-4)")
    group.add_argument("--echo_prompt", action="store_true", help="print the prompt before the completion")


def run(args) -> int:
    from codegen.common import load_code_model, pick_device
    from utils import seed_everything

    try:
        _check_settings(args.max_new_tokens, args.temperature, args.top_p, args.epsilon)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        check_prompt(prompt)
    except ValueError as e:  # UnicodeDecodeError from stdin too
        print(f"error: --prompt: {e}", file=sys.stderr)
        return 2
    seed_everything(args.seed)
    try:
        device = pick_device(args.use_gpu)
        model, tokenizer = load_code_model(args.pretrained_model_path, device, args.tokenizer)
    except (FileNotFoundError, CheckpointError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def write(text: str):
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.echo_prompt:
        write(prompt)
    try:
        result = generate_completions(model, tokenizer, prompt, 1, args.max_new_tokens, args.temperature,
                                      args.top_p, args.epsilon, generator, on_text=write)[0]
    except KeyboardInterrupt:
        write("\n")
        return 130
    if not result.text.endswith("\n"):
        write("\n")
    print(f"[{result.tokens} tokens in {result.seconds:.2f}s, stopped: {result.stop_reason}]", file=sys.stderr)
    return 0
