"""Dev sweep of the gathered decode kernel's launch configuration on the GPU: slots per
program (split), rows per loop trip (block), warps and pipeline stages, at the
Qwen2.5-0.5B attention shape (14 query heads, 2 KV heads of 64, bf16) reading 2048 of 32768
slots per (row, KV head). Prints the shipped configuration's time (kernel + merge), the copy
bandwidth, and the 8 fastest configurations with their max error against the shipped
output. Run it alone on the card: a concurrent job skews it.

    python benchmarks/kv_gathered_sweep.py [--batches 32 16]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastdecode.kv import triton_gathered  # noqa: E402
from fastdecode.kv.triton_decode import merge_splits, split_scratch  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, CONTEXT, SELECTED = 14, 2, 64, 32768, 2048
CONFIGS = itertools.product((128, 256, 512, 1024), (32, 64, 128), (2, 4, 8), (1, 2, 3))


def _inputs(batch: int):
    torch.manual_seed(0)
    shape = (batch, KV_HEADS, CONTEXT, HEAD_DIM)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    picks = [torch.randperm(CONTEXT, device="cuda")[:SELECTED].sort().values
             for _ in range(batch * KV_HEADS)]  # fmt: skip
    return q, k, v, torch.stack(picks).view(batch, KV_HEADS, SELECTED)


def _launcher(q, k, v, idx, split: int, block: int, warps: int, stages: int):
    """(kernel only, kernel + merge) callables for one configuration."""
    batch = q.shape[0]
    num_splits = triton.cdiv(SELECTED, split)
    partial, lse = split_scratch(batch, HEADS, num_splits, HEAD_DIM, q.device)

    def kernel() -> None:
        triton_gathered._gathered_split_kernel[(batch, KV_HEADS, num_splits)](
            q, k, v, idx, q, q, q, partial, lse, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            idx.stride(0), idx.stride(1), SELECTED, num_splits, HEAD_DIM**-0.5,
            GROUP=HEADS // KV_HEADS, GROUP_PAD=16, HEAD_DIM=HEAD_DIM, SPLIT=split,
            BLOCK=block, NEW_TOKEN=False, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    def full() -> torch.Tensor:
        kernel()
        return merge_splits(partial, lse, batch, HEADS, num_splits, HEAD_DIM, k.dtype)

    return kernel, full


def sweep(batch: int) -> None:
    q, k, v, idx = _inputs(batch)
    nbytes = 2 * batch * KV_HEADS * SELECTED * HEAD_DIM * k.element_size()
    reference = triton_gathered.gathered_decode_attention(q, k, v, idx)
    shipped = do_bench(lambda: triton_gathered.gathered_decode_attention(q, k, v, idx))
    copy = do_bench(lambda: k.clone())
    print(
        f"batch {batch}: shipped {shipped * 1e3:.1f} us ({nbytes / shipped / 1e6:.0f} GB/s); "
        f"copy bandwidth {2 * k.numel() * k.element_size() / copy / 1e6:.0f} GB/s",
        flush=True,
    )
    results = []
    for split, block, warps, stages in CONFIGS:
        if block > split:
            continue
        kernel, full = _launcher(q, k, v, idx, split, block, warps, stages)
        try:
            error = float((full().float() - reference.float()).abs().max())
            results.append((do_bench(full), do_bench(kernel), split, block, warps, stages, error))
        except Exception as exc:  # a configuration the compiler rejects
            print(f"  {split, block, warps, stages}: {type(exc).__name__}")
    for total, kernel_ms, split, block, warps, stages, error in sorted(results)[:8]:
        print(
            f"  {total * 1e3:.1f} us (kernel {kernel_ms * 1e3:.1f}) {nbytes / total / 1e6:.0f} "
            f"GB/s: split {split} block {block} warps {warps} stages {stages}, err {error:.3g}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 16])
    for batch in parser.parse_args().batches:
        sweep(batch)


if __name__ == "__main__":
    main()
