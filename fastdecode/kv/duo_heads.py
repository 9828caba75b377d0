"""DuoAttention's head calibration file: which (layer, KV head) is a retrieval head, for
which model. Written once per model by `fastdecode calibrate-duo`, read by the `duo` policy.

The file is JSON and names the model it was made for by identity: the architecture's
shape plus a sample of weight values (compared with a 2% tolerance, so the same weights
loaded in float32 or bfloat16 match, while another checkpoint of the same shape is
rejected). A file for another model, or no file, is a clear error with the command that
makes the right one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fastdecode.model.transformer import Transformer

FORMAT = "fastdecode-duo-heads/1"
SHAPE_KEYS = ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size")
SAMPLES = 16  # weight values sampled per tensor


def _sample(t: torch.Tensor) -> list[float]:
    """SAMPLES values spread over a tensor, at fixed indices."""
    flat = t.reshape(-1)
    idx = (torch.arange(SAMPLES) * (flat.numel() - 1) // (SAMPLES - 1)).to(flat.device)
    return [float(x) for x in flat[idx].float().cpu()]


def model_identity(model: Transformer) -> dict[str, Any]:
    """Shape + sampled weights: what a calibration file must match."""
    cfg = model.config
    identity: dict[str, Any] = {key: getattr(cfg, key) for key in SHAPE_KEYS}
    tensors = [model.embed, model.layers[0].qkv, model.layers[-1].down, model.lm_head]
    identity["weights"] = [v for t in tensors for v in _sample(t)]
    return identity


def same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if any(a.get(key) != b.get(key) for key in SHAPE_KEYS):
        return False
    wa, wb = torch.tensor(a["weights"]), torch.tensor(b["weights"])
    scale = 0.02 * wa.abs().mean()  # values near zero: compare against the typical size
    return wa.shape == wb.shape and bool(((wa - wb).abs() <= 0.02 * wa.abs() + scale).all())


def describe(identity: dict[str, Any]) -> str:
    return (
        f"{identity['model_type']}, {identity['num_layers']} layers, "
        f"{identity['num_kv_heads']} KV heads of {identity['head_dim']}"
    )


def default_path(model: Transformer) -> Path:
    """Where calibrate-duo writes and the duo policy looks by default: keyed by shape (two
    models of one shape share the name; the identity check tells them apart)."""
    from fastdecode.hub import fastdecode_home

    cfg = model.config
    name = (
        f"{cfg.model_type}-{cfg.num_layers}l-{cfg.num_heads}h-{cfg.num_kv_heads}kv-"
        f"{cfg.head_dim}d-{cfg.vocab_size}v.json"
    )
    return fastdecode_home() / "duo" / name


def model_name(model: Transformer) -> str:
    """The best name for `--model` in a hint: where the config came from (a registry name for
    a cached registry model, the .gguf file for a GGUF, the directory for an HF model)."""
    from fastdecode.hub import fastdecode_home

    source = getattr(model.config.hf_config, "_name_or_path", "")
    if not source:
        return "MODEL"
    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file():
        if path.parent == fastdecode_home() / "models":
            return path.name
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(ggufs[0])
    return source


def calibrate_command(model: Transformer, path: Path) -> str:
    return f"fastdecode calibrate-duo --model {model_name(model)} --out {path}"


@dataclass
class HeadCalibration:
    retrieval: list[list[bool]]  # [layer][KV head]: True keeps every position
    scores: list[list[float]]  # [layer][KV head]: the calibration's evidence (higher: retrieval)
    model: dict[str, Any]  # model_identity of the calibrated model
    meta: dict[str, Any] = field(default_factory=dict)  # settings, method, model name

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, **self.__dict__}
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path

    @property
    def retrieval_fraction(self) -> float:
        flat = [r for layer in self.retrieval for r in layer]
        return sum(flat) / len(flat)


def load_calibration(path: str | Path, model: Transformer) -> HeadCalibration:
    """Read `path` and check it was made for `model`; ValueError otherwise, naming the
    command that makes the right file."""
    path = Path(path)
    command = calibrate_command(model, path)
    if not path.is_file():
        raise ValueError(
            f"no DuoAttention head calibration file at {path}; create it with:\n  {command}"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable head calibration file ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} head calibration file; recreate it:\n  {command}")
    mine = model_identity(model)
    if not same_model(data["model"], mine):
        theirs, ours = describe(data["model"]), describe(mine)
        if theirs == ours:
            ours += ", other weights"
        raise ValueError(
            f"{path} was calibrated for another model ({theirs}: "
            f"{data.get('meta', {}).get('model_name', '?')}) than this one ({ours}); "
            f"calibrate this model with:\n  {command}"
        )
    data.pop("format")
    return HeadCalibration(**data)
