"""Micro-benchmark of decode attention over the quantized KV cache (the `quant` policy,
KIVI 2/4-bit + ZipCache salient tokens) on the GPU, Qwen2.5-0.5B shape (14 query heads,
2 KV heads of 64 dims, bf16 model): the Triton kernel that dequantizes in registers, in
time and in GB/s of the bytes it must read, as a fraction of this card's measured copy
bandwidth (issue 4's target: >= 70% at 32K context), beside the dense bf16 Triton decode
kernel over the same context and the PyTorch reference (dequantize + SDPA).

    python benchmarks/kv_quant.py [--context 8192 32768] [--batch 1 4 16 32] [--bits 2 4]
                                  [--out DIR]     (default: $OUT, else benchmarks/results)

Writes kv_quant.json and kv_quant.md (GPU, torch/triton versions, date, command, commit).
One layer's cache is filled directly (random codes and scales, every row at full context:
R..R+G-1 recent tokens and a 2% salient set in full precision), so no model is needed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from decode import measure_bandwidth  # noqa: E402

from fastdecode.bench.report import meta  # noqa: E402
from fastdecode.kv.policies.quant import QuantPolicy  # noqa: E402
from fastdecode.kv.quant import (  # noqa: E402
    QuantKVCache,
    QuantLayer,
    QuantSpec,
    quant_attention_reference,
)
from fastdecode.kv.triton_decode import decode_attention  # noqa: E402
from fastdecode.kv.triton_quant import quant_decode_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64
COLUMNS = [
    "context", "batch", "bits", "quant_us", "quant_GBps", "bandwidth_fraction",
    "dense_us", "dense_GBps", "speedup_vs_dense", "bytes_ratio_vs_dense", "torch_reference_us",
    "rel_err",
]  # fmt: skip


def fill(batch: int, ctx: int, bits: int, group: int, residual: int, salient: float):
    """A one-layer cache whose every row holds `ctx` positions (random codes/scales)."""
    policy = QuantPolicy(1, bits=bits, group=group, residual=residual, salient=salient)
    cache = QuantKVCache(policy, 1, batch, KV_HEADS, ctx, ctx, HEAD_DIM, torch.bfloat16, "cuda")
    lay, s = cache.layers[0], cache.spec
    for t in (lay.kq, lay.vq):
        t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, device="cuda"))
    for t in (lay.ks, lay.vs):
        t.copy_(torch.rand(t.shape, device="cuda") * 0.5 + 0.05)
    for t in (lay.kz, lay.vz):
        t.copy_(torch.randn(t.shape, device="cuda"))
    lay.fk.normal_()
    lay.fv.normal_()
    nq = (ctx - residual) // group * group
    lay.nq.fill_(nq)
    ring = torch.arange(nq, ctx, device="cuda", dtype=torch.int32)
    lay.fpos[:, :, (s.salient + ring % s.ring).long()] = ring
    if s.salient:  # a random salient set among the quantized positions, its bits set
        chosen = torch.rand(batch, KV_HEADS, nq, device="cuda").topk(s.salient, -1).indices
        lay.fpos[:, :, : s.salient] = chosen.to(torch.int32)
        flags = torch.zeros(batch, KV_HEADS, s.slots, dtype=torch.uint8, device="cuda")
        flags.scatter_(-1, chosen, 1)
        weights = 2 ** torch.arange(8, device="cuda", dtype=torch.uint8)
        lay.sal.copy_((flags.view(batch, KV_HEADS, -1, 8) * weights).sum(-1, dtype=torch.uint8))
    return lay, s, nq


def must_read(lay: QuantLayer, spec: QuantSpec, nq: int, q: torch.Tensor) -> int:
    """Bytes one decode call reads: codes and scales of the nq quantized positions, salient
    bits, every fp slot's position tag, the valid fp entries' K/V, q and the output."""
    batch, heads = lay.fk.shape[:2]
    meta = lay.ks.element_size()
    packed = lay.kq.shape[-1]
    per_head = nq * 2 * packed  # key and value codes
    per_head += nq // spec.group * HEAD_DIM * 2 * meta  # key scale + zero per channel
    per_head += nq * (HEAD_DIM // spec.vgroup) * 2 * meta  # value scale + zero per token
    per_head += nq // 8 + lay.fpos.shape[-1] * 4
    valid = int((lay.fpos[0, 0] >= 0).sum())
    per_head += valid * 2 * HEAD_DIM * lay.fk.element_size()
    return batch * heads * per_head + 2 * q.numel() * q.element_size()


def bench(batch: int, ctx: int, bits: int, args, bandwidth: float) -> dict:
    torch.manual_seed(0)
    lay, spec, nq = fill(batch, ctx, bits, args.group, args.residual, args.salient)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    positions = torch.full((batch,), ctx - 1, device="cuda", dtype=torch.int32)
    quant_bytes = must_read(lay, spec, nq, q)
    ref = quant_attention_reference(q[:1].double(), _row(lay), spec, positions[:1, None])
    out = quant_decode_attention(q, lay, spec, positions)[:1].double()
    row = {"context": ctx, "batch": batch, "bits": bits, "rel_err": float(_rel(out, ref))}
    ms = do_bench(lambda: quant_decode_attention(q, lay, spec, positions))
    row["quant_us"] = round(ms * 1e3, 1)
    row["quant_GBps"] = round(quant_bytes / ms / 1e6, 1)
    row["bandwidth_fraction"] = round(quant_bytes / (ms / 1e3) / bandwidth, 3)
    dense_ms, dense_bytes = _dense(q, ctx)
    row["dense_us"] = round(dense_ms * 1e3, 1)
    row["dense_GBps"] = round(dense_bytes / dense_ms / 1e6, 1)
    row["speedup_vs_dense"] = round(dense_ms / ms, 2)
    row["bytes_ratio_vs_dense"] = round(dense_bytes / quant_bytes, 2)
    if batch <= args.reference_max_batch:  # dequantizes the whole cache: memory-hungry
        pos2 = positions[:, None]
        ref_ms = do_bench(lambda: quant_attention_reference(q, lay, spec, pos2))
        row["torch_reference_us"] = round(ref_ms * 1e3, 1)
    return row


def _dense(q: torch.Tensor, ctx: int) -> tuple[float, int]:
    """The dense bf16 Triton decode kernel over the same context: (ms, bytes it reads)."""
    k = torch.randn(q.shape[0], KV_HEADS, ctx, HEAD_DIM, device="cuda", dtype=q.dtype)
    v = torch.randn_like(k)
    lengths = torch.full((q.shape[0],), ctx, device="cuda")
    return do_bench(lambda: decode_attention(q, k, v, lengths)), 2 * k.numel() * k.element_size()


def _row(lay: QuantLayer) -> QuantLayer:
    """Row 0 of every tensor (the float64 reference checks one row)."""
    return QuantLayer(*(t[:1] for t in lay.tensors()))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (out - ref).norm() / ref.norm()


def write(report: dict, out: Path) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_quant.json").write_text(json.dumps(report, indent=1) + "\n")
    m = report["meta"]
    lines = [
        f"# Quantized-KV decode attention ({m['gpu']})",
        "",
        f"torch {m['torch']}, triton {m['triton']}, {m['date']}, commit {m['commit']}",
        f"measured copy bandwidth {m['measured_bandwidth_GBps']} GB/s; command: `{m['command']}`",
        f"shape: {HEADS} query heads, {KV_HEADS} KV heads x {HEAD_DIM}; {m['options']}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in report["rows"]:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |")
    (out / "kv_quant.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--residual", type=int, default=128)
    parser.add_argument("--salient", type=float, default=0.02)
    parser.add_argument("--reference-max-batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    default = os.environ.get("OUT") or HERE / "results"
    out = args.out or Path(default)
    bandwidth = measure_bandwidth()
    options = {k: getattr(args, k) for k in ("group", "residual", "salient")}
    extra = {
        "triton": triton.__version__,
        "measured_bandwidth_GBps": round(bandwidth / 1e9, 1),
        "options": options,
    }
    report = {"meta": meta("python " + " ".join(sys.argv), "cuda", extra), "rows": []}
    for ctx in args.context:
        for bits in args.bits:
            for batch in args.batch:
                row = bench(batch, ctx, bits, args, bandwidth)
                print(row, flush=True)
                report["rows"].append(row)
                torch.cuda.empty_cache()
    write(report, out)
    print(f"wrote {out / 'kv_quant.json'} and {out / 'kv_quant.md'}")


if __name__ == "__main__":
    main()
