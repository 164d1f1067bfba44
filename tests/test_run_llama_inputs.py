"""run_llama.py's checks of its input, in process (no model, no tokenizer): option routing,
argument ranges, and the data-file rules read_data applies line by line."""
import pytest

import run_llama
from run_llama import DataError, read_data


@pytest.fixture
def codegen_calls(monkeypatch):
    """Record the argv of every call routed to codegen's CLI instead of running it."""
    import codegen.cli

    calls = []
    monkeypatch.setattr(codegen.cli, "main", lambda argv: calls.append(argv) or 0)
    return calls


@pytest.mark.parametrize("argv", [["--option", "codegen"], ["--option=codegen"], ["--option=serve", "--port", "0"],
                                  ["--seed", "3", "--option", "code_eval"]])
def test_codegen_options_are_routed_however_spelled(codegen_calls, argv):
    assert run_llama.main(argv) == 0
    assert codegen_calls == [argv]


def test_a_flag_value_spelled_like_a_codegen_option_is_not_routed(codegen_calls, tmp_path, capsys):
    argv = ["--option", "generate", "--generated_sentence_low_temp_out", "serve",
            "--pretrained-model-path", str(tmp_path / "missing.pt")]
    assert run_llama.main(argv) == 2  # ran generate, which reports the missing checkpoint
    assert codegen_calls == []
    assert "missing.pt not found" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [
    ("--lora_rank", "0", "--lora_rank must be >= 1, got 0"),
    ("--lora_rank", "-2", "--lora_rank must be >= 1, got -2"),
    ("--lora_alpha", "0", "--lora_alpha must be > 0, got 0.0"),
    ("--lora_alpha", "-1", "--lora_alpha must be > 0, got -1.0"),
    ("--lr", "0", "--lr must be > 0, got 0.0"),
    ("--lr", "-1e-5", "--lr must be > 0, got -1e-05"),
    ("--lr", "nan", "--lr must be > 0, got nan"),
    ("--max_sentence_len", "0", "--max_sentence_len must be >= 1"),
    ("--epochs", "0", "--epochs must be >= 1"),
    ("--epochs", "-3", "--epochs must be >= 1"),
    ("--batch_size", "0", "--batch_size must be >= 1, got 0"),
    ("--hidden_dropout_prob", "1.5", "--hidden_dropout_prob must be in [0, 1), got 1.5"),
])
def test_out_of_range_arguments_are_usage_errors(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_llama.get_args(["--option", "lora", f"{flag}={value}"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_in_range_arguments_are_accepted():
    args = run_llama.get_args(["--option", "lora", "--lora_rank", "1", "--lora_alpha", "0.5", "--lr", "1e-6",
                               "--max_sentence_len", "1", "--epochs", "1", "--hidden_dropout_prob", "0"])
    assert (args.lora_rank, args.max_sentence_len, args.epochs) == (1, 1, 1)


def write(tmp_path, content):
    path = tmp_path / "data.txt"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_each_line_is_one_example_and_a_final_newline_is_fine(tmp_path):
    assert read_data(write(tmp_path, "1 ||| a\n0 ||| b\n"), 2) == [(1, "a"), (0, "b")]
    assert read_data(write(tmp_path, "1 ||| a\r\n0 ||| b"), 2) == [(1, "a"), (0, "b")]
    # only "\n" ends a line: a form feed inside a sentence stays in it
    assert read_data(write(tmp_path, "1 ||| a\x0cb\n"), 2) == [(1, "a\x0cb")]
    # a UTF-8 byte-order mark (as Windows editors write) is not part of the first label
    assert read_data(write(tmp_path, b"\xef\xbb\xbf3 ||| a\n1 ||| b\n"), 5) == [(3, "a"), (1, "b")]


@pytest.mark.parametrize("content,message", [
    ("1 ||| a\n\n0 ||| b\n", "data.txt:2: blank line"),
    ("1 ||| a\n0 ||| b\n\n", "data.txt:3: blank line"),
    ("1 ||| a\n   \n", "data.txt:2: blank line"),
    (b"1 ||| a\n0 ||| caf\xe9\n", "data.txt:2: not UTF-8 text (byte 0xe9)"),
    ("-1 ||| a\n1 ||| b\n", "data.txt:1: label -1 (unknown) in a file with known labels"),
    ("1 ||| a\n-2 ||| b\n", "data.txt:2: label -2 is outside 0..1"),
])
def test_malformed_lines_name_file_and_line(tmp_path, content, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_data(write(tmp_path, content), 2, unknown_ok=True)


def test_unknown_labels_only_where_allowed(tmp_path):
    path = write(tmp_path, "-1 ||| a\n-1 ||| b\n")
    assert read_data(path, 2, unknown_ok=True) == [(-1, "a"), (-1, "b")]
    with pytest.raises(DataError, match=r"data.txt:1: label -1 \(unknown\) is not allowed here"):
        read_data(path, 2)


def test_a_directory_is_not_a_data_file(tmp_path):
    with pytest.raises(DataError, match="cannot read the data file .*Is a directory"):
        read_data(tmp_path, 2)


def test_label_name_file_must_be_utf8(tmp_path):
    path = tmp_path / "labels.json"
    path.write_bytes(b'["bad",\n "g\xf6od"]')
    with pytest.raises(DataError, match="labels.json:2: not UTF-8 text"):
        run_llama.read_label_names(path)


@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_unwritable_output_path_is_refused_before_any_work(tmp_path, capsys, where):
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path if where == "a directory" else tmp_path / "file.txt" / "sst-test-prompting-output.txt"
    argv = ["--option", "prompt", "--test_out", str(out), "--pretrained-model-path", str(tmp_path / "missing.pt")]
    assert run_llama.main(argv) == 2
    err = capsys.readouterr().err
    assert "--test_out" in err and "cannot write a file there" in err  # not the missing checkpoint: checked first


def test_a_label_equal_to_the_number_of_labels_is_out_of_range(tmp_path):
    (tmp_path / "d.txt").write_text("0 ||| fine\n2 ||| one too many\n")
    with pytest.raises(DataError, match=r"d.txt:2: label 2 is outside 0..1"):
        read_data(tmp_path / "d.txt", 2)


# ----------------------------------------------------------------------------------------------
# help texts


def parsers():
    return {"assignment": run_llama.build_parser(), "pretrain": run_llama.pretrain_parser(),
            "export": run_llama.export_parser()}


@pytest.mark.parametrize("name", ["assignment", "pretrain", "export"])
def test_every_flag_has_help_that_shows_its_default(name):
    parser = parsers()[name]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help text"
        shown = formatter._get_help_string(action)
        assert "default" in shown or action.required, f"{action.option_strings}: no default shown"


@pytest.mark.parametrize("option", ["generate", "prompt", "finetune", "lora", "predict", "pretrain", "export",
                                    "codegen", "code_eval", "code_generate", "serve"])
def test_help_works_for_every_option(option, capsys):
    try:
        status = run_llama.main(["--option", option, "--help"])
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr().out
    assert status == 0 and out.startswith("usage:")


def test_top_level_help_says_where_the_other_options_flags_are(capsys):
    with pytest.raises(SystemExit):
        run_llama.main(["--help"])
    out = capsys.readouterr().out
    for option in ("pretrain", "export", "codegen"):
        assert f"--option {option} --help" in out
    assert "code_eval, code_generate, serve" in out


# ----------------------------------------------------------------------------------------------
# sentences longer than the model's context


class WordTokenizer:
    """One id per distinct word, BOS = 1: enough to see what encode_all keeps."""

    def __init__(self):
        self.ids = {}

    def encode(self, s, bos, eos):
        return [1] * bos + [self.ids.setdefault(w, len(self.ids) + 2) for w in s.split()]


def test_a_sentence_too_long_for_the_context_keeps_its_start_and_the_prompt(capsys):
    tok = WordTokenizer()
    examples = [(0, "a b c d e f g"), (1, "short one")]
    encoded = run_llama.encode_all(examples, tok, 6, suffix="This movie is", path="d.txt")
    prompt = tok.encode("This movie is", False, False)
    (_, cut, _), (_, kept, _) = encoded
    assert cut == [1] + tok.encode("a b", False, False) + prompt  # 6 tokens: BOS, the start, the whole prompt
    assert kept == tok.encode("short one This movie is", True, False)
    assert "d.txt: 1 of 2 sentences are longer than the model's context of 6 tokens" in capsys.readouterr().err
    assert [ids for _, ids, _ in run_llama.encode_all(examples, tok, 4)] == [[1, *tok.encode("a b c", 0, 0)],
                                                                          tok.encode("short one", 1, 0)]


def test_nothing_is_cut_or_said_when_everything_fits(capsys):
    tok = WordTokenizer()
    examples = [(0, "a b c")]
    assert run_llama.encode_all(examples, tok, 4) == [(0, tok.encode("a b c", True, False), "a b c")]
    assert capsys.readouterr().err == ""


def test_predict_without_test_out_is_a_usage_error(tmp_path, capsys):
    assert run_llama.main(["--option", "predict", "--classifier", str(tmp_path / "c.pt")]) == 2
    assert "--option predict needs --classifier CKPT" in capsys.readouterr().err
