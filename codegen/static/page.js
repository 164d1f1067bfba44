// The page's only script, inlined by codegen/serve.py and allowed by the sha256 hash in its
// Content-Security-Policy. Results are set with textContent only: text stays text, never markup.
const $ = (id) => document.getElementById(id);
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
  $("generate").disabled = true;
  $("status").textContent = "generating...";
  try {
    const response = await fetch("/generate", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    // textContent: the text is shown as text, never parsed as markup, so any HTML in it stays escaped
    $("echo").textContent = body.prompt;
    $("completion").textContent = data.completion;
    $("suffix_echo").textContent = suffix;
    $("status").textContent = data.tokens + " tokens in " + data.seconds.toFixed(2) + " s (" + data.stop_reason + ")";
  } catch (err) {
    $("status").textContent = "error: " + err.message;
  } finally {
    $("generate").disabled = false;
  }
});
