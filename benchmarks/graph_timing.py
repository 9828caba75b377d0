"""Kernel timing as the model runs kernels: many calls captured in one CUDA graph, replayed,
timed with CUDA events. No launch latency (the model's decode step is a graph too) and no
L2 flush in front of each call (`do_bench`'s 256 MB zero_ leaves L2 full of dirty lines to
write back: ~2.6 us on a 20 us kernel, `kv_gathered_variants.md`). Callers rotate inputs
(fn(i)) so data a call reads is not L2-resident from the call before.
"""

from __future__ import annotations

import statistics

import torch


def graph_us(fn, launches: int, replays: int = 5) -> float:
    """Microseconds per call of fn(i), i = 0..launches-1 captured in one CUDA graph (median
    over `replays` replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        for i in range(2):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / launches)
    del graph
    return statistics.median(times)


def large_copy_gbps(gib: float = 1.0) -> float:
    """Device copy bandwidth: (read + write bytes) / time of a `gib` GiB copy."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * gib * 2**30 / graph_us(lambda i: dst.copy_(src), launches=5, replays=3) / 1e3
