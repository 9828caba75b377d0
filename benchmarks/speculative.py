"""Speculative decoding benchmark: every drafter against our plain decoding and HF `generate`
(plain, `assistant_model=`, `prompt_lookup_num_tokens=`), same prompts, same card.

Workloads (../shared/data, copied in benchmarks/data where small): HumanEval prompts,
MT-Bench first turns (one per category), GSM8K questions, and the recorded agent sessions
(each session's assistant turns replayed in order, so earlier outputs reach SuffixDecoding's
global tree). Sections:

  b1      batch 1, greedy, every method, the main target
  hf      HF generate plain / assisted / prompt lookup vs our methods on the same prompts
  sample  batch 1, temperature 0.7
  batch   batch 8 and 32, greedy, fixed K and the batch-aware goodput rule
  small   the small target with model-free drafters

Each row is measured on its own (errors are recorded, not fatal) and the report is rewritten
after every section, so a run cut short still leaves results.

    python benchmarks/speculative.py --out benchmarks/results            # GPU, full run
    python benchmarks/speculative.py --quick --target smollm2-135m-instruct \\
        --draft smollm2-135m-instruct --small-target "" --sections b1 --out /tmp/spec
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastdecode import LLM, SamplingParams  # noqa: E402
from fastdecode.bench.hf_baseline import hf_model_from_checkpoint  # noqa: E402
from fastdecode.bench.report import write_table_report  # noqa: E402
from fastdecode.bench.rule_log import enable_rule_log  # noqa: E402
from fastdecode.spec.config import SpeculativeConfig  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SECTIONS = ("b1", "hf", "sample", "batch", "small")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- workloads: a workload is a list of sessions, a session a list of chat prompts -----------
def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def set_data_dir(path: Path) -> None:
    global DATA
    DATA = path


def load_workloads(n: int, agent_sessions: int, agent_turns: int) -> dict[str, list]:
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    humaneval = [
        [user("Complete this Python function.\n\n" + r["prompt"])]
        for r in _jsonl("humaneval_0-99.jsonl")
    ]
    gsm8k = [[user(r["prompt"] + "\nThink step by step.")] for r in _jsonl("gsm8k_100.jsonl")]
    by_category: dict[str, list] = {}
    for r in _jsonl("mtbench_question.jsonl"):
        by_category.setdefault(r["category"], []).append([user(r["turns"][0])])
    per_cat = max(1, n // len(by_category))
    mtbench = [s for rows in by_category.values() for s in rows[:per_cat]]
    cases = json.loads((DATA / "agent_multi_turn_cases.json").read_text())["cases"]
    agent = []
    for case in [c for c in cases if c["target_bucket_tokens"] == 8192][:agent_sessions]:
        messages = case["messages"]
        turns = [messages[:i] for i, m in enumerate(messages) if m["role"] == "assistant"]
        agent.append((turns + [messages])[-agent_turns:])
    return {
        "humaneval": humaneval[:n],
        "mtbench": mtbench[:n],
        "gsm8k": gsm8k[:n],
        "agent": agent,
    }


# -- methods -----------------------------------------------------------------------------------
def methods(args, small: bool = False) -> dict[str, dict | None]:
    """name -> speculative_config (None: plain decoding)."""
    table: dict[str, dict | None] = {
        "plain": None,
        "ngram": {"method": "ngram", "num_draft_tokens": 4},
        "suffix": {"method": "suffix", "num_draft_tokens": 16},
        "stand": {"method": "stand", "num_draft_tokens": 8},
    }
    if not small:
        table.update(model_methods(args))
    keep = getattr(args, "methods", None)
    return {k: v for k, v in table.items() if not keep or k == "plain" or k in keep}


def model_methods(args) -> dict[str, dict]:
    draft = {"drafter_kwargs": {"model": args.draft}}
    return {
        "draft_chain": {"method": "draft_model", "num_draft_tokens": 4, **draft},
        "draft_dyspec": {
            "method": "draft_model", "num_draft_tokens": 16, "tree": "dynamic:5:4", **draft,
        },
        "layerskip": {"method": "layerskip", "num_draft_tokens": 4},
    }  # fmt: skip


@dataclass
class Measured:
    tokens: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    steps: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    plain_steps: int = 0
    proposed: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)


def run_workload(llm: LLM, sessions, params, spec, batch: int) -> Measured:
    """Sessions' turns in order (turn t of every session, `batch` at a time)."""
    m = Measured()
    turns = max(len(s) for s in sessions)
    for t in range(turns):
        prompts = [s[t] for s in sessions if t < len(s)]
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            sync()
            t0 = time.perf_counter()
            results = llm.generate(chunk, params, speculative_config=spec)
            sync()
            m.wall_s += time.perf_counter() - t0
            m.prefill_s += results[0].metrics["ttft_s"]
            for r in results:
                m.tokens += r.metrics["completion_tokens"]
                m.outputs.append(r.token_ids)
                if "tau" in r.metrics:
                    m.steps += r.metrics["spec_steps"]
                    m.plain_steps += r.metrics["plain_steps"]
                    m.draft_s += r.metrics["draft_s"]
                    m.verify_s += r.metrics["verify_s"]
                    m.proposed.append(r.metrics["draft_tokens"])
                    m.accepted.append(r.metrics["accepted_tokens"])
    return m


def bench_rows(llm, model_name, workloads, table, params, batch, section, args, rows, out):
    for workload, sessions in workloads.items():
        plain = None
        for method, spec_dict in table.items():
            row = {
                "section": section, "model": model_name, "workload": workload, "method": method,
                "batch": batch, "temperature": params.temperature,
                "max_tokens": params.max_tokens,
            }  # fmt: skip
            try:
                spec = None if spec_dict is None else SpeculativeConfig.from_any(spec_dict)
                # Warm-up: the workload's largest shape (the cache the measured requests
                # reuse), then the workload itself, untimed, so every (batch, width) shape
                # it meets has its kernels compiled and its CUDA graph captured before
                # the timing (Triton specializes on the split size, i.e. the capacity). The
                # config keeps what a server's would (the goodput rule's measured costs) and
                # forgets the requests (the global suffix tree) before each measured run.
                longest = max((t for s in sessions for t in s), key=lambda t: len(llm.encode(t)))
                llm.generate([longest] * batch, params, speculative_config=spec)
                run_workload(llm, sessions, params, spec, batch)
                runs = []
                for _ in range(args.repeats):  # the median run by tokens/s
                    if spec is not None:
                        spec.forget_requests()
                    runs.append(run_workload(llm, sessions, params, spec, batch))
                m = sorted(runs, key=lambda r: r.tokens / r.wall_s)[len(runs) // 2]
            except Exception as exc:  # recorded, the run goes on
                row["error"] = f"{type(exc).__name__}: {exc}"
                log(f"{section} {workload} {method} batch {batch}: FAILED {row['error']}")
                rows.append(row)
                continue
            tps = m.tokens / m.wall_s
            decode_s = m.wall_s - m.prefill_s
            row.update(
                requests=sum(len(s) for s in sessions),
                tokens=m.tokens,
                tokens_per_s=round(tps, 1),
                decode_tokens_per_s=round(m.tokens / decode_s, 1) if decode_s > 0 else None,
                ttft_ms_mean=round(m.prefill_s / max(1, len(m.outputs)) * 1e3, 2),
            )
            decode_tps = row["decode_tokens_per_s"]
            if method == "plain":
                plain = (tps, m.outputs, decode_tps)
                row["speedup_vs_plain"] = row["decode_speedup_vs_plain"] = 1.0
            elif plain is not None:
                row["speedup_vs_plain"] = round(tps / plain[0], 3)
                if decode_tps and plain[2]:
                    row["decode_speedup_vs_plain"] = round(decode_tps / plain[2], 3)
                if params.temperature == 0:
                    same = sum(a == b for a, b in zip(m.outputs, plain[1], strict=False))
                    row["greedy_identical_fraction"] = round(same / len(m.outputs), 3)
            if m.steps:
                row["tau"] = round((m.tokens - len(m.outputs)) / m.steps + 0, 3)
                row["acceptance"] = round(sum(m.accepted) / max(1, sum(m.proposed)), 3)
                row["plain_step_share"] = round(m.plain_steps / m.steps, 3)
                if batch == 1:  # rows share batched steps: per-step times only for batch 1
                    row["draft_ms_per_step"] = round(m.draft_s / m.steps * 1e3, 3)
                    row["verify_ms_per_step"] = round(m.verify_s / m.steps * 1e3, 3)
            rows.append(row)
            log(
                f"{section} {workload} {method} b{batch} T={params.temperature}: "
                f"{row['tokens_per_s']} tok/s x{row.get('speedup_vs_plain')} tau {row.get('tau')}"
            )
        write_report(rows, out, args)


# -- HF baselines --------------------------------------------------------------------------------
def bench_hf(llm, args, workloads, rows, out) -> None:
    target = hf_model_from_checkpoint(args.target)
    assistant = hf_model_from_checkpoint(args.draft)
    n_new = args.hf_new_tokens
    modes = {
        "hf_plain": {},
        "hf_assistant": {"assistant_model": assistant},
        "hf_prompt_lookup": {"prompt_lookup_num_tokens": 10},
    }
    ours = {k: v for k, v in methods(args).items() if k in args.hf_compare}
    params = SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True)
    for workload in args.hf_workloads:
        prompts = [s[0] for s in workloads[workload][: args.hf_prompts]]
        ids = [llm.encode(p) for p in prompts]
        base = None
        for mode, kwargs in modes.items():
            row = {"section": "hf", "model": args.target, "workload": workload, "method": mode,
                   "batch": 1, "temperature": 0.0, "max_tokens": n_new}  # fmt: skip
            try:
                one = torch.tensor([ids[0]], device="cuda")
                target.generate(one, max_new_tokens=4, do_sample=False, **kwargs)  # warm-up
                sync()
                t0 = time.perf_counter()
                tokens = 0
                for seq in ids:
                    x = torch.tensor([seq], device="cuda")
                    y = target.generate(
                        x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                        min_new_tokens=n_new, do_sample=False, pad_token_id=0, **kwargs,
                    )  # fmt: skip
                    tokens += y.shape[1] - x.shape[1]
                sync()
                tps = tokens / (time.perf_counter() - t0)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                log(f"hf {workload} {mode}: FAILED {row['error']}")
                rows.append(row)
                continue
            row.update(requests=len(ids), tokens=tokens, tokens_per_s=round(tps, 2))
            rows.append(row)
            base = max(base or 0.0, tps) if mode != "hf_plain" else base
            log(f"hf {workload} {mode}: {tps:.1f} tok/s")
        best_hf = base
        for method, spec_dict in ours.items():
            row = {"section": "hf", "model": args.target, "workload": workload, "method": method,
                   "batch": 1, "temperature": 0.0, "max_tokens": n_new}  # fmt: skip
            try:
                spec = None if spec_dict is None else SpeculativeConfig.from_any(spec_dict)
                llm.generate(ids[:1], SamplingParams(max_tokens=8), speculative_config=spec)
                m = run_workload(llm, [[i] for i in ids], params, spec, 1)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                continue
            tps = m.tokens / m.wall_s
            row.update(requests=len(ids), tokens=m.tokens, tokens_per_s=round(tps, 1))
            if best_hf:
                row["speedup_vs_best_hf_assisted"] = round(tps / best_hf, 2)
            rows.append(row)
            log(f"hf-compare {workload} {method}: {tps:.1f} tok/s")
    write_report(rows, out, args)
    del target, assistant
    torch.cuda.empty_cache()


# -- report ---------------------------------------------------------------------------------------
COLUMNS = [
    "section", "model", "workload", "method", "batch", "temperature", "tokens_per_s",
    "speedup_vs_plain", "decode_speedup_vs_plain", "tau", "acceptance", "plain_step_share",
    "draft_ms_per_step",
    "verify_ms_per_step",
    "ttft_ms_mean", "greedy_identical_fraction", "speedup_vs_best_hf_assisted",
]  # fmt: skip


def write_report(rows: list[dict], out: Path, args) -> None:
    write_table_report(
        out, args.name, "Speculative decoding benchmark", rows, COLUMNS,
        f"tokens_per_s: generated tokens / wall time including prefill, the median of "
        f"{args.repeats} measured run(s) after a warm-up; decode_speedup_vs_plain: the same "
        "over decode time only (wall time less the prefill, which every method shares); tau: "
        "tokens per target step; "
        "plain_step_share: the target steps that were plain K = 0 bursts (goodput rule); "
        "draft/verify ms per step: batch wall time of drafting / verifying per step.",
    )  # fmt: skip
    try:
        plot(rows, out / f"{args.name}.png")
    except ImportError:  # no matplotlib here: `--replot NAME.json` draws it elsewhere
        pass


def plot(rows: list[dict], path: Path) -> None:
    """Speedup over our plain decoding by workload and method (batch 1, greedy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["section"] == "b1" and r.get("speedup_vs_plain")]
    if not sel:
        return
    workloads = list(dict.fromkeys(r["workload"] for r in sel))
    names = [m for m in dict.fromkeys(r["method"] for r in sel) if m != "plain"]
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(workloads), 4))
    for i, name in enumerate(names):
        values = [
            next((r["speedup_vs_plain"] for r in sel if r["workload"] == w and r["method"] == name),
                 0.0)
            for w in workloads
        ]  # fmt: skip
        ax.bar([j + i * width for j in range(len(workloads))], values, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))], workloads)
    ax.set_ylabel("speedup vs our plain decoding")
    ax.set_title(f"Speculative decoding, batch 1, greedy ({rows[0]['model']})")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_section(section: str, llm, args, workloads, greedy, rows: list[dict]) -> None:
    if section == "b1":
        bench_rows(
            llm, args.target, workloads, methods(args), greedy, 1, "b1", args, rows, args.out
        )
    elif section == "hf" and torch.cuda.is_available():
        bench_hf(llm, args, workloads, rows, args.out)
    elif section == "sample":
        sampled = SamplingParams(max_tokens=args.max_tokens, temperature=0.7, seed=0)
        table = {k: v for k, v in methods(args).items() if k in ("plain", "suffix", "stand",
                                                                  "draft_chain")}  # fmt: skip
        chosen = {k: workloads[k] for k in ("humaneval", "agent")}
        bench_rows(llm, args.target, chosen, table, sampled, 1, "sample", args, rows, args.out)
    elif section == "batch":
        table = {}
        for name, spec in methods(args).items():  # fixed K for some, the goodput rule for all
            if name in ("plain", "ngram", "suffix", "draft_chain"):
                table[name] = spec
            if spec is not None and name != "draft_dyspec":
                table[name + "+goodput"] = {**spec, "draft_length": "goodput"}
        for batch in args.batches:
            chosen = {"humaneval": [[s[0]] for s in load_workloads(batch, 0, 0)["humaneval"]]}
            chosen["gsm8k"] = [[s[0]] for s in load_workloads(batch, 0, 0)["gsm8k"]]
            bench_rows(llm, args.target, chosen, table, greedy, batch, "batch", args, rows,
                       args.out)  # fmt: skip
    elif section == "small" and args.small_target:
        small = LLM(args.small_target, progress=False)
        chosen = {k: workloads[k] for k in ("humaneval", "agent")}
        bench_rows(small, args.small_target, chosen, methods(args, small=True), greedy, 1,
                   "small", args, rows, args.out)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )  # noqa: E501
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--small-target", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--prompts", type=int, default=6, help="requests per workload")
    p.add_argument(
        "--methods", nargs="+", help="only these methods (plain always runs: it is the baseline)"
    )
    p.add_argument("--agent-sessions", type=int, default=3)
    p.add_argument("--agent-turns", type=int, default=3, help="last N turns of each session")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument(
        "--repeats", type=int, default=3,
        help="measured runs per row (after the warm-up); the report keeps the median by tok/s",
    )  # fmt: skip
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--hf-new-tokens", type=int, default=64)
    p.add_argument("--hf-prompts", type=int, default=3)
    p.add_argument("--hf-workloads", nargs="+", default=["humaneval", "agent"])
    p.add_argument("--hf-compare", nargs="+", default=["plain", "suffix", "draft_chain"])
    p.add_argument("--quick", action="store_true", help="tiny settings (CPU smoke test)")
    p.add_argument("--data", type=Path, default=DATA, help="directory of the workload files")
    p.add_argument("--replot", type=Path, help="draw the plot of a saved report and exit")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="speculative")
    p.add_argument(
        "--rule-log", type=Path,
        help="write the goodput rule's plans and timings (DEBUG lines) to this file",
    )  # fmt: skip
    args = p.parse_args()
    if args.rule_log:
        enable_rule_log(args.rule_log)
    if args.replot:
        plot(json.loads(args.replot.read_text())["rows"], args.replot.with_suffix(".png"))
        return
    set_data_dir(args.data)
    if args.quick:
        args.prompts, args.agent_sessions, args.agent_turns = 2, 1, 2
        args.max_tokens, args.batches, args.hf_prompts, args.repeats = 12, [2], 1, 1
    rows: list[dict] = []
    workloads = load_workloads(args.prompts, args.agent_sessions, args.agent_turns)
    if args.quick:
        workloads = {k: v[:2] for k, v in workloads.items()}
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    log(f"loading {args.target}")
    llm = LLM(args.target, progress=False)
    for section in dict.fromkeys(args.sections):  # in the order given: a run cut short
        run_section(section, llm, args, workloads, greedy, rows)  # keeps the first ones' rows
    write_report(rows, args.out, args)
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
