"""Micro-benchmark of sparse-retrieval decode attention on the GPU (Qwen2.5-0.5B shape:
14 query heads, 2 KV heads of 64 dims, bf16): the Triton gathered kernel at a 1/16 budget
against the full-context Triton decode kernel, in time and in GB/s of the bytes each must
read, plus the selection cost of quest (page bounds + top-k) and tidal (a selection
layer's extra work over plain dense attention: the kernel also writes its logits, then the
group weights and the top-k).

    python benchmarks/kv_gathered.py [--context 32768] [--batch 1 4 16 32] [--out DIR]

Also checks the kernel against the PyTorch reference at that size. Writes
DIR/NAME.json + NAME.md (default benchmarks/results/kv_gathered).
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
from fastdecode.kv.gathered import gathered_attention_reference  # noqa: E402
from fastdecode.kv.policies.base import top_slots  # noqa: E402
from fastdecode.kv.policies.quest import QuestPolicy  # noqa: E402
from fastdecode.kv.selective import SelectiveKVCache, group_weights  # noqa: E402
from fastdecode.kv.triton_decode import (  # noqa: E402
    decode_attention,
    fused_decode_attention,
    fused_decode_attention_scored,
)
from fastdecode.kv.triton_gathered import gathered_decode_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 14, 2, 64


def bench(batch: int, ctx: int, fraction: int) -> dict:
    dev, dtype, budget = "cuda", torch.bfloat16, ctx // fraction
    torch.manual_seed(0)
    k = torch.randn(batch, KV_HEADS, ctx, HEAD_DIM, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=dev, dtype=dtype)
    lengths = torch.full((batch,), ctx, device=dev)
    tokens = torch.rand(batch, KV_HEADS, ctx, device=dev).topk(budget, -1).indices
    pages = torch.rand(batch, KV_HEADS, ctx // 16, device=dev).topk(budget // 16, -1).indices
    pages = (pages[..., None] * 16 + torch.arange(16, device=dev)).flatten(-2)
    ref = gathered_attention_reference(q.double(), k.double(), v.double(), tokens)
    err = (gathered_decode_attention(q, k, v, tokens).double() - ref).norm() / ref.norm()
    full_bytes = 2 * k.numel() * k.element_size()
    sparse_bytes = full_bytes // fraction + tokens.numel() * tokens.element_size()
    row = {"batch": batch, "context": ctx, "budget": budget, "rel_err": float(err)}
    for name, fn, nbytes in (
        ("full", lambda: decode_attention(q, k, v, lengths), full_bytes),
        ("gather_tokens", lambda: gathered_decode_attention(q, k, v, tokens), sparse_bytes),
        ("gather_pages", lambda: gathered_decode_attention(q, k, v, pages), sparse_bytes),
        ("torch_reference", lambda: gathered_attention_reference(q, k, v, tokens), None),
    ):
        ms = do_bench(fn)
        row[f"{name}_us"] = round(ms * 1e3, 1)
        if nbytes:
            row[f"{name}_GBps"] = round(nbytes / ms / 1e6, 1)
    visible = torch.ones(batch, ctx, dtype=torch.bool, device=dev)
    quest = QuestPolicy(budget, dense_layers=0)
    cache = SelectiveKVCache(quest, 1, batch, KV_HEADS, ctx, HEAD_DIM, dtype, dev)
    bounds = k.view(batch, KV_HEADS, ctx // 16, 16, HEAD_DIM)
    cache.state["key_min"][0].copy_(bounds.amin(3))
    cache.state["key_max"][0].copy_(bounds.amax(3))
    row["quest_select_us"] = round(do_bench(lambda: quest.select(0, cache, q, visible)) * 1e3, 1)
    # TidalDecode's selection layer: the fused kernel with logits out + weights + top-k,
    # minus the same kernel without them (what the layer costs anyway)
    qkv = torch.randn(batch, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=dev, dtype=dtype)
    cos, sin = torch.ones(batch, HEAD_DIM, device=dev), torch.zeros(batch, HEAD_DIM, device=dev)
    weigh = torch.compile(group_weights, fullgraph=True, dynamic=False)

    def select() -> torch.Tensor:
        _, logits, lse = fused_decode_attention_scored(qkv, k, v, lengths, cos, sin, HEADS)
        return top_slots(weigh(logits, lse, visible, KV_HEADS), visible, budget)

    dense_ms = do_bench(lambda: fused_decode_attention(qkv, k, v, lengths, cos, sin, HEADS))
    row["tidal_select_us"] = round((do_bench(select) - dense_ms) * 1e3, 1)
    return row


COLUMNS = [
    "batch", "context", "budget", "full_us", "full_GBps", "gather_tokens_us",
    "gather_tokens_GBps", "gather_pages_us", "gather_pages_GBps", "torch_reference_us",
    "quest_select_us", "tidal_select_us", "rel_err",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--fraction", type=int, default=16, help="budget = context / this")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", default="kv_gathered")
    args = parser.parse_args()
    rows = []
    for batch in args.batch:
        rows.append(bench(batch, args.context, args.fraction))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
        write_table_report(
            args.out, args.name, "Gathered (sparse-retrieval) decode attention", rows, COLUMNS,
            "Qwen2.5-0.5B attention shape (14 query heads, 2 KV heads of 64, bf16), budget = "
            f"context / {args.fraction}. `full`: the split-K decode kernel over every slot; "
            "`gather_tokens` / `gather_pages`: the gathered kernel over scattered tokens / "
            "pages of 16; GB/s on the bytes each must read (K, V and the indices); "
            "`quest_select_us`: Quest's page scores + top-k for one layer; "
            "`tidal_select_us`: a TidalDecode selection layer's cost over plain dense "
            "attention (logits written by the kernel, group weights, top-k). do_bench medians.",
        )  # fmt: skip


if __name__ == "__main__":
    main()
