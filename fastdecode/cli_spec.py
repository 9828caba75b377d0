"""`fastdecode generate`'s speculative-decoding flags and the SpeculativeConfig they make:
every flag is checked (and names itself in errors) before a model is loaded; no torch import
here, so --help stays fast."""

from __future__ import annotations

import argparse

from fastdecode.cli_args import UserError


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    sd = p.add_argument_group(
        "speculative decoding",
        "A drafter proposes tokens and the model verifies them in one forward pass; greedy "
        "output is identical to plain decoding and sampling keeps the model's distribution. "
        "Flags marked with a method apply to that method only.",
    )
    sd.add_argument(
        "--spec",
        default=None,
        metavar="METHOD",
        help="decode speculatively with this drafter (default: off); an unknown name lists "
        "them. Model-free drafters cost next to nothing and pay when the output repeats text:\n"
        "ngram: prompt lookup, the last n tokens matched in prompt + output (edits, quotes)\n"
        "suffix: SuffixDecoding trees over this request and earlier outputs (agent loops)\n"
        "stand: STAND stochastic n-grams with logit statistics: pays when sampling (-t > 0)\n"
        "Model drafters cost a forward per draft token and pay on new but predictable text:\n"
        "draft:MODEL: a small model with the same tokenizer, much cheaper than the target\n"
        "layerskip: the model skipping layers (--skip-layers): no second model to hold\n"
        "triforce: the model over a sparse KV read (--sparse-*): pays on long contexts",
    )
    sd.add_argument(
        "--num-draft-tokens",
        type=int,
        default=None,
        metavar="K",
        help="most draft tokens (tree nodes) the model verifies per step, >= 0; 0 drafts "
        "nothing (default: 4)",
    )
    sd.add_argument(
        "--draft-length",
        default=None,
        metavar="fixed|feedback|goodput",
        help="how K is chosen per request and step: fixed: always K; feedback: follows "
        "recent acceptance (DiffuSpec), longer after full acceptance, shorter after "
        "rejections; goodput: SmartSpec's batch-aware rule, predicts step time from "
        "measured timings and picks the K with the most tokens/s, down to K=0 (plain "
        "decoding) when the batch is large enough that verification stops being nearly "
        "free, and decodes plainly while speculation's measured tokens/s stay below plain "
        "decoding's (default: fixed)",
    )
    sd.add_argument(
        "--tree",
        default=None,
        metavar="SHAPE",
        help="draft-model, layerskip (triforce: chain only): the shape of the drafts: "
        'chain (default); a static tree, children per depth, e.g. "4,2,1" (SpecInfer/'
        "Sequoia); or dynamic[:DEPTH:PER_LEVEL], grown greedily by draft probability under "
        "the --num-draft-tokens node budget (DySpec). Model-free drafters shape their own",
    )
    sd.add_argument(
        "--confidence-threshold",
        type=float,
        default=None,
        metavar="P",
        help="model drafters, chains: stop drafting once the draft's probability of its "
        "token falls below P, in [0, 1) (SpecDec++/Kangaroo early exit, BiLD's fallback); "
        "0 never stops early (default: 0)",
    )
    sd.add_argument(
        "--skip-layers",
        default=None,
        metavar="L1,L2,...",
        help="layerskip: the layer ids (from 0) the draft skips, e.g. 2,4,6 (default: every "
        "second layer of the middle, the first two and last two kept)",
    )
    sd.add_argument(
        "--sparse-policy",
        default=None,
        metavar="NAME",
        help="triforce: how the draft reads the KV cache: streaming_read (attention sinks + "
        "recent window), quest (query-aware pages) or tidal (TidalDecode token selection) "
        "(default: streaming_read)",
    )
    sd.add_argument(
        "--sparse-budget",
        default=None,
        metavar="B",
        help="triforce: how much of the cache the draft reads: a fraction of the context "
        "(0 < B <= 1, e.g. 1/16 or 0.0625) or a number of positions (> 1) (default: 1/16)",
    )
    sd.add_argument(
        "--prompt-lookup-max",
        type=int,
        default=None,
        metavar="N",
        help="ngram: longest n-gram to match in the prompt and output (default: 4)",
    )


# Speculative flags: (argparse dest, flag, the methods it applies to; None: every method).
# "draft:NAME" counts as draft_model.
MODEL_DRAFTERS = ("draft_model", "layerskip", "triforce")  # fastdecode.spec.config, no torch
_SPEC_FLAGS: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("num_draft_tokens", "--num-draft-tokens", None),
    ("draft_length", "--draft-length", None),
    ("tree", "--tree", MODEL_DRAFTERS),
    ("confidence_threshold", "--confidence-threshold", MODEL_DRAFTERS),
    ("skip_layers", "--skip-layers", ("layerskip",)),
    ("sparse_policy", "--sparse-policy", ("triforce",)),
    ("sparse_budget", "--sparse-budget", ("triforce",)),
    ("prompt_lookup_max", "--prompt-lookup-max", ("ngram",)),
)

# Config error messages -> the flag that caused them: (text in the message, flag, rewrite),
# where rewrite "name" replaces the field name by the flag and "prefix" puts "FLAG: " first.
_SPEC_ERRORS = (
    ("num_draft_tokens", "--num-draft-tokens", "name"),
    ("confidence_threshold", "--confidence-threshold", "name"),
    ("unknown drafter", "--spec", "prefix"),
    ("draft_model needs a draft model", "--spec", "prefix"),
    ("has a different tokenizer than the target", "--spec", "prefix"),
    ("max_ngram", "--prompt-lookup-max", "prefix"),
    ("draft length policy", "--draft-length", "prefix"),
    ("bad tree", "--tree", "prefix"),
    ("tree shapes are for", "--tree", "prefix"),
    ("triforce drafts chains", "--tree", "prefix"),
    ("layerskip: skip", "--skip-layers", "prefix"),
    ("KV policy", "--sparse-policy", "prefix"),
    ("KV budget", "--sparse-budget", "prefix"),
)


def spec_error(message: str) -> str:
    """A SpeculativeConfig / drafter ValueError, reworded to name the CLI flag."""
    for text, flag, how in _SPEC_ERRORS:
        if text not in message or flag in message:
            continue
        if how == "name":
            return message.replace(text, flag)
        return f"{flag}: {message.removeprefix('layerskip: ')}"
    return message


def _parse_skip_layers(text: str) -> list[int]:
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        layers = []
    if not layers or any(i < 0 for i in layers):
        raise UserError(
            f"--skip-layers: expected layer ids >= 0 separated by commas, e.g. 2,4,6; got {text!r}"
        )
    return layers


def _parse_sparse_budget(text: str) -> float:
    from fractions import Fraction

    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        value = Fraction(0)
    if value <= 0 or (value > 1 and value.denominator != 1):
        raise UserError(
            f"--sparse-budget: expected a fraction of the context in (0, 1] (1/16, 0.0625) "
            f"or a whole number of positions (512); got {text!r}"
        )
    return float(value)


def _check_sparse_policy(name: str) -> str:
    """Triforce drafts through a read policy: one that keeps the whole cache and reads a
    subset each step (a draft over an evicted cache could not be verified)."""
    from fastdecode.kv.policies import POLICIES
    from fastdecode.kv.policies.base import ReadPolicy

    readers = sorted(n for n, cls in POLICIES.items() if issubclass(cls, ReadPolicy))
    if name not in readers:
        raise UserError(
            f"--sparse-policy: {name!r} is not a sparse-read KV policy; known: "
            + ", ".join(readers)
        )
    return name


def speculative_config(args: argparse.Namespace):
    """The SpeculativeConfig that --spec and its flags ask for (None without --spec);
    checked before a model is loaded."""
    given = [
        (flag, methods) for dest, flag, methods in _SPEC_FLAGS if getattr(args, dest) is not None
    ]
    if args.spec is None:
        if given:
            raise UserError(f"{given[0][0]} needs --spec METHOD (speculative decoding is off)")
        return None
    if args.spec == "draft:":
        raise UserError("--spec draft:MODEL needs the draft model's name or path after 'draft:'")
    from fastdecode.spec.config import MODEL_DRAFTERS, SpeculativeConfig
    from fastdecode.spec.drafters import DRAFTERS

    method = "draft_model" if args.spec.startswith("draft:") else args.spec
    if method in DRAFTERS or method in MODEL_DRAFTERS:  # an unknown one: the config says so
        for flag, methods in given:
            if methods is not None and method not in methods:
                names = ", ".join("draft:MODEL" if m == "draft_model" else m for m in methods)
                raise UserError(f"{flag} applies to --spec {names}, not to --spec {args.spec}")
    if args.confidence_threshold is not None and args.tree not in (None, "chain"):
        raise UserError(
            f"--confidence-threshold stops chains early; it does not apply to --tree {args.tree}"
        )
    drafter_kwargs: dict[str, object] = {}
    if args.skip_layers is not None:
        drafter_kwargs["skip"] = _parse_skip_layers(args.skip_layers)
    if args.sparse_policy is not None:
        drafter_kwargs["policy"] = _check_sparse_policy(args.sparse_policy)
    if args.sparse_budget is not None:
        drafter_kwargs["budget"] = _parse_sparse_budget(args.sparse_budget)
    options = {
        "num_draft_tokens": args.num_draft_tokens,
        "max_ngram": args.prompt_lookup_max,
        "tree": args.tree,
        "confidence_threshold": args.confidence_threshold,
        "draft_length": args.draft_length,
    }
    try:
        return SpeculativeConfig(
            method=args.spec,
            drafter_kwargs=drafter_kwargs,
            **{k: v for k, v in options.items() if v is not None},
        )
    except ValueError as exc:
        raise UserError(spec_error(str(exc))) from None
