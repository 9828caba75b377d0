"""Micro-benchmark of the tree-verify attention kernel on the GPU (Qwen2.5-0.5B shape: 14
query heads, 2 KV heads of 64 dims, bf16): T queries per row (a verify step's root + draft
chain) over a long prefix, against the single-query decode kernel over the same prefix, in
time and in GB/s of the K/V bytes both must read. A verify step should cost about one
decode step's attention (the prefix is read once per KV head either way); TriForce's verify
at 32K x 32 looked several times slower in a profile, which this isolates.

    python benchmarks/kv_tree.py [--context 32768] [--batch 1 16 32] [--widths 5 17] [--out DIR]

Also checks the kernel against masked SDPA at that size. Writes DIR/NAME.json + NAME.md
(default benchmarks/results/kv_tree).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastdecode.bench.report import write_table_report  # noqa: E402
from fastdecode.kv.triton_decode import decode_attention  # noqa: E402
from fastdecode.kv.triton_tree import tree_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64
DEVICE, DTYPE = "cuda", torch.bfloat16


def reference(q, k, v, prefix: int, local: torch.Tensor) -> torch.Tensor:
    """Masked SDPA in float64 over prefix + the chain's own slots (row 0 only: size)."""
    length = q.shape[2]
    visible = torch.zeros(length, prefix + local.shape[-1], dtype=torch.bool, device=q.device)
    visible[:, :prefix] = True
    visible[:, prefix:] = local[0]
    group = HEADS // KV_HEADS
    kk = k[:1, :, : prefix + local.shape[-1]].double().repeat_interleave(group, 1)
    vv = v[:1, :, : prefix + local.shape[-1]].double().repeat_interleave(group, 1)
    return torch.nn.functional.scaled_dot_product_attention(
        q[:1].double(), kk, vv, attn_mask=visible
    )


def bench(batch: int, ctx: int, width: int) -> dict:
    dev, dtype = DEVICE, DTYPE
    torch.manual_seed(0)
    k = torch.randn(batch, KV_HEADS, ctx, HEAD_DIM, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    q = torch.randn(batch, HEADS, width, HEAD_DIM, device=dev, dtype=dtype)
    prefix_len = ctx - width
    prefix = torch.full((batch,), prefix_len, device=dev)
    local = torch.ones(width, width, device=dev).tril().bool().expand(batch, -1, -1)
    out = tree_attention(q, k, v, prefix, local)
    ref = reference(q, k, v, prefix_len, local)
    err = float((out[:1].double() - ref).norm() / ref.norm())
    nbytes = 2 * batch * KV_HEADS * ctx * HEAD_DIM * k.element_size()
    tree_ms = do_bench(lambda: tree_attention(q, k, v, prefix, local))
    lengths = torch.full((batch,), ctx, device=dev)
    q1 = q[:, :, :1].contiguous()
    decode_ms = do_bench(lambda: decode_attention(q1, k, v, lengths))
    return {
        "batch": batch, "context": ctx, "width": width,
        "tree_us": round(tree_ms * 1e3, 1), "tree_GBps": round(nbytes / tree_ms / 1e6, 1),
        "decode_us": round(decode_ms * 1e3, 1),
        "decode_GBps": round(nbytes / decode_ms / 1e6, 1),
        "tree_over_decode": round(tree_ms / decode_ms, 2), "rel_err": round(err, 5),
    }  # fmt: skip


COLUMNS = [
    "batch", "context", "width", "tree_us", "tree_GBps", "decode_us", "decode_GBps",
    "tree_over_decode", "rel_err",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--widths", type=int, nargs="+", default=[5, 17])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="kv_tree")
    args = parser.parse_args()
    rows = []
    for batch in args.batch:
        for width in args.widths:
            rows.append(bench(batch, args.context, width))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
            write_table_report(
                args.out, args.name, "Tree-verify attention vs decode attention", rows,
                COLUMNS,
                "Qwen2.5-0.5B attention shape (14 query heads, 2 KV heads of 64, bf16). "
                "`tree`: `triton_tree.tree_attention`, `width` queries per row (root + chain) "
                "over a prefix of context - width slots plus the chain's own; `decode`: the "
                "split-K decode kernel, one query per row over the context. GB/s on the K/V "
                "bytes of the context (both must read them once); rel_err against masked SDPA "
                "(float64, row 0). do_bench medians.",
            )  # fmt: skip


if __name__ == "__main__":
    main()
