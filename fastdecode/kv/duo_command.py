"""`fastdecode calibrate-duo`: arguments and run (no torch at import: --help stays fast)."""

from __future__ import annotations

import argparse
import sys

from fastdecode.cli_args import add_device_dtype

HELP = "find a model's DuoAttention retrieval heads (for --kv-policy duo)"
DESCRIPTION = (
    "Identify DuoAttention's retrieval heads once per model and save them for the `duo` KV "
    "policy. On synthetic passkey prompts (filler text with a 5-digit key at a random depth, "
    "then the question and the answer), each (layer, KV head) is scored by how much the "
    "attention output at the answer tokens changes when that head may only see the first "
    "--sinks positions and the last --window ones (a training-free stand-in for the "
    "paper's learned gates). The top --retrieval-fraction of heads keep the whole context "
    "under `duo`; the rest keep sinks + a recent window. The file is JSON and is tied to "
    "this model's weights: the policy rejects it for any other model."
)
EPILOG = (
    "examples:\n"
    "  fastdecode calibrate-duo --model smollm2-135m-instruct\n"
    "  fastdecode calibrate-duo --model ./qwen.gguf --out heads.json --length 4096 "
    "--retrieval-fraction 0.25"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name, .gguf file or HF directory")
    p.add_argument(
        "--out",
        default=None,
        help="calibration file to write (default: $FASTDECODE_HOME/duo/<model shape>.json, "
        "where the duo policy looks when given no `heads` option)",
    )
    p.add_argument("--length", type=int, default=1024, help="tokens per passkey prompt (1024)")
    p.add_argument("--samples", type=int, default=8, help="passkey prompts to average (8)")
    p.add_argument(
        "--retrieval-fraction",
        type=float,
        default=0.5,
        help="share of (layer, KV head) pairs kept as retrieval heads (0.5)",
    )
    p.add_argument("--sinks", type=int, default=4, help="sink positions a streaming head sees (4)")
    p.add_argument("--window", type=int, default=64, help="recent positions it sees (64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkeys (0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_device_dtype(p.add_argument_group("device"))


def run(args: argparse.Namespace) -> int:
    from fastdecode import LLM
    from fastdecode.kv.duo_calibration import calibrate
    from fastdecode.kv.duo_heads import default_path

    if args.samples < 1 or args.length < 32:
        raise ValueError("--samples must be >= 1 and --length >= 32")
    llm = LLM(args.model, device=args.device, dtype=args.dtype, progress=not args.quiet)
    calibration = calibrate(
        llm.model,
        lambda text: llm.tokenizer.encode(text, add_special_tokens=False),
        model_name=str(args.model),
        length=args.length,
        samples=args.samples,
        retrieval_fraction=args.retrieval_fraction,
        sinks=args.sinks,
        window=args.window,
        seed=args.seed,
        progress=not args.quiet,
    )
    path = calibration.save(args.out or default_path(llm.model))
    share = calibration.retrieval_fraction
    print(f"retrieval heads: {share:.0%} of all KV heads; wrote", file=sys.stderr)
    print(path)
    return 0
