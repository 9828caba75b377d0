"""The fused sparse decode step: the RoPE + store + gathered-attention kernel against its
PyTorch reference, and the fused selective step (one QKV matmul, one attention kernel per
layer) against the unfused `Transformer.forward` path for every read policy.

On a CUDA machine they run compiled: `python -m pytest -q tests/test_fused_selective.py`;
on CPU in Triton's interpreter (TRITON_INTERPRET=1, set below), skipped without triton.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import save_tiny_model  # noqa: E402

from fastdecode.engine.runner import ModelRunner  # noqa: E402
from fastdecode.kv.gathered import fused_gathered_attention_reference  # noqa: E402
from fastdecode.kv.policies import KVPolicyConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs the triton package"
)
TOL = 1e-5 if DEVICE == "cpu" else 1e-3  # tf32 dots on the GPU


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    """llm4's tiny random Llama (4 layers, 4 query heads, 2 KV heads of 16 dims), float32,
    on DEVICE (the kernels run compiled on a GPU, interpreted on CPU)."""
    from fastdecode.model.load import load_model

    directory = tmp_path_factory.mktemp("fused4") / "llama4"
    save_tiny_model("llama", directory, seed=3, num_hidden_layers=4)
    return load_model(directory, dtype=torch.float32, device=DEVICE, progress=False).model


def _runner(model, policy):
    """An eager runner (no compile, no graphs: the model stays as loaded)."""
    return ModelRunner(model, kv_policy=policy, cuda_graphs=False, compile=False)


def _rope_tables(positions, head_dim, generator):
    angles = positions[:, None].double() * torch.rand(head_dim // 2, generator=generator).double()
    return torch.cat([angles.cos()] * 2, -1).float(), torch.cat([angles.sin()] * 2, -1).float()


def _indices(batch, kv_heads, positions, k, generator):
    """Per (row, KV head): k distinct slots among the visible ones 0..position (-1 padding
    past them); the new slot listed in some heads and not in others."""
    idx = torch.full((batch, kv_heads, k), -1, dtype=torch.long)
    for b in range(batch):
        visible = int(positions[b]) + 1
        for h in range(kv_heads):
            new = visible - 1
            picked = torch.randperm(visible, generator=generator)[:k]
            others = picked[picked != new]
            if (b + h) % 2 or visible == 1:  # the new slot listed here ...
                picked = torch.cat([others[: k - 1], others.new_tensor([new])])
            else:  # ... and not listed there
                picked = others
            idx[b, h, : len(picked)] = picked[torch.randperm(len(picked), generator=generator)]
    return idx


@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("k", [16, 100])
def test_fused_gathered_kernel_matches_reference(group, k):
    """Ragged lengths (a row of 1 slot, rows with fewer visible slots than K: -1 padding),
    the new slot listed or not, GQA groups 1, 2 and 7."""
    from fastdecode.kv.triton_gathered import fused_gathered_attention

    generator = torch.Generator().manual_seed(k + group)
    batch, kv_heads, head_dim, capacity = 5, 2, 16, 300
    heads = kv_heads * group
    positions = torch.tensor([0, 9, 63, 150, 299])
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, generator=generator)
    k_cache = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator)
    v_cache = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator)
    cos, sin = _rope_tables(positions, head_dim, generator)
    idx = _indices(batch, kv_heads, positions, k, generator)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ref = fused_gathered_attention_reference(qkv, k_ref, v_ref, idx, positions, cos, sin, heads)

    inputs = [t.to(DEVICE) for t in (qkv, k_cache, v_cache, idx, positions, cos, sin)]
    out = fused_gathered_attention(*inputs, heads).cpu()
    assert (out - ref).norm() / ref.norm() < TOL
    torch.testing.assert_close(inputs[1].cpu(), k_ref, atol=TOL, rtol=TOL)
    assert torch.equal(inputs[2].cpu(), v_ref)


# -- the fused selective step against the unfused forward --

PROMPTS = [list(range(3, 3 + n)) for n in (37, 60, 45)]  # right-padded to 60 at prefill
POLICIES = {  # every kind of layer: dense first layers, selection layers, sparse layers
    "quest": {"dense_layers": 1},  # layer 0 dense; 1-3 by page bounds (q and k outside)
    "tidal": {"selection_layers": [1]},  # 0 dense, 1 selects (weights), 2-3 read its pick
    "streaming_read": {"sinks": 2},  # one selection shared by every layer
}


def _caches_match(ref, out, written):
    """Same K/V in every written slot; same policy state (page bounds, a selection)."""
    for a, b in zip(ref.k + ref.v, out.k + out.v, strict=True):
        for row, last in enumerate(written.tolist()):
            torch.testing.assert_close(
                b[row, :, : last + 1], a[row, :, : last + 1], atol=TOL, rtol=TOL
            )
    assert ref.state.keys() == out.state.keys()
    for name, value in ref.state.items():
        values = value if isinstance(value, list) else [value]
        other = out.state[name] if isinstance(value, list) else [out.state[name]]
        for a, b in zip(values, other, strict=True):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                torch.testing.assert_close(b, a, atol=TOL, rtol=TOL)
            elif isinstance(a, torch.Tensor) and DEVICE == "cpu":
                assert torch.equal(b, a)
            elif isinstance(a, torch.Tensor):  # tf32 scores may swap near-ties on the GPU
                assert (b == a).float().mean() > 0.9
            else:
                assert a == b


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("budget", [32, 64])  # 64: rows with fewer visible slots than K
@pytest.mark.parametrize("sparse_reads", [True, False])
def test_fused_selective_step_matches_forward(model4, name, budget, sparse_reads):
    """Logits and caches of several decode steps through the fused step equal the unfused
    `Transformer.forward(..., decode=True)` path's (sparse_reads off: a TriForce target's
    plain steps, dense kernels but Quest's bounds still kept)."""
    from fastdecode.model.fused_selective import FusedSelectiveStep

    model = model4
    policy = KVPolicyConfig(name, budget, POLICIES[name])
    runners = [_runner(model, policy) for _ in range(2)]
    for runner in runners:
        runner.allocate(len(PROMPTS), 60 + 5, prompt_len=60)
        runner.cache.sparse_reads = sparse_reads
        tokens = runner.prefill(PROMPTS).argmax(-1)
    ref_cache, out_cache = runners[0].cache, runners[1].cache
    step = FusedSelectiveStep(model, compile=False)
    positions = torch.tensor([len(p) for p in PROMPTS], device=DEVICE)
    for _ in range(4):
        ref = model.forward(tokens[:, None], positions[:, None], ref_cache, decode=True)[:, 0]
        out = step(tokens, positions, out_cache)
        torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
        _caches_match(ref_cache, out_cache, positions)
        tokens, positions = ref.argmax(-1), positions + 1


def test_decode_step_takes_the_fused_path(model4, recorded, monkeypatch):
    """`Transformer.decode_step` (what the runner calls) runs a selective cache through the
    fused step where it exists (CUDA); a policy with `fused_decode = False` keeps the
    unfused path."""
    from fastdecode.kv import gathered
    from fastdecode.kv.policies.streaming_read import StreamingReadPolicy
    from fastdecode.model.fused_selective import FusedSelectiveStep

    fused_calls = []
    inner = gathered.fused_gathered_attention

    def spy(*args):
        fused_calls.append(args[3].clone())
        return inner(*args)

    monkeypatch.setattr(gathered, "fused_gathered_attention", spy)
    monkeypatch.setattr(model4, "fused_select", FusedSelectiveStep(model4, False))
    policy = KVPolicyConfig("streaming_read", 32, POLICIES["streaming_read"])
    runner = _runner(model4, policy)
    runner.allocate(len(PROMPTS), 62, prompt_len=60)
    tokens = runner.prefill(PROMPTS).argmax(-1)
    positions = torch.tensor([len(p) for p in PROMPTS], device=DEVICE)
    fused = runner.decode(tokens, positions)
    assert len(fused_calls) == 4 and not recorded  # every layer sparse, fused
    monkeypatch.setattr(StreamingReadPolicy, "fused_decode", False)
    unfused = runner.decode(tokens, positions)
    assert len(fused_calls) == 4 and len(recorded) == 4
    torch.testing.assert_close(unfused, fused, atol=TOL, rtol=TOL)
