// The page's only script, inlined by codegen/serve.py and allowed by the sha256 hash in its
// Content-Security-Policy. Text is put in the page with textContent and text nodes only: text stays
// text, never markup.
"use strict";
const $ = (id) => document.getElementById(id);

// ---- Python syntax highlighting: a small lexer, just enough to colour keywords, builtins, the
// names a def or class introduces, strings, comments and numbers (tested against Python's tokenize).
const KEYWORDS = new Set(("False None True and as assert async await break class continue def del elif else " +
  "except finally for from global if import in is lambda nonlocal not or pass raise return try while with " +
  "yield").split(" "));
const BUILTINS = new Set(("abs all any bool bytes callable chr dict dir divmod enumerate filter float format " +
  "getattr hasattr hash id input int isinstance issubclass iter len list map max min next object open ord " +
  "pow print property range repr reversed round set setattr slice sorted str sum super tuple type vars zip " +
  "Exception ValueError TypeError KeyError IndexError RuntimeError NotImplementedError StopIteration").split(" "));
const STRING_START = /(?:[rR][bBfF]?|[bBfF][rR]?|[uU])?('''|"""|'|")/y;  // prefix, then the quote
const DIGITS = String.raw`\d(?:_?\d)*`;  // 1_000
const NUMBER = new RegExp(String.raw`0[xX](?:_?[0-9a-fA-F])+|0[bB](?:_?[01])+|0[oO](?:_?[0-7])+|` +
  String.raw`(?:${DIGITS}(?:\.(?:${DIGITS})?)?|\.${DIGITS})(?:[eE][+-]?${DIGITS})?[jJ]?`, "y");
const NAME = /[\p{L}\p{Nl}_][\p{L}\p{Nl}\p{Mn}\p{Mc}\p{Nd}\p{Pc}]*/uy;

function matchAt(regex, text, i) {
  regex.lastIndex = i;
  return regex.exec(text);
}

// Where the string whose body starts at i ends: after its closing quote; a one-line string left open
// ends at its line's end, a triple-quoted one at the end of the text (still being typed or generated).
function stringEnd(text, i, quote) {
  while (i < text.length) {
    if (text[i] === "\\") {
      i += 2;  // an escaped character, a quote or a newline too (in raw strings as well)
    } else if (text.startsWith(quote, i)) {
      return i + quote.length;
    } else if (text[i] === "\n" && quote.length === 1) {
      return i;
    } else {
      i += 1;
    }
  }
  return text.length;
}

// The coloured tokens of `text`: [start, end, kind] in order, kind one of kw, builtin, def, str,
// comment, num. Everything else (names, operators, white space) is plain.
function pythonTokens(text) {
  const tokens = [];
  let i = 0, previous = "";  // the last token that is not white space or a comment
  while (i < text.length) {
    const c = text[i];
    let end = i + 1, kind = null, m;
    if (c === "#") {
      end = text.indexOf("\n", i) < 0 ? text.length : text.indexOf("\n", i);
      kind = "comment";
    } else if ((m = matchAt(STRING_START, text, i))) {
      end = stringEnd(text, i + m[0].length, m[1]);
      kind = "str";
    } else if (/[0-9.]/.test(c) && (m = matchAt(NUMBER, text, i))) {
      end = i + m[0].length;
      kind = "num";
    } else if ((m = matchAt(NAME, text, i))) {
      const word = m[0];
      end = i + word.length;
      if (KEYWORDS.has(word)) kind = "kw";
      else if (previous === "def" || previous === "class") kind = "def";
      else if (BUILTINS.has(word) && previous !== ".") kind = "builtin";
    }
    if (kind !== null) tokens.push([i, end, kind]);
    if (kind !== "comment" && !/[\s\\]/.test(c)) previous = text.slice(i, end);  // (\ continues a line)
    i = end;
  }
  return tokens;
}

// Show pieces of one Python text ([element, text] in order: prompt, completion, suffix) in their
// elements, highlighted as the one text they make, so a string opened in the prompt stays a string.
function render(pieces) {
  const whole = pieces.map((piece) => piece[1]).join("");
  const tokens = pythonTokens(whole);
  let start = 0, t = 0;
  for (const [element, text] of pieces) {
    const end = start + text.length, nodes = document.createDocumentFragment();
    for (let i = start; i < end;) {
      while (t < tokens.length && tokens[t][1] <= i) t += 1;
      const token = tokens[t], inside = token !== undefined && token[0] <= i;
      const stop = Math.min(end, token === undefined ? end : inside ? token[1] : token[0]);
      if (inside) {
        const span = document.createElement("span");
        span.className = "py-" + token[2];
        span.textContent = whole.slice(i, stop);
        nodes.appendChild(span);
      } else {
        nodes.appendChild(document.createTextNode(whole.slice(i, stop)));
      }
      i = stop;
    }
    element.replaceChildren(nodes);
    start = end;
  }
}

// ---- Generation, streamed: POST /generate/stream answers one JSON object a line.
async function* jsonLines(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      yield JSON.parse(buffer.slice(0, newline));
      buffer = buffer.slice(newline + 1);
    }
  }
  if (buffer.trim() !== "") yield JSON.parse(buffer);
}

let controller = null;  // aborts the running generation's fetch: the server stops when it sees the close

function busy(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const topP = $("top_p").value.trim();
  const suffix = $("suffix").value;
  const body = {
    prompt: $("prompt").value,
    max_new_tokens: parseInt($("max_new_tokens").value, 10),
    temperature: parseFloat($("temperature").value || "0"),
    top_p: topP === "" ? null : parseFloat(topP),
    suffix: suffix === "" ? null : suffix,  // empty: plain completion; otherwise fill in the middle
  };
  let completion = "", finished = false;
  const show = () => render([[$("echo"), body.prompt], [$("completion"), completion], [$("suffix_echo"), suffix]]);
  controller = new AbortController();
  busy(true);
  show();
  $("status").textContent = "generating...";
  try {
    const response = await fetch("/generate/stream", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      const data = await response.json();
      throw new Error(data.error || response.statusText);
    }
    for await (const message of jsonLines(response.body)) {
      if (message.error !== undefined) throw new Error(message.error);
      if (message.text !== undefined) {
        completion += message.text;
        show();
      }
      if (message.done) {
        finished = true;
        $("status").textContent = message.tokens + " tokens in " + message.seconds.toFixed(2) + " s (" +
          message.stop_reason + ")";
      }
    }
    if (!finished) throw new Error("the server closed the connection before the end");
  } catch (err) {
    $("status").textContent = err.name === "AbortError" ? "stopped after " + completion.length + " characters"
      : "error: " + err.message;
  } finally {
    controller = null;
    busy(false);
  }
});

$("stop").addEventListener("click", () => {
  if (controller !== null) controller.abort();
});
