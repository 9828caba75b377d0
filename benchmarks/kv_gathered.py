"""Micro-benchmark of sparse-retrieval decode attention on the GPU (Qwen2.5-0.5B shape:
14 query heads, 2 KV heads of 64 dims, bf16): the Triton gathered kernel at a 1/16 budget
against the full-context Triton decode kernel, in time and in GB/s of the bytes each must
read, plus the selection cost of quest (page bounds) and tidal (a selection layer's scores).

    python benchmarks/kv_gathered.py [--context 32768] [--batch 1 4 16 32]

Also checks the kernel against the PyTorch reference at that size. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from fastdecode.kv.gathered import gathered_attention_reference
from fastdecode.kv.policies.quest import QuestPolicy
from fastdecode.kv.policies.tidal import TidalPolicy
from fastdecode.kv.selective import SelectiveKVCache
from fastdecode.kv.triton_decode import decode_attention
from fastdecode.kv.triton_gathered import gathered_decode_attention

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
    tidal = SelectiveKVCache(
        TidalPolicy(budget, [0]), 1, batch, KV_HEADS, ctx, HEAD_DIM, dtype, dev
    )
    tidal.k[0].copy_(k)
    row["tidal_select_us"] = round(do_bench(lambda: tidal._observe(0, q, visible)) * 1e3, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--fraction", type=int, default=16, help="budget = context / this")
    args = parser.parse_args()
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}))
    for batch in args.batch:
        print(json.dumps(bench(batch, args.context, args.fraction)))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
