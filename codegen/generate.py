"""Prompt -> code completion (or fill-in-the-middle) with a Mini-Llama, streamed as it is produced.

    python run_llama.py --option code_generate --pretrained-model-path code.pt \\
        --prompt "$(cat prompt.py)" [--temperature 0.8 --top_p 0.95] [--suffix TEXT] [--compile]

    complete(model, tokenizer, prompt, ...) -> str          one completion; on_text(delta) streams it
    generate_completions(model, tokenizer, prompt, n=..)    n completions of one prompt in one batch
    complete_all(model, tokenizer, prompts, ...)            greedy completions of many prompts, batched
    stop_at_top_level(text, prompt="") -> str               cut where a new top-level statement starts

Every completion decodes through decoding.decode (the project's one decoding loop: KV cache, and
torch.compile / CUDA graphs with compile=True). temperature 0 is greedy; otherwise top_p selects
nucleus sampling, top_k top-k sampling, and without either the course's epsilon sampling is used.
A completion ends at EOS (or a FIM sentinel), after max_new_tokens, or as soon as the continuation
starts a new top-level statement: a line at column 0 that is not blank (`def`, `class`, `if
__name__`, `@`, or any other unindented code), outside strings, brackets and backslash
continuations, once the code before it has a body: a prompt that ends inside a function stops at
the first unindented line, one that ends at top level keeps its first definition
(stop_top_level=False: EOS and length only, for whole programs). The same rules serve
code_eval, the web page and training-time validation, so their chrF scores compare. With a suffix
the model fills the middle between prompt and suffix (codegen.infill's prompt), ending at
<fim_end> or EOS. Text is handed to on_text as soon as it is final, so the concatenation of the
deltas is exactly the returned completion.
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

from decoding import decode, fit_context, keep_last, make_sampler
from utils import UsageError

DEFAULT_NEW_TOKENS = 256   # code_generate's --max_new_tokens when the context leaves room for it
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
# Decoding


@dataclass
class Completion:
    text: str  # the continuation of the prompt, cut as described above
    tokens: int  # tokens generated for it (the stop token or the one that started a new statement included)
    stop_reason: str  # "eos", "top_level" or "length"
    seconds: float  # wall-clock time of the whole call (shared by the rows of one batch)
    prompt_tokens: int  # prompt tokens the model saw (fewer than the prompt's when it was truncated)


class _Row:
    """Decoding state of one completion: its new tokens, its text so far and where it stops."""

    def __init__(self, tokenizer, prompt: str, prompt_ids: List[int], stop_top_level: bool,
                 anchor: Optional[List[int]] = None):
        self.tokenizer, self.prompt_ids = tokenizer, prompt_ids
        # a few prompt tokens decoded with the new ones, so that the first new token's leading space
        # survives decode (SentencePiece drops it at the start of a text); infills: fim_prompt's anchor
        self.anchor = prompt_ids[-_ANCHOR_TOKENS:] if anchor is None else anchor
        self.anchor_text = tokenizer.decode(self.anchor)
        self.new: List[int] = []
        self.scanner = _TopLevelScanner(prompt) if stop_top_level else None
        self.text = ""  # the continuation decoded so far, cut if a stop was found
        self.emitted = ""  # what on_text has been given
        self.stop_reason: Optional[str] = None

    def continuation(self) -> str:
        text = self.tokenizer.decode(self.anchor + self.new)
        if text.startswith(self.anchor_text):
            return text[len(self.anchor_text):]
        base, full = self.tokenizer.decode(self.prompt_ids), self.tokenizer.decode(self.prompt_ids + self.new)
        common = next((k for k, (a, b) in enumerate(zip(base, full)) if a != b), min(len(base), len(full)))
        return full[common:]  # rare: a merge across the anchor's edge

    def add(self, token: int, stop_ids, on_text) -> None:
        """Take one new token: stop at a stop id, or where a new top-level statement starts."""
        self.new.append(token)
        if token in stop_ids:
            self.stop_reason = "eos"
        else:
            text = self.continuation()
            cut = self.scanner.cut(text) if self.scanner else None
            self.text = text if cut is None else text[:cut]
            if cut is not None:
                self.stop_reason = "top_level"
        self.emit(on_text, final=self.stop_reason is not None)

    def emit(self, on_text, final: bool) -> None:
        if on_text is None:
            return
        ready = self.text if final else self.text.rstrip("\ufffd")  # hold back half a UTF-8 character
        if ready.startswith(self.emitted) and len(ready) > len(self.emitted):
            on_text(ready[len(self.emitted):])
            self.emitted = ready

    def result(self, seconds: float, on_text) -> Completion:
        if self.stop_reason is None:
            self.stop_reason = "length"
            self.emit(on_text, final=True)
        return Completion(self.text, len(self.new), self.stop_reason, seconds, len(self.prompt_ids))


def stop_ids_of(tokenizer) -> set:
    """Every end-of-text token (Llama 3 has two) and every FIM sentinel: a plain completion ends at any."""
    ends = getattr(tokenizer, "eos_ids", None) or {tokenizer.eos_id}
    return {*ends, *(getattr(tokenizer, "sentinels", None) or {}).values()}


def check_prompt(prompt: str, what: str = "prompt") -> None:
    """A prompt must be text the tokenizer can take: a str without lone surrogates (what a JSON
    "\\ud800" or undecodable command-line bytes turn into)."""
    if not isinstance(prompt, str):
        raise TypeError(f"{what} must be a str, got {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text: {e.reason} at character {e.start}") from None


def _check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def _decode_rows(model, rows: List[_Row], max_new_tokens: int, sample, stop_ids, on_text, compile) -> List[Completion]:
    """Decode all rows as one batch (prompts right-padded; decode left-aligns them) until each stops."""
    started = time.perf_counter()
    ids = [row.prompt_ids for row in rows]
    width = max(map(len, ids))
    idx = torch.zeros((len(ids), width), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.bool)
    for i, row_ids in enumerate(ids):
        idx[i, : len(row_ids)], mask[i, : len(row_ids)] = torch.tensor(row_ids), True
    ragged = not bool(mask.all())
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        steps = decode(model, idx.to(device), max_new_tokens, sample, compile=compile,
                       prompt_mask=mask.to(device) if ragged else None) if max_new_tokens > 0 else []
        for tokens in steps:
            for row, token in zip(rows, tokens[:, 0].tolist()):
                if row.stop_reason is None:
                    row.add(token, stop_ids, on_text)
            if all(row.stop_reason is not None for row in rows):
                break
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    return [row.result(seconds, on_text) for row in rows]


def generate_completions(model, tokenizer, prompt: str, n: int = 1, max_new_tokens: int = 256,
                         temperature: float = 0.0, top_p: Optional[float] = None, epsilon: float = 3e-4,
                         generator: Optional[torch.Generator] = None,
                         on_text: Optional[Callable[[str], None]] = None, stop_top_level: bool = True, *,
                         suffix: Optional[str] = None, top_k: Optional[int] = None,
                         compile: bool = False) -> List[Completion]:
    """n completions of `prompt`, decoded together as one batch (all rows share the prompt, so
    there is no padding); each row stops on its own. on_text (n = 1 only) receives each piece of
    text as soon as it is final. See the module docstring for the stopping rules; stop_top_level=
    False keeps only EOS and max_new_tokens (for prompts asking for a whole program). A suffix
    (a str, even empty) asks for the middle between prompt and suffix instead: the model must have been
    trained with the FIM sentinels (a ValueError says so otherwise)."""
    check_prompt(prompt)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if on_text is not None and n != 1:
        raise ValueError("on_text streams a single completion: use n=1")
    _check_max_new_tokens(max_new_tokens)
    sample = make_sampler(temperature, epsilon=epsilon, top_p=top_p, top_k=top_k, generator=generator)
    max_seq_len = model.config.max_seq_len
    if suffix is not None:
        from codegen.infill import fim_prompt

        check_prompt(suffix, "suffix")
        ids, max_new_tokens, stop_ids, anchor = fim_prompt(tokenizer, prompt, suffix, max_new_tokens, max_seq_len,
                                                           model.config.vocab_size)
        rows = [_Row(tokenizer, "", ids, stop_top_level=False, anchor=anchor) for _ in range(n)]
    else:
        ids = tokenizer.encode(prompt, bos=True, eos=False)
        room, max_new_tokens = fit_context(len(ids), max_new_tokens, max_seq_len)
        ids, stop_ids = keep_last(ids, room, tokenizer.bos_id), stop_ids_of(tokenizer)
        rows = [_Row(tokenizer, prompt, ids, stop_top_level) for _ in range(n)]
    return _decode_rows(model, rows, max_new_tokens, sample, stop_ids, on_text, compile)


def complete(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: Optional[float] = None, epsilon: float = 3e-4, generator: Optional[torch.Generator] = None,
             on_text: Optional[Callable[[str], None]] = None) -> str:
    """The model's continuation of `prompt` (not including the prompt). temperature 0: greedy;
    otherwise nucleus sampling when top_p is given, else epsilon sampling. on_text(delta) is called
    with each piece of final text as it is produced; the pieces concatenate to the return value."""
    return generate_completions(model, tokenizer, prompt, 1, max_new_tokens, temperature, top_p, epsilon,
                                generator, on_text)[0].text


def complete_all(model, tokenizer, prompts: List[str], max_new_tokens: int = 256, batch_size: int = 8,
                 stop_top_level: bool = True, compile: bool = False,
                 on_batch: Optional[Callable[[int], None]] = None) -> List[Completion]:
    """Greedy completions of many prompts, batch_size at a time (prompts of different lengths are
    padded and masked: each row's tokens are those it gets alone), with generate_completions' stop
    rules. Training-time validation and code_eval use it, so their chrF scores compare. on_batch(n)
    is called after each batch of n prompts (a progress bar's update)."""
    _check_max_new_tokens(max_new_tokens)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        for prompt in chunk:
            check_prompt(prompt)
        encoded = [tokenizer.encode(p, bos=True, eos=False) for p in chunk]
        room, n_new = fit_context(max(map(len, encoded)), max_new_tokens, model.config.max_seq_len)
        rows = [_Row(tokenizer, p, keep_last(ids, room, tokenizer.bos_id), stop_top_level)
                for p, ids in zip(chunk, encoded)]
        out += _decode_rows(model, rows, n_new, make_sampler(0.0), stop_ids_of(tokenizer), None, compile)
        if on_batch is not None:
            on_batch(len(chunk))
    return out


# ----------------------------------------------------------------------------------------------
# Command line: python run_llama.py --option code_generate --prompt "..."


def add_arguments(parser):
    group = parser.add_argument_group("code_generate")
    group.add_argument("--prompt", required=True,
                       help="code to continue, e.g. a def line and its docstring; '-' reads it from stdin")
    group.add_argument("--suffix", default=None,
                       help="fill in the middle: the code after the hole (the prompt is the code before it); "
                            "needs a model trained with --fim_rate > 0")
    group.add_argument("--suffix_file", default=None, help="read --suffix from this file")
    group.add_argument("--max_new_tokens", type=int, default=None,
                       help="most tokens to generate; the prompt and these must fit the model's context "
                            f"(default {DEFAULT_NEW_TOKENS}, or what the context leaves)")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top_p", type=float, default=None,
                       help="nucleus sampling with this p (with --temperature > 0); default: epsilon sampling")
    group.add_argument("--top_k", type=int, default=None, help="top-k sampling (with --temperature > 0)")
    group.add_argument("--epsilon", type=float, default=3e-4,
                       help="epsilon sampling's probability floor when neither --top_p nor --top_k is given "
                            "(default 3e-4)")
    group.add_argument("--echo_prompt", action="store_true", help="print the prompt before the completion")
    group.add_argument("--compile", action="store_true",
                       help="decode through torch.compile (CUDA graphs on a GPU): same tokens, faster steps "
                            "after a one-time compilation")


def _read_inputs(args):
    """(prompt, suffix or None) from --prompt (or stdin) and --suffix / --suffix_file."""
    try:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        check_prompt(prompt)
    except ValueError as e:  # UnicodeDecodeError from stdin too
        raise UsageError(f"--prompt: {e}") from None
    if args.suffix is not None and args.suffix_file is not None:
        raise UsageError("--suffix and --suffix_file: give one of them")
    suffix = args.suffix
    if args.suffix_file is not None:
        try:
            suffix = Path(args.suffix_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--suffix_file {args.suffix_file}: cannot read it as UTF-8 text ({e})") from None
    if suffix is not None:
        try:
            check_prompt(suffix, "suffix")
        except ValueError as e:
            raise UsageError(f"--suffix: {e}") from None
    return prompt, suffix


def budget_in_context(tokenizer, prompt: str, suffix: Optional[str], max_new_tokens: Optional[int],
                      max_seq_len: int) -> int:
    """--max_new_tokens checked against the context: a UsageError when the prompt (and suffix) with the
    tokens asked for do not fit; None: DEFAULT_NEW_TOKENS, or what the context leaves."""
    n = len(tokenizer.encode(prompt, bos=True, eos=False))
    if suffix is not None:   # BOS [PRE] prefix [SUF] suffix [MID]
        n += len(tokenizer.encode(suffix, bos=False, eos=False)) + 3
    what = "the prompt and suffix take" if suffix is not None else "the prompt takes"
    if n >= max_seq_len:
        raise UsageError(f"{what} {n:,} tokens; the model's context is {max_seq_len:,}: shorten it")
    if max_new_tokens is None:
        return min(DEFAULT_NEW_TOKENS, max_seq_len - n)
    if n + max_new_tokens > max_seq_len:
        raise UsageError(f"{what} {n:,} tokens and --max_new_tokens asks for {max_new_tokens:,} more; the "
                         f"model's context is {max_seq_len:,}: lower --max_new_tokens to {max_seq_len - n:,} or less, "
                         "or shorten the prompt")
    return max_new_tokens


def run(args) -> int:
    from codegen.common import start

    if args.max_new_tokens is not None:
        _check_max_new_tokens(args.max_new_tokens)
    make_sampler(args.temperature, epsilon=args.epsilon, top_p=args.top_p, top_k=args.top_k)  # checks the settings
    prompt, suffix = _read_inputs(args)
    device, model, tokenizer = start(args)
    max_new_tokens = budget_in_context(tokenizer, prompt, suffix, args.max_new_tokens, model.config.max_seq_len)
    if suffix is not None:
        from codegen.infill import sentinels_of

        sentinels_of(tokenizer)  # a clear error, before any output, for a model not trained to infill
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def write(text: str):
        sys.stdout.write(text)
        sys.stdout.flush()

    if args.echo_prompt:
        write(prompt)
    try:
        result = generate_completions(model, tokenizer, prompt, 1, max_new_tokens, args.temperature,
                                      args.top_p, args.epsilon, generator, on_text=write, suffix=suffix,
                                      top_k=args.top_k, compile=args.compile)[0]
    except KeyboardInterrupt:
        write("\n")
        return 130
    last = result.text
    if args.echo_prompt and suffix is not None:
        write(suffix)
        last = suffix
    if not last.endswith("\n"):
        write("\n")
    print(f"[{result.tokens} tokens in {result.seconds:.2f}s, stopped: {result.stop_reason}]", file=sys.stderr)
    return 0
