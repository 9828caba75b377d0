"""Long-context decode speed and memory of the KV policies against our full attention and HF
`generate`, same prompts, same card (the quality side is `fastdecode bench longcontext`).

For each context L and batch B: B windows of L - new_tokens essay tokens are prefilled (TTFT
reported on its own), then `new_tokens` are decoded greedily (EOS ignored). Rows: time per
output step including each policy's selection work, decode tok/s, speedup over full
attention, KV bytes held (the cache's own accounting, and the allocator's growth while the
cache was built), peak memory during decoding, and the largest batch that fits at L from the
measured bytes per row. `triforce` rows are lossless sparse self-speculation (the target
drafts through a sparse read of its own cache, verifies with the full one, K = --draft-tokens
drafts a step): they report tau (mean, lowest and median over the rows), the batch's steps
against ceil(new_tokens / mean tau), and whether the output equals full attention's.

    python benchmarks/longcontext.py --out benchmarks/results                 # GPU
    python benchmarks/longcontext.py --model smollm2-135m-instruct --contexts 1024 \\
        --batches 1 2 --new-tokens 8 --no-hf --out /tmp/lc                     # CPU smoke

Each row is measured on its own (an OOM or error is recorded and the run goes on); the report
is rewritten after every row.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastdecode import LLM  # noqa: E402
from fastdecode.bench.hf_baseline import hf_model_from_checkpoint  # noqa: E402
from fastdecode.bench.report import write_table_report  # noqa: E402
from fastdecode.bench.rule_log import enable_rule_log  # noqa: E402
from fastdecode.engine.generate import BatchTiming, run_batch  # noqa: E402
from fastdecode.engine.runner import ModelRunner  # noqa: E402
from fastdecode.engine.speculative import SpecTiming, run_speculative  # noqa: E402
from fastdecode.engine.stopping import RequestState  # noqa: E402
from fastdecode.kv.policies import KVPolicyConfig  # noqa: E402
from fastdecode.params import SamplingParams  # noqa: E402
from fastdecode.spec.config import SpeculativeConfig  # noqa: E402
from fastdecode.spec.length import GoodputLength  # noqa: E402

ESSAYS = ROOT.parent / "shared" / "data" / "paulgraham"
CUDA = torch.cuda.is_available()
WARM_STEPS = 4

# name -> (kv policy or None, budget, speculative drafter options or None)
METHODS: dict[str, tuple[str | None, float, dict | None]] = {
    "full": (None, 1.0, None),
    "quest": ("quest", 1 / 16, None),
    "tidal": ("tidal", 1 / 16, None),
    "streaming_read": ("streaming_read", 1 / 16, None),
    "snapkv": ("snapkv", 1 / 16, None),
    "streaming_1/8": ("streaming", 1 / 8, None),
    "cake": ("cake", 1 / 16, None),
    "quant2": ("quant", 1.0, None),
    "triforce_streaming": (None, 1.0, {"policy": "streaming_read", "budget": 1 / 16}),
    "triforce_quest": (None, 1.0, {"policy": "quest", "budget": 1 / 16}),
    # MagicDec drafts through a fixed small window whatever the context: cheaper draft steps
    "triforce_window512": (None, 1.0, {"policy": "streaming_read", "budget": 512}),
    # the baseline of the cycle's run-ahead: the host reads each cycle before the next starts
    "triforce_streaming_sync": (
        None,
        1.0,
        {"policy": "streaming_read", "budget": 1 / 16, "run_ahead": False},
    ),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def essay_tokens(tokenizer, essays: Path) -> list[int]:
    text = "\n\n".join(p.read_text() for p in sorted(essays.glob("*.txt")))
    return tokenizer.encode(text, add_special_tokens=False)


def make_prompts(ids: list[int], batch: int, length: int) -> list[list[int]]:
    """`batch` different windows of `length` tokens (wrapping around the essays)."""
    stride = max(1, (len(ids) - length) // max(1, batch)) if len(ids) > length else 1
    doubled = ids * (length // max(1, len(ids)) + 2)
    return [doubled[i * stride : i * stride + length] for i in range(batch)]


def _memory() -> tuple[int, int]:
    if not CUDA:
        return 0, 0
    return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()


def _full_batch_rate(steps, states, start: float, emitted: int) -> float | None:
    """Run the remaining steps; returns the decode tok/s over the steps that began with no
    row finished: what a continuous-batching server, which refills finished rows, sustains.
    (Each step ends with a host read, so its end is seen on time.)"""
    seconds, tokens = 0.0, 0
    full = not any(s.finished for s in states)
    for _ in steps:
        now, count = time.perf_counter(), sum(len(s.token_ids) for s in states)
        if full:
            seconds, tokens = seconds + now - start, tokens + count - emitted
        full = not any(s.finished for s in states)
        start, emitted = now, count
    return round(tokens / seconds, 1) if seconds else None


def run_one(
    model, tokenizer, prompts, new_tokens, method, full_outputs, draft_tokens=4, goodput=False
) -> dict:
    policy_name, budget, triforce = METHODS[method]
    kv_policy = None
    if policy_name is not None:
        options = {"bits": 2} if policy_name == "quant" else {}
        kv_policy = KVPolicyConfig(policy_name, budget, options)
    runner = ModelRunner(model, compile=False, kv_policy=kv_policy)  # compiled once, in main
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    states = [RequestState(params, frozenset(), tokenizer) for _ in prompts]
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before, _ = _memory()
    if triforce is None:
        timing = BatchTiming()
        steps = run_batch(runner, prompts, states, timing, check_every=1)
    else:
        options = dict(triforce)
        run_ahead = options.pop("run_ahead", True)
        spec = SpeculativeConfig("triforce", num_draft_tokens=draft_tokens, drafter_kwargs=options)
        drafter = spec.batch_drafter(runner, tokenizer, len(prompts))
        drafter.run_ahead = run_ahead
        timing = SpecTiming()
        policy = GoodputLength() if goodput else None  # K or 0 per step, from measured costs
        steps = run_speculative(runner, prompts, states, timing, drafter, draft_tokens, policy)
    next(steps)  # prefill done: the cache holds the (compressed) prompt
    sync()
    kv_alloc, prefill_peak = _memory()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    # The first steps capture CUDA graphs (and compile new shapes): time from WARM_STEPS on.
    # (With the goodput rule a step may be a burst of plain tokens: warm one step only; its
    # first cycle and its plain step are captured by then.)
    for _ in range(1 if goodput else WARM_STEPS):
        next(steps, None)
    sync()
    t0, emitted0 = time.perf_counter(), sum(len(s.token_ids) for s in states)
    full_batch = _full_batch_rate(steps, states, t0, emitted0)
    sync()
    decode_s = time.perf_counter() - t0
    _, decode_peak = _memory()
    emitted = sum(len(s.token_ids) for s in states) - emitted0
    if not emitted:
        raise ValueError("no tokens left to time after the warm-up steps: raise --new-tokens")
    row = {
        "ttft_ms": round(timing.prefill_s * 1e3, 1),
        "decode_s": round(decode_s, 4),
        "ms_per_output_step": round(decode_s / max(1, emitted / len(prompts)) * 1e3, 3),
        "decode_tokens_per_s": round(emitted / decode_s, 1) if decode_s else None,
        "full_batch_tokens_per_s": full_batch,
        "kv_bytes": runner.cache.nbytes() if hasattr(runner.cache, "nbytes") else None,
        "allocated_growth_bytes": kv_alloc - before,
        "prefill_peak_bytes": prefill_peak,
        "decode_peak_bytes": decode_peak,
    }
    if isinstance(timing, SpecTiming):
        # A static batch steps until its slowest row is done (finished rows ride along), so
        # the step count follows the lowest tau, not the mean.
        taus = [r.tau for r in timing.rows]
        mean_tau = sum(taus) / len(taus)
        row["draft_tokens"] = draft_tokens
        row["goodput_rule"] = goodput
        row["tau"] = round(mean_tau, 3)
        row["tau_min"] = round(min(taus), 3)
        row["tau_median"] = round(statistics.median(taus), 3)
        row["steps"] = timing.steps  # from the start: the prefill's step + every verify step
        row["ideal_steps"] = math.ceil(new_tokens / mean_tau) if mean_tau else None
        row["cycles"] = timing.fused_steps  # TriForce's one-graph cycles among the steps
        cycle = getattr(drafter, "device_cycle", None)
        row["cycles_ahead"] = cycle.ahead_taken if cycle is not None else None
        row["ahead_dropped"] = cycle.ahead_dropped if cycle is not None else None
    outputs = [s.token_ids for s in states]
    if full_outputs is not None:
        same = sum(a == b for a, b in zip(outputs, full_outputs, strict=True))
        row["identical_to_full_fraction"] = round(same / len(prompts), 3)
    del runner, states
    return row, outputs


def hf_row(model_name, prompts, new_tokens) -> dict:
    hf = hf_model_from_checkpoint(model_name)
    ids = torch.tensor(prompts, device="cuda")
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    sync()
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    sync()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    sync()
    total = time.perf_counter() - t0
    decode = max(1e-9, total - ttft)
    del hf
    torch.cuda.empty_cache()
    return {
        "ttft_ms": round(ttft * 1e3, 1),
        "ms_per_output_step": round(decode / (new_tokens - 1) * 1e3, 3),
        "decode_tokens_per_s": round(len(prompts) * (new_tokens - 1) / decode, 1),
    }


COLUMNS = [
    "context", "batch", "method", "ms_per_output_step", "decode_tokens_per_s",
    "speedup_vs_full", "full_batch_speedup", "ttft_ms", "kv_MiB", "kv_ratio_vs_full",
    "decode_peak_GiB", "max_batch_estimate", "tau", "tau_min", "tau_median", "steps", "ideal_steps",
    "cycles", "cycles_ahead", "identical_to_full_fraction",
]  # fmt: skip


def write_report(rows: list[dict], args) -> None:
    write_table_report(
        args.out, args.name, "Long-context decode speed and memory", rows, COLUMNS,
        f"{args.new_tokens} greedy tokens per row after an L-token prompt; ms_per_output_step "
        "includes each policy's selection work (triforce: per emitted step of the batch); "
        "kv_MiB: the cache's bytes; decode_peak_GiB: allocator peak while decoding; "
        "max_batch_estimate: rows of this method's KV (plus the weights) that fit the card. "
        f"triforce (K = {args.draft_tokens} drafts a step"
        f"{'; the goodput rule picks K or 0 every step' if args.goodput else ''}): "
        "tau is the mean over rows of tokens "
        "per verify step, tau_min / tau_median its lowest / median row; the batch is static, "
        "so it steps until its slowest row is done (finished rows ride along): steps (the "
        "batch's, the prefill's included) follows tau_min, against ideal_steps = "
        "ceil(new_tokens / mean tau); cycles: the steps that were TriForce's one-graph "
        "draft + verify cycle (the rest: plain steps). full_batch_speedup: decode tok/s "
        "over the steps that began with every row still decoding (what a continuous-"
        "batching server, refilling finished rows, sustains) against full attention's.",
        details=(args.model,),
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )  # noqa: E501
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument(
        "--draft-tokens", type=int, default=4, help="triforce methods: draft tokens (K) a step"
    )
    p.add_argument(
        "--goodput", action="store_true",
        help="triforce methods: the batch-aware rule picks K or 0 (plain steps) every step",
    )  # fmt: skip
    p.add_argument("--essays", type=Path, default=ESSAYS)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--hf-batch", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="longcontext")
    p.add_argument(
        "--rule-log", type=Path,
        help="write the goodput rule's plans and timings (DEBUG lines) to this file",
    )  # fmt: skip
    args = p.parse_args()
    if args.rule_log:
        enable_rule_log(args.rule_log)
    llm = LLM(args.model, progress=False)
    model, tokenizer = llm.model, llm.tokenizer
    if CUDA:
        model.compile()
    ids = essay_tokens(tokenizer, args.essays)
    total_memory = torch.cuda.get_device_properties(0).total_memory if CUDA else None
    rows: list[dict] = []
    for context in args.contexts:
        for batch in args.batches:
            # room for the new tokens and speculation's draft columns within the context
            prompts = make_prompts(ids, batch, context - args.new_tokens - 8)
            full = None
            for method in args.methods:
                row = {"context": context, "batch": batch, "method": method}
                try:
                    result, outputs = run_one(
                        model, tokenizer, prompts, args.new_tokens, method,
                        None if method == "full" else (full or {}).get("outputs"),
                        args.draft_tokens, args.goodput,
                    )  # fmt: skip
                except Exception as exc:  # OOM or a policy's limit: recorded, run goes on
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                    log(f"L={context} B={batch} {method}: FAILED {row['error']}")
                    rows.append(row)
                    write_report(rows, args)
                    if CUDA:
                        torch.cuda.empty_cache()
                    continue
                row.update(result)
                if method == "full":
                    full = {**result, "outputs": outputs}
                if full is not None and row.get("decode_tokens_per_s"):
                    row["speedup_vs_full"] = round(
                        row["decode_tokens_per_s"] / full["decode_tokens_per_s"], 3
                    )
                if full is not None and row.get("full_batch_tokens_per_s"):
                    row["full_batch_speedup"] = round(
                        row["full_batch_tokens_per_s"] / full["decode_tokens_per_s"], 3
                    )
                if row.get("kv_bytes"):
                    row["kv_MiB"] = round(row["kv_bytes"] / 2**20, 1)
                    if full is not None and full.get("kv_bytes"):
                        row["kv_ratio_vs_full"] = round(full["kv_bytes"] / row["kv_bytes"], 2)
                    if total_memory:
                        free = 0.9 * total_memory - model.weight_bytes()
                        row["max_batch_estimate"] = int(free // (row["kv_bytes"] / batch))
                if row.get("decode_peak_bytes"):
                    row["decode_peak_GiB"] = round(row["decode_peak_bytes"] / 2**30, 2)
                rows.append(row)
                write_report(rows, args)
                log(
                    f"L={context} B={batch} {method}: {row['ms_per_output_step']} ms/step "
                    f"x{row.get('speedup_vs_full')} kv {row.get('kv_MiB')} MiB "
                    f"tau {row.get('tau')} (min {row.get('tau_min')}) steps {row.get('steps')}"
                    f"/{row.get('ideal_steps')} same {row.get('identical_to_full_fraction')}"
                )
        if CUDA and not args.no_hf:
            row = {"context": context, "batch": args.hf_batch, "method": "hf_generate"}
            try:
                prompts = make_prompts(ids, args.hf_batch, context - args.new_tokens - 8)
                row.update(hf_row(args.model, prompts, min(args.new_tokens, 32)))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            rows.append(row)
            write_report(rows, args)
            log(f"L={context} HF: {row}")
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
