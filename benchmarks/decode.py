"""Decode-speed benchmark: our engine vs HF transformers `generate`, same prompts, same card.

For each model and batch size: prefill a 512-token prompt per row, then decode 256 tokens
(EOS ignored, greedy). Reports tok/s, ms per decode step, and the roofline fraction:
(weight bytes + KV bytes read per step) / step time / device bandwidth measured in this run.
With --profile, a per-layer kernel-time breakdown of one batch-1 decode step is added.

    python benchmarks/decode.py --models smollm2-135m-instruct --out benchmarks/results
    python benchmarks/decode.py --merge OUT/decode-*.json --out benchmarks/results

Models are registry names (fetched into $FASTDECODE_HOME) or .gguf paths.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastdecode.bench.report import header_lines  # noqa: E402
from fastdecode.engine.generate import BatchTiming, run_batch  # noqa: E402
from fastdecode.engine.runner import ModelRunner  # noqa: E402
from fastdecode.engine.stopping import RequestState  # noqa: E402
from fastdecode.model.config import ModelConfig  # noqa: E402
from fastdecode.model.gguf_loader import (  # noqa: E402
    load_gguf_config,
    load_gguf_tensors,
    load_gguf_tokenizer,
)
from fastdecode.model.load import resolve  # noqa: E402
from fastdecode.model.transformer import Transformer  # noqa: E402
from fastdecode.params import SamplingParams  # noqa: E402

TEXT = ROOT / "benchmarks" / "data" / "paulgraham_sample.txt"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure_bandwidth(gib: float = 2.0, repeats: int = 20, device="cuda") -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (NaN
    without a GPU)."""
    if torch.device(device).type != "cuda":
        return float("nan")
    n = int(gib * 2**30) // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * n * 2 / statistics.median(times)


def make_prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    """`batch` different windows of `length` tokens from the essay text."""
    ids = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    stride = max(1, (len(ids) - length) // max(1, batch))
    return [ids[i * stride : i * stride + length] for i in range(batch)]


def run_ours(runner: ModelRunner, tokenizer, prompts, new_tokens: int) -> tuple[BatchTiming, list]:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    states = [RequestState(params, frozenset(), tokenizer) for _ in prompts]
    timing = BatchTiming()
    for _ in run_batch(runner, prompts, states, timing, check_every=64):
        pass
    torch.cuda.synchronize()
    return timing, [s.token_ids for s in states]


def hf_greedy(hf_model, ids: torch.Tensor, new_tokens: int, logits_processor=None) -> list:
    """HF `generate`, greedy, exactly `new_tokens` per row (EOS ignored): new token lists."""
    out = hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
        logits_processor=logits_processor,
    )
    return out[:, ids.shape[1] :].tolist()


def run_hf(hf_model, prompts, new_tokens: int) -> tuple[float, list]:
    ids = torch.tensor(prompts, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = hf_greedy(hf_model, ids, new_tokens)
    torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * elem


def profile_step(runner: ModelRunner, prompts, num_layers: int) -> dict:
    """Kernel time of one CUDA-graphed decode step, by kind, in µs per layer."""
    from torch.profiler import ProfilerActivity, profile

    runner.allocate(len(prompts), len(prompts[0]) + 64)
    tokens = torch.zeros(len(prompts), dtype=torch.long, device="cuda")
    positions = torch.full((len(prompts),), len(prompts[0]), device="cuda")
    steps = 20
    runner.decode(tokens, positions)  # capture outside the profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.decode(tokens, positions)
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    count = 0
    for evt in prof.key_averages():
        if evt.device_type.name != "CUDA" and not getattr(evt, "device_time_total", 0):
            continue
        name = evt.key.lower()
        total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if total <= 0:
            continue
        if any(s in name for s in ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "splitk")):
            kind = "matmul"
        elif any(s in name for s in ("fmha", "attention", "flash", "softmax")):
            kind = "attention"
        elif "index" in name or "scatter" in name:
            kind = "kv_write"
        elif "triton" in name:
            kind = "fused_elementwise"
        else:
            kind = "other"
        kinds[kind] = kinds.get(kind, 0.0) + total
        count += evt.count
    per_step = {k: v / steps for k, v in kinds.items()}
    return {
        "us_per_layer": {k: round(v / num_layers, 2) for k, v in per_step.items()},
        "us_per_step_kernels": round(sum(per_step.values()), 1),
        "kernels_per_step": round(count / steps, 1),
        "kernels_per_layer": round(count / steps / num_layers, 1),
    }


def bench_model(spec: str, args) -> list[dict]:
    path = resolve(spec, progress=False)
    name = spec if not spec.endswith(".gguf") else Path(spec).stem
    log(f"{name}: loading {path}")
    hf_config = load_gguf_config(path)
    cfg = ModelConfig.from_hf(hf_config)
    dtype = torch.bfloat16
    state = load_gguf_tensors(path, cfg, dtype)
    tokenizer = load_gguf_tokenizer(path)
    model = Transformer.from_hf_state_dict(cfg, state, dtype, "cuda")
    runner = ModelRunner(model)
    hf_model = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        missing, _ = hf_model.load_state_dict(state, strict=False)
        assert all("lm_head" in m for m in missing), missing
        hf_model = hf_model.to("cuda").eval()
        if cfg.tie_word_embeddings:
            hf_model.tie_weights()
    del state
    weight_bytes = model.weight_bytes()
    kv_token = kv_bytes_per_token(cfg, dtype)
    rows = []
    for batch in args.batches:
        prompts = make_prompts(tokenizer, batch, args.prompt_tokens)
        log(f"{name} batch {batch}: warm-up (compile + graph capture)")
        run_ours(runner, tokenizer, prompts, 16)
        timings, outputs = [], None
        for _ in range(args.repeats):
            timing, outputs = run_ours(runner, tokenizer, prompts, args.new_tokens)
            timings.append(timing)
        step_s = statistics.median(t.decode_s / (t.steps - 1) for t in timings)
        total_s = statistics.median(t.prefill_s + t.decode_s for t in timings)
        ttft_s = statistics.median(t.prefill_s for t in timings)
        mean_context = args.prompt_tokens + (args.new_tokens - 1) / 2
        step_bytes = weight_bytes + batch * mean_context * kv_token
        ours_tps = batch * args.new_tokens / total_s
        row = {
            "model": name,
            "workload": f"prompt{args.prompt_tokens}-gen{args.new_tokens}",
            "method": "plain",
            "batch": batch,
            "context_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "tokens_per_s": round(ours_tps, 1),
            "ms_per_token": round(step_s * 1e3, 3),
            "speedup_vs_plain": 1.0,
            "speedup_vs_hf": None,
            "roofline_fraction": round(step_bytes / step_s / args.bandwidth, 3),
            "tau": None,
            "quality": {
                "ttft_ms": round(ttft_s * 1e3, 2),
                "decode_tokens_per_s": round(batch / step_s, 1),
            },
        }
        log(f"{name} batch {batch}: ours {ours_tps:.1f} tok/s, {step_s * 1e3:.3f} ms/step")
        rows.append(row)
        if hf_model is not None and batch in args.hf_batches:
            run_hf(hf_model, prompts[:1], 4)  # warm-up
            hf_s, hf_out = run_hf(hf_model, prompts, args.hf_new_tokens)
            hf_tps = batch * args.hf_new_tokens / hf_s
            n = args.hf_new_tokens
            agree = statistics.mean(
                next((i for i, (a, b) in enumerate(zip(o[:n], h, strict=False)) if a != b), n) / n
                for o, h in zip(outputs, hf_out, strict=True)
            )
            row["speedup_vs_hf"] = round(ours_tps / hf_tps, 1)
            row["quality"]["greedy_prefix_agreement_vs_hf"] = round(agree, 3)
            rows.append(
                {
                    **row,
                    "method": "hf",
                    "new_tokens": args.hf_new_tokens,
                    "tokens_per_s": round(hf_tps, 1),
                    "ms_per_token": round(hf_s / args.hf_new_tokens * 1e3, 3),
                    "speedup_vs_plain": round(hf_tps / ours_tps, 4),
                    "speedup_vs_hf": 1.0,
                    "roofline_fraction": None,
                    "quality": {},
                }
            )
            log(f"{name} batch {batch}: HF {hf_tps:.1f} tok/s ({row['speedup_vs_hf']}x slower)")
    if args.profile:
        prompts = make_prompts(tokenizer, 1, args.prompt_tokens)
        breakdown = profile_step(runner, prompts, cfg.num_layers)
        log(f"{name} batch 1 profile: {breakdown}")
        for row in rows:
            if row["batch"] == 1 and row["method"] == "plain":
                row["quality"]["profile"] = breakdown
    return rows


def meta(args, bandwidth: float) -> dict:
    import transformers

    commit = os.environ.get("FASTDECODE_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "commit": commit,
        "measured_bandwidth_GBps": round(bandwidth / 1e9, 1),
        "hf_new_tokens": args.hf_new_tokens if args else None,
    }


COLUMNS = [
    "model",
    "method",
    "batch",
    "context_tokens",
    "new_tokens",
    "tokens_per_s",
    "ms_per_token",
    "speedup_vs_hf",
    "roofline_fraction",
]


def write_report(report: dict, out: Path, name: str = "decode") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    m = report["meta"]
    bandwidth = f"measured copy bandwidth {m['measured_bandwidth_GBps']} GB/s; "
    lines = [
        *header_lines("Decode benchmark", m, command_prefix=bandwidth),
        "",
        "| " + " | ".join(COLUMNS) + " | TTFT ms |",
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for row in report["rows"]:
        cells = ["" if row.get(c) is None else str(row[c]) for c in COLUMNS]
        cells.append(str(row["quality"].get("ttft_ms", "")))
        lines.append("| " + " | ".join(cells) + " |")
    profiles = [
        (r["model"], r["quality"]["profile"]) for r in report["rows"] if "profile" in r["quality"]
    ]
    if profiles:
        lines += ["", "## Where a batch-1 decode step goes (kernel µs per layer)", ""]
        for model, p in profiles:
            lines.append(f"- {model}: {p}")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def summary_table(report: dict) -> str:
    """The README's table: our rows beside HF's, one line per model and batch."""
    hf = {(r["model"], r["batch"]): r for r in report["rows"] if r["method"] == "hf"}
    lines = [
        "| model | batch | tok/s (ours) | ms/step | HF tok/s | × HF | roofline |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["method"] != "plain":
            continue
        h = hf.get((r["model"], r["batch"]), {})
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['tokens_per_s']:.0f} | {r['ms_per_token']:.2f} "
            f"| {h.get('tokens_per_s', '')} | {r['speedup_vs_hf'] or ''} "
            f"| {r['roofline_fraction']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--hf-batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--hf-new-tokens", type=int, default=64, help="HF is slow: fewer tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--profile", action="store_true", help="per-layer kernel breakdown")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="decode")
    parser.add_argument("--merge", nargs="+", type=Path, help="merge partial reports and exit")
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        merged = {"meta": parts[0]["meta"], "rows": [r for p in parts for r in p["rows"]]}
        merged["meta"]["command"] = " ; ".join(p["meta"]["command"] for p in parts)
        write_report(merged, args.out, args.name)
        print(summary_table(merged))
        return
    if not torch.cuda.is_available():
        sys.exit("error: the decode benchmark needs a CUDA GPU")
    args.bandwidth = measure_bandwidth()
    log(f"measured bandwidth {args.bandwidth / 1e9:.0f} GB/s")
    rows = []
    for spec in args.models:
        rows += bench_model(spec, args)
        write_report({"meta": meta(args, args.bandwidth), "rows": rows}, args.out, args.name)
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
