"""Micro-benchmark of decode attention over the quantized KV cache (the `quant` policy:
KIVI 2/4-bit keys per channel / values per token + ZipCache salient tokens in full
precision) on one GPU, Qwen2.5-0.5B shape by default (14 query heads, 2 KV heads of 64
dims, bf16 model): the Triton kernel (fastdecode.kv.triton_quant) in time and in achieved
bandwidth on the bytes it must read (packed codes + scales/zeros + salient flags + the
full-precision window), as a fraction of this card's measured copy bandwidth (target:
>= 70% at 32K context), beside the dense bf16 Triton decode kernel over the same context
(time, bandwidth, speedup) and the bytes ratio (the speedup a purely bandwidth-bound kernel
would get).

    python benchmarks/kv_quant.py --out DIR
        [--context 8192 16384 32768] [--batch 1 8 32] [--bits 2 4]
        [--heads 14 --kv-heads 2 --head-dim 64] [--group 64 --residual 128 --salient 0.02]
        [--repeats 50 --warmup 10] [--reference-max-batch 1]

Writes DIR/kv_quant.json and DIR/kv_quant.md (default DIR: $OUT, else benchmarks/results),
rewritten after every configuration; a configuration that fails (out of memory, ...) gets
its error in its row and the sweep goes on. Timing: CUDA events around one call (main
kernel + merge), L2 flushed before each (a 256 MB write) so every byte comes from HBM,
after `--warmup` calls; the median of `--repeats`. Copy bandwidth: a 2 GiB device copy,
bytes read + written, median of 20. One layer's cache is filled directly (random codes and
scales, every row at full context: the R..R+G-1 newest tokens and a `salient` fraction of
the prompt in full precision), so no model is needed. The kernel is checked against the
float64 PyTorch reference on row 0 of every configuration (`rel_err`).

For a CPU smoke run of the script itself: TRITON_INTERPRET=1 ... --device cpu --context 512.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from decode import measure_bandwidth  # noqa: E402

from fastdecode.kv.policies.quant import QuantPolicy  # noqa: E402
from fastdecode.kv.quant import (  # noqa: E402
    QuantKVCache,
    QuantLayer,
    QuantSpec,
    quant_attention_reference,
)
from fastdecode.kv.triton_decode import decode_attention  # noqa: E402
from fastdecode.kv.triton_quant import (  # noqa: E402
    bytes_per_token,
    launch_shape,
    quant_decode_attention,
    sm_count,
)

COLUMNS = [
    "context", "batch", "bits", "quant_us", "quant_GBps", "quant_pct_of_copy",
    "dense_us", "dense_GBps", "dense_pct_of_copy", "speedup_vs_dense", "bytes_ratio",
    "quant_MB", "bytes_per_token_head", "splits", "store_us", "store_torch_us",
    "torch_reference_us", "rel_err",
]  # fmt: skip


def fill(args, batch: int, ctx: int, bits: int, device) -> tuple[QuantKVCache, int]:
    """A one-layer cache whose every row holds `ctx` positions (random codes/scales)."""
    policy = QuantPolicy(
        1, bits=bits, group=args.group, residual=args.residual, salient=args.salient
    )
    cache = QuantKVCache(
        policy, 1, batch, args.kv_heads, ctx, ctx, args.head_dim, torch.bfloat16, device
    )
    lay, s = cache.layers[0], cache.spec
    for t in (lay.kq, lay.vq):
        t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, device=device))
    for t in (lay.ks, lay.vs):
        t.copy_(torch.rand(t.shape, device=device) * 0.5 + 0.05)
    for t in (lay.kz, lay.vz):
        t.copy_(torch.randn(t.shape, device=device))
    lay.fk.normal_()
    lay.fv.normal_()
    nq = (ctx - args.residual) // args.group * args.group
    lay.nq.fill_(nq)
    ring = torch.arange(nq, ctx, device=device, dtype=torch.int32)
    lay.fpos[:, :, (s.salient + ring % s.ring).long()] = ring
    count = min(s.salient, nq)
    if count:  # a random salient set among the quantized positions, its bits set
        heads = args.kv_heads
        chosen = torch.rand(batch, heads, nq, device=device).topk(count, -1).indices
        lay.fpos[:, :, :count] = chosen.to(torch.int32)
        flags = torch.zeros(batch, heads, s.slots, dtype=torch.uint8, device=device)
        flags.scatter_(-1, chosen, 1)
        weights = 2 ** torch.arange(8, device=device, dtype=torch.uint8)
        lay.sal.copy_((flags.view(batch, heads, -1, 8) * weights).sum(-1, dtype=torch.uint8))
    return cache, nq


def must_read(lay: QuantLayer, spec: QuantSpec, nq: int, q: torch.Tensor) -> int:
    """Bytes one decode call must read: per (row, KV head) the nq quantized tokens (codes,
    scales/zeros, salient bits), every fp slot's position tag and the valid fp entries'
    K and V; plus q and the output."""
    batch, heads, extra, head_dim = lay.fk.shape
    per_head = nq * bytes_per_token(spec, head_dim, lay.ks.element_size())
    valid = float((lay.fpos >= 0).sum()) / (batch * heads)
    per_head += extra * lay.fpos.element_size() + valid * 2 * head_dim * lay.fk.element_size()
    return int(batch * heads * per_head + 2 * q.numel() * q.element_size())


class Timer:
    """Median time of one call: CUDA events on the GPU (L2 flushed before each call, after
    a warm-up), perf_counter on the CPU (smoke runs)."""

    def __init__(self, device, repeats: int, warmup: int) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.repeats, self.warmup = repeats, warmup
        self.flush = (
            torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if self.cuda else None
        )

    def __call__(self, fn) -> float:
        """milliseconds (median)."""
        for _ in range(self.warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.repeats):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        events = []
        for _ in range(self.repeats):
            self.flush.zero_()  # evict L2: the call's bytes come from HBM
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)


def bench(args, batch: int, ctx: int, bits: int, bandwidth: float, timer: Timer) -> dict:
    device = args.device
    torch.manual_seed(0)
    row: dict = {"context": ctx, "batch": batch, "bits": bits}
    cache, nq = fill(args, batch, ctx, bits, device)
    lay, spec = cache.layers[0], cache.spec
    q = torch.randn(batch, args.heads, 1, args.head_dim, device=device, dtype=torch.bfloat16)
    positions = torch.full((batch,), ctx - 1, device=device, dtype=torch.int32)
    sms = sm_count(torch.device(device).index or 0) if timer.cuda else 1
    per_split, q_splits, _, f_splits = launch_shape(
        spec, batch, args.kv_heads, lay.fk.shape[2], args.head_dim, sms
    )
    row["splits"] = f"{q_splits}x{per_split * spec.tile}tok+{f_splits}fp"
    row["bytes_per_token_head"] = round(bytes_per_token(spec, args.head_dim), 2)
    quant_bytes = must_read(lay, spec, nq, q)
    row["quant_MB"] = round(quant_bytes / 1e6, 3)

    ref = quant_attention_reference(q[:1].double(), _row(lay), spec, positions[:1, None])
    out = quant_decode_attention(q, lay, spec, positions)[:1].double()
    row["rel_err"] = float(f"{float((out - ref).norm() / ref.norm()):.2e}")
    del ref, out

    ms = timer(lambda: quant_decode_attention(q, lay, spec, positions))
    row["quant_us"] = round(ms * 1e3, 2)
    row["quant_GBps"] = round(quant_bytes / ms / 1e6, 1)
    if bandwidth == bandwidth:  # not NaN
        row["quant_pct_of_copy"] = round(100 * quant_bytes / (ms / 1e3) / bandwidth, 1)

    try:  # a decode step's cache write (ring + flush check): Triton vs PyTorch
        k_new = torch.randn(batch, args.kv_heads, 1, args.head_dim, device=device)
        k_new = k_new.to(torch.bfloat16)
        end = positions + 1
        if timer.cuda:
            from fastdecode.kv.triton_quant import flush_quantized

            row["store_us"] = round(
                1e3 * timer(lambda: flush_quantized(lay, spec, end, k_new, k_new)), 2
            )
        pos2 = positions[:, None]

        def torch_store():
            cache._flush(lay, end)
            cache._write_ring(lay, k_new, k_new, pos2)

        row["store_torch_us"] = round(1e3 * timer(torch_store), 2)
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"store: {type(exc).__name__}: {exc}"[:300]
    try:
        dense_ms, dense_bytes = _dense(q, ctx, args.kv_heads, timer)
        row["dense_us"] = round(dense_ms * 1e3, 2)
        row["dense_GBps"] = round(dense_bytes / dense_ms / 1e6, 1)
        if bandwidth == bandwidth:
            row["dense_pct_of_copy"] = round(100 * dense_bytes / (dense_ms / 1e3) / bandwidth, 1)
        row["speedup_vs_dense"] = round(dense_ms / ms, 2)
        row["bytes_ratio"] = round(dense_bytes / quant_bytes, 2)
    except Exception as exc:  # noqa: BLE001 (keep the quant numbers)
        row["error"] = f"dense: {type(exc).__name__}: {exc}"[:300]
        _free()

    if batch <= args.reference_max_batch:  # dequantizes the whole cache: slow, memory-hungry
        try:
            pos2 = positions[:, None]
            ref_timer = Timer(device, max(3, args.repeats // 10), 1)
            ref_ms = ref_timer(lambda: quant_attention_reference(q, lay, spec, pos2))
            row["torch_reference_us"] = round(ref_ms * 1e3, 1)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"reference: {type(exc).__name__}: {exc}"[:300]
            _free()
    return row


def _dense(q: torch.Tensor, ctx: int, kv_heads: int, timer: Timer) -> tuple[float, int]:
    """The dense bf16 Triton decode kernel over the same context: (ms, bytes it reads)."""
    batch, _, _, head_dim = q.shape
    k = torch.randn(batch, kv_heads, ctx, head_dim, device=q.device, dtype=q.dtype)
    v = torch.randn_like(k)
    lengths = torch.full((batch,), ctx, device=q.device, dtype=torch.int32)
    ms = timer(lambda: decode_attention(q, k, v, lengths))
    return ms, 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()


def _row(lay: QuantLayer) -> QuantLayer:
    """Row 0 of every tensor (the float64 reference checks one row)."""
    return QuantLayer(*(t[:1] for t in lay.tensors()))


def _free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _meta(args, bandwidth: float) -> dict:
    extra = {
        "triton": triton.__version__,
        "measured_copy_bandwidth_GBps": round(bandwidth / 1e9, 1),
        "shape": {k: getattr(args, k) for k in ("heads", "kv_heads", "head_dim")},
        "options": {k: getattr(args, k) for k in ("group", "residual", "salient")},
        "timing": f"CUDA events, L2 flushed, {args.warmup} warm-up, median of {args.repeats}",
    }
    command = "python " + " ".join(sys.argv)
    try:
        from fastdecode.bench.report import meta

        return meta(command, torch.device(args.device), extra)
    except Exception:  # noqa: BLE001 (a missing optional package must not lose the run)
        import datetime

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return {"gpu": gpu, "torch": torch.__version__, "date": date, "command": command,
                "commit": os.environ.get("FASTDECODE_COMMIT", "unknown"), **extra}  # fmt: skip


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_quant.json").write_text(json.dumps(report, indent=1) + "\n")
    m = report["meta"]
    shape = m["shape"]
    lines = [
        f"# Quantized-KV decode attention ({m['gpu']})",
        "",
        f"torch {m['torch']}, triton {m['triton']}, {m['date']}, commit {m['commit']}  ",
        f"command: `{m['command']}`  ",
        f"measured copy bandwidth (read + write): {m['measured_copy_bandwidth_GBps']} GB/s; "
        f"{m['timing']}  ",
        f"shape: {shape['heads']} query heads, {shape['kv_heads']} KV heads x "
        f"{shape['head_dim']}; options {m['options']}",
        "",
        "`quant_GBps` = bytes the kernel must read (`quant_MB`: packed codes, scales/zeros,",
        "salient flags, the full-precision window; `bytes_per_token_head` for one quantized",
        "token of one KV head) / median time; `quant_pct_of_copy` = that / the copy bandwidth",
        "(target >= 70 at 32K). `dense_*`: the bf16 Triton decode kernel over the same",
        "context. `bytes_ratio` = dense bytes / quant bytes: the speedup a purely",
        "bandwidth-bound kernel would get. `splits`: quantized slices x tokens each + fp",
        "slices per (row, KV head). `store_us`: a decode step's cache write for one layer",
        "(ring write + flush check, one Triton launch) vs `store_torch_us` (the PyTorch",
        "path, ~110 small kernels). `rel_err`: row 0 against the float64 reference.",
        "",
        "| " + " | ".join(COLUMNS + ["error"]) + " |",
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for row in report["rows"]:
        cells = [str(row.get(c, "")) for c in COLUMNS + ["error"]]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "kv_quant.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--residual", type=int, default=128)
    parser.add_argument("--salient", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reference-max-batch", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(os.environ.get("OUT") or HERE / "results")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("kv_quant.py: no CUDA device (for a CPU smoke run: TRITON_INTERPRET=1 "
                 "... --device cpu --context 512)")  # fmt: skip
    bandwidth = measure_bandwidth(device=args.device)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)", flush=True)
    report = {"meta": _meta(args, bandwidth), "rows": []}
    timer = Timer(args.device, args.repeats, args.warmup)
    for ctx in args.context:
        for bits in args.bits:
            for batch in args.batch:
                try:
                    row = bench(args, batch, ctx, bits, bandwidth, timer)
                except Exception as exc:  # noqa: BLE001 (record it, go on)
                    row = {"context": ctx, "batch": batch, "bits": bits,
                           "error": f"{type(exc).__name__}: {exc}"[:300]}  # fmt: skip
                    traceback.print_exc()
                _free()
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
                write(report, out)
    print(f"wrote {out / 'kv_quant.json'} and {out / 'kv_quant.md'}")


if __name__ == "__main__":
    main()
