"""Decode-step time and per-layer kernel breakdown on random weights of real model shapes.

For iterating on the engine without moving checkpoints to the GPU machine (speed does not
depend on weight values). The committed numbers come from benchmarks/decode.py on real models.

    python benchmarks/step_profile.py --shapes 1.5b --batches 1 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode import measure_bandwidth, profile_step  # noqa: E402

from fastdecode.engine.runner import ModelRunner  # noqa: E402
from fastdecode.model.config import ModelConfig  # noqa: E402
from fastdecode.model.layers import LayerWeights  # noqa: E402
from fastdecode.model.transformer import Transformer  # noqa: E402

# hidden, intermediate, layers, heads, kv_heads, vocab, qkv bias (from the registry's models)
SHAPES = {
    "135m": ("llama", 576, 1536, 30, 9, 3, 49152, False),
    "0.5b": ("qwen2", 896, 4864, 24, 14, 2, 151936, True),
    "1.5b": ("qwen2", 1536, 8960, 28, 12, 2, 151936, True),
    "tiny": ("qwen2", 64, 128, 4, 4, 2, 1000, True),  # host-overhead profiling on a CPU
}


def random_model(shape: str, device: str = "cuda", dtype=torch.bfloat16) -> Transformer:
    from transformers import AutoConfig

    kind, hidden, inter, layers, heads, kv_heads, vocab, bias = SHAPES[shape]
    hf = AutoConfig.for_model(
        kind,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=32768,
    )
    cfg = ModelConfig.from_hf(hf)
    dev, dt = device, dtype

    def r(*s):
        return torch.randn(*s, device=dev, dtype=dt) * 0.02

    qkv_rows = cfg.q_size + 2 * cfg.kv_size
    layer_list = [
        LayerWeights(
            torch.ones(hidden, device=dev, dtype=dt),
            r(qkv_rows, hidden),
            r(qkv_rows) if bias else None,
            None,
            None,
            r(hidden, cfg.q_size),
            torch.ones(hidden, device=dev, dtype=dt),
            r(2 * inter, hidden),
            r(hidden, inter),
        )
        for _ in range(layers)
    ]
    return Transformer(
        cfg,
        r(vocab, hidden),
        layer_list,
        torch.ones(hidden, device=dev, dtype=dt),
        r(vocab, hidden),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()
    bandwidth = measure_bandwidth()
    print(f"bandwidth {bandwidth / 1e9:.0f} GB/s")
    for shape in args.shapes:
        model = random_model(shape)
        runner = ModelRunner(model)
        for batch in args.batches:
            runner.allocate(batch, args.context + 256)
            tokens = torch.randint(0, 1000, (batch,), device="cuda")
            positions = torch.full((batch,), args.context, device="cuda")
            for _ in range(3):
                runner.decode(tokens, positions)
            times = []
            for _ in range(5):
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                start.record()
                for _ in range(50):
                    runner.decode(tokens, positions)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 50)
            ms = statistics.median(times)
            kv = batch * args.context * model.config.num_layers * 2 * model.config.kv_size * 2
            roof = (model.weight_bytes() + kv) / (ms / 1e3) / bandwidth
            print(f"{shape} batch {batch}: {ms:.3f} ms/step, roofline {roof:.2f}")
        prompts = [[1] * args.context]
        print(shape, profile_step(runner, prompts, model.config.num_layers))


if __name__ == "__main__":
    main()
