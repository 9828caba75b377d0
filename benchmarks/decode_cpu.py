"""CPU decode benchmark: our engine vs HF transformers `generate`, same prompts, same process.

The engine issue's CPU target: "CPU (the 2-core machine), SmolLM2-135M: not slower than HF
generate". Weights are read once from the GGUF and dequantized to float32; our `Transformer`
and the HF model are both built from that one state dict, on the CPU, with the same torch
thread count. For each prompt length and batch size: a warm-up of each, then `--repeats`
runs of each (ours and HF alternate, so drift hits both), greedy, EOS ignored; medians.

Columns (the same report format as decode.py):
- tokens_per_s: batch * new_tokens / wall time of the whole call (prefill included);
- ms_per_token: one decode step (prefill excluded), for both methods;
- quality.ttft_ms: until the first token of every row exists (prefill); for HF, the first
  call of a pass-through logits processor (it runs right after the prefill forward);
- quality greedy agreement vs HF: prefix (first divergence / n, as decode.py) and per-token.

    FASTDECODE_HOME=/tmp/fdhome python benchmarks/decode_cpu.py
    FASTDECODE_HOME=/tmp/fdhome python benchmarks/decode_cpu.py --profile  # + op breakdown
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode import ROOT, hf_greedy, log, make_prompts, write_report  # noqa: E402

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

DEVICE = torch.device("cpu")
DTYPE = torch.float32


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def measure_bandwidth(mib: int = 256, repeats: int = 10) -> float:
    """Host memory copy rate in bytes/s (bytes read plus bytes written), torch threads."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


class CpuMonitor:
    """CPU time the rest of the machine used (other processes, hypervisor steal) meanwhile.

    A 2-core box shared with a test run halves our threads' CPU and makes OpenMP barriers
    spin: such rows are not a measurement of the engine. Reads /proc/stat and os.times().
    """

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.cpus = os.cpu_count() or 1
        self.start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except (OSError, ValueError):
            fields = [0] * 8
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
        own = os.times()
        busy = (user + nice + system + irq + softirq) / self.tick
        return time.perf_counter(), busy, steal / self.tick, own.user + own.system

    def reset(self) -> None:
        self.start = self._read()

    def read(self) -> dict:
        """Fractions of all CPUs' time since the last reset: others' busy time, steal."""
        now = self._read()
        wall = max(now[0] - self.start[0], 1e-9) * self.cpus
        others = (now[1] - self.start[1]) - (now[3] - self.start[3])
        return {
            "other_cpu_busy": round(max(others, 0.0) / wall, 3),
            "steal": round((now[2] - self.start[2]) / wall, 3),
        }


def wait_until_idle(max_wait_s: float, limit: float = 0.1, window_s: float = 2.0) -> dict:
    """Sleep until other processes use under `limit` of the CPUs over `window_s`."""
    monitor = CpuMonitor()
    start = time.perf_counter()
    logged = -1
    while True:
        monitor.reset()
        time.sleep(window_s)
        load = monitor.read()
        waited = time.perf_counter() - start
        if load["other_cpu_busy"] < limit or waited > max_wait_s:
            return {**load, "waited_s": round(waited)}
        if int(waited // 30) != logged:
            logged = int(waited // 30)
            log(f"machine busy ({load}); waiting")


def run_ours(runner: ModelRunner, tokenizer, prompts, new_tokens: int, check_every: int):
    """One engine call as `LLM.generate` makes it; (timing, wall seconds, token lists)."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    states = [RequestState(params, frozenset(), tokenizer) for _ in prompts]
    timing = BatchTiming()
    start = time.perf_counter()
    for _ in run_batch(runner, prompts, states, timing, check_every=check_every):
        pass
    wall = time.perf_counter() - start
    return timing, wall, [s.token_ids for s in states]


class _StepClock:
    """A pass-through logits processor that timestamps every generation step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_hf(hf_model, prompts, new_tokens: int):
    """One HF `generate` call; (wall s, ttft s, decode step s, token lists)."""
    from transformers import LogitsProcessorList

    ids = torch.tensor(prompts)
    clock = _StepClock()
    start = time.perf_counter()
    tokens = hf_greedy(hf_model, ids, new_tokens, LogitsProcessorList([clock]))
    wall = time.perf_counter() - start
    assert all(len(t) == new_tokens for t in tokens), "HF stopped early"
    assert len(clock.times) == new_tokens, len(clock.times)
    ttft = clock.times[0] - start
    step = (clock.times[-1] - clock.times[0]) / (new_tokens - 1)
    return wall, ttft, step, tokens


def agreement(ours: list[list[int]], hf: list[list[int]], n: int) -> tuple[float, float]:
    """(prefix agreement as in decode.py, per-token agreement), averaged over rows."""
    prefix = statistics.mean(
        next((i for i, (a, b) in enumerate(zip(o[:n], h, strict=False)) if a != b), n) / n
        for o, h in zip(ours, hf, strict=True)
    )
    per_token = statistics.mean(
        sum(a == b for a, b in zip(o[:n], h, strict=False)) / n
        for o, h in zip(ours, hf, strict=True)
    )
    return prefix, per_token


def load_models(spec: str):
    from transformers import AutoModelForCausalLM

    path = resolve(spec, progress=False)
    log(f"{spec}: loading {path}")
    hf_config = load_gguf_config(path)
    cfg = ModelConfig.from_hf(hf_config)
    state = load_gguf_tensors(path, cfg, DTYPE)
    tokenizer = load_gguf_tokenizer(path)
    model = Transformer.from_hf_state_dict(cfg, state, DTYPE, DEVICE)
    runner = ModelRunner(model, cuda_graphs=False, compile=False)
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=DTYPE)
    missing, _ = hf_model.load_state_dict(state, strict=False)
    assert all("lm_head" in m for m in missing), missing
    if cfg.tie_word_embeddings:
        hf_model.tie_weights()
    hf_model = hf_model.to(DEVICE).eval()
    return cfg, tokenizer, runner, hf_model


def profile_ops(fn, steps: int, top: int = 12) -> dict:
    """Self CPU time per op (ms per step) over `steps` calls of fn, the largest `top`."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = time.perf_counter() - start
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    return {
        "ms_per_step_wall_profiled": round(wall / steps * 1e3, 3),
        "ms_per_step_self_cpu": round(total, 3),
        "ops_per_step": round(sum(e.count for e in events) / steps, 1),
        "top_ops_ms_per_step": {
            e.key: [round(e.self_cpu_time_total / steps / 1e3, 3), round(e.count / steps, 1)]
            for e in events[:top]
        },
    }


def profile_decode(runner: ModelRunner, hf_model, prompts, steps: int = 10) -> dict:
    """Op breakdown of one decode step, ours vs HF's model forward, at the prompt's length."""
    batch, length = len(prompts), len(prompts[0])
    runner.allocate(batch, length + steps + 2)
    runner.prefill(prompts)
    tokens = torch.tensor([p[-1] for p in prompts])
    positions = torch.full((batch,), length)
    ours = profile_ops(lambda: runner.decode(tokens, positions), steps)

    ids = torch.tensor(prompts)
    with torch.inference_mode():
        cache = hf_model(ids, use_cache=True).cache
        next_ids = ids[:, -1:]

        def hf_step() -> None:
            # crop back each time so every profiled step sees the same context length
            hf_model(next_ids, cache=cache, use_cache=True)
            cache.crop(-1)

        hf = profile_ops(hf_step, steps)
    return {"ours": ours, "hf_forward": hf}


def engine_provenance() -> dict:
    """Which engine code this process imported, read at start-up (the tree may change while
    a long run waits for an idle machine). FASTDECODE_COMMIT names the commit of a snapshot
    (git archive) that has no .git; otherwise git is asked, with any uncommitted edits."""
    import fastdecode

    info = {"engine_path": str(Path(fastdecode.__file__).parent)}

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    info["commit"] = os.environ.get("FASTDECODE_COMMIT") or git("rev-parse", "--short", "HEAD")
    status = git("status", "--porcelain", "--", "fastdecode")
    info["uncommitted_engine_files"] = None if status is None else status.splitlines()
    return info


def meta(args, bandwidth: float, threads: int, hf_attn: str) -> dict:
    import transformers

    return {
        "gpu": f"CPU: {cpu_name()}, {threads} threads",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "commit": args.provenance["commit"] or "unknown",
        "engine": args.provenance,
        "measured_bandwidth_GBps": round(bandwidth / 1e9, 1),
        "hf_new_tokens": args.new_tokens,
        "dtype": "float32",
        "torch_num_threads": threads,
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "check_every": args.check_every,
        "max_other_cpu_load_per_pair": args.max_other_load,
        "hf_attn_implementation": hf_attn,
        "definitions": (
            "tokens_per_s = batch*new_tokens / wall time of the call incl. prefill; "
            "ms_per_token = one decode step excl. prefill (both methods); medians of repeats"
        ),
    }


def bench(args) -> list[dict]:
    cfg, tokenizer, runner, hf_model = load_models(args.model)
    args.hf_attn = getattr(hf_model.config, "_attn_implementation", None)
    rows = []
    n = args.new_tokens
    for length in args.prompt_tokens:
        for batch in args.batches:
            prompts = make_prompts(tokenizer, batch, length)
            assert all(len(p) == length for p in prompts)
            tag = f"prompt {length} batch {batch}"
            idle = wait_until_idle(args.max_wait_idle)
            args.bandwidths.append(measure_bandwidth())  # max over idle moments -> meta
            log(f"{tag}: warm-up (machine before: {idle})")
            run_ours(runner, tokenizer, prompts, 8, args.check_every)
            run_hf(hf_model, prompts, 8)
            ours_runs, hf_runs, loads, discarded = [], [], [], 0
            while len(ours_runs) < args.repeats:
                monitor = CpuMonitor()
                ours = run_ours(runner, tokenizer, prompts, n, args.check_every)
                hf = run_hf(hf_model, prompts, n)
                load = monitor.read()
                r = len(ours_runs)
                log(f"{tag} run {r}: ours {ours[1]:.2f} s, HF {hf[0]:.2f} s, load {load}")
                busy = load["other_cpu_busy"] > args.max_other_load
                if busy and discarded < args.max_discards:
                    discarded += 1
                    log(f"{tag} run {r}: other processes were busy; discarding the pair")
                    wait_until_idle(args.max_wait_idle)
                    continue
                ours_runs.append(ours)
                hf_runs.append(hf)
                loads.append(load)
            load = {
                "other_cpu_busy_max": max(x["other_cpu_busy"] for x in loads),
                "steal_max": max(x["steal"] for x in loads),
                "discarded_pairs": discarded,
            }
            ours_wall = statistics.median(w for _, w, _ in ours_runs)
            ours_step = statistics.median(t.decode_s / (t.steps - 1) for t, _, _ in ours_runs)
            ours_ttft = statistics.median(t.prefill_s for t, _, _ in ours_runs)
            hf_wall = statistics.median(r[0] for r in hf_runs)
            hf_ttft = statistics.median(r[1] for r in hf_runs)
            hf_step = statistics.median(r[2] for r in hf_runs)
            ours_tps, hf_tps = batch * n / ours_wall, batch * n / hf_wall
            prefix, per_token = agreement(ours_runs[-1][2], hf_runs[-1][3], n)
            base = {
                "model": args.model,
                "workload": f"prompt{length}-gen{n}",
                "batch": batch,
                "context_tokens": length,
                "new_tokens": n,
                "roofline_fraction": None,
                "tau": None,
            }
            ours_row = {
                **base,
                "method": "plain",
                "tokens_per_s": round(ours_tps, 2),
                "ms_per_token": round(ours_step * 1e3, 2),
                "speedup_vs_plain": 1.0,
                "speedup_vs_hf": round(ours_tps / hf_tps, 3),
                "quality": {
                    "ttft_ms": round(ours_ttft * 1e3, 1),
                    "decode_tokens_per_s": round(batch / ours_step, 2),
                    "decode_speedup_vs_hf": round(hf_step / ours_step, 3),
                    "greedy_prefix_agreement_vs_hf": round(prefix, 3),
                    "greedy_token_agreement_vs_hf": round(per_token, 3),
                    "machine_load_during_row": load,
                },
            }
            hf_row = {
                **base,
                "method": "hf",
                "tokens_per_s": round(hf_tps, 2),
                "ms_per_token": round(hf_step * 1e3, 2),
                "speedup_vs_plain": round(hf_tps / ours_tps, 3),
                "speedup_vs_hf": 1.0,
                "quality": {
                    "ttft_ms": round(hf_ttft * 1e3, 1),
                    "decode_tokens_per_s": round(batch / hf_step, 2),
                },
            }
            log(
                f"{tag}: ours {ours_tps:.1f} tok/s ({ours_step * 1e3:.1f} ms/step, "
                f"TTFT {ours_ttft * 1e3:.0f} ms), HF {hf_tps:.1f} tok/s "
                f"({hf_step * 1e3:.1f} ms/step, TTFT {hf_ttft * 1e3:.0f} ms), "
                f"ours/HF {ours_tps / hf_tps:.3f}, agreement {prefix:.3f}/{per_token:.3f}"
            )
            if args.profile:
                ours_row["quality"]["profile"] = profile_decode(runner, hf_model, prompts)
                log(f"{tag} profile: {ours_row['quality']['profile']}")
            rows += [ours_row, hf_row]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--check-every", type=int, default=1, help="host check interval (LLM uses 1 on CPU)"
    )
    parser.add_argument(
        "--max-wait-idle", type=float, default=900, help="s to wait for other CPU load to end"
    )
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.05,
        help="discard an ours+HF pair when other processes used more of the CPUs than this",
    )
    parser.add_argument("--max-discards", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="per-op decode-step breakdown")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="decode_cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    args.provenance = engine_provenance()
    log(f"engine: {args.provenance}")
    bandwidth = measure_bandwidth()
    log(f"{cpu_name()}, {threads} torch threads, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    args.bandwidths = [bandwidth]
    rows = bench(args)
    bandwidth = max(args.bandwidths)
    write_report(
        {"meta": meta(args, bandwidth, threads, args.hf_attn), "rows": rows}, args.out, args.name
    )
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
