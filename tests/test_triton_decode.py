"""The Triton decode-attention kernels against plain-PyTorch references.

On a CUDA machine they run compiled: `python -m pytest -q tests/test_triton_decode.py`.
Without a GPU they run in Triton's interpreter (TRITON_INTERPRET=1, set below) when the
`triton` package is installed, and are skipped otherwise.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastdecode.kv.attention import cache_attention, fold_mask_for_gqa  # noqa: E402
from fastdecode.model.rope import apply_rope  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs the triton package"
)
SHAPES = [(9, 3, 64), (12, 2, 128)] if DEVICE == "cuda" else [(6, 2, 16)]
DTYPES = [torch.bfloat16, torch.float32] if DEVICE == "cuda" else [torch.float32]


def _tolerance(dtype):
    if DEVICE == "cpu":
        return 1e-5
    return 2e-2 if dtype == torch.bfloat16 else 1e-3  # tf32 dots on the GPU


def _reference(q, k, v, lengths, group):
    capacity = k.shape[2]
    mask = torch.arange(capacity, device=q.device)[None, :] < lengths[:, None]
    mask = fold_mask_for_gqa(mask[:, None, None, :], group)
    return cache_attention(q.double(), k.double(), v.double(), mask)


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_matches_sdpa(heads, kv_heads, head_dim, dtype):
    from fastdecode.kv.triton_decode import decode_attention

    torch.manual_seed(0)
    batch, capacity = 5, 640
    q = torch.randn(batch, heads, 1, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, kv_heads, capacity, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, kv_heads, capacity, head_dim, device=DEVICE, dtype=dtype)
    lengths = torch.tensor([1, 17, 256, 257, 640], device=DEVICE)
    ref = _reference(q, k, v, lengths, heads // kv_heads)
    out = decode_attention(q, k, v, lengths)
    assert (out.double() - ref).norm() / ref.norm() < _tolerance(dtype)


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scored", [False, True])
def test_fused_rope_write_attention(heads, kv_heads, head_dim, dtype, scored):
    """RoPE + cache store + attention in one launch == the three steps done separately."""
    from fastdecode.kv.selective import attention_weights, group_weights
    from fastdecode.kv.triton_decode import fused_decode_attention, fused_decode_attention_scored

    torch.manual_seed(1)
    batch, capacity = 5, 640
    positions = torch.tensor([0, 16, 255, 256, 639], device=DEVICE)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, device=DEVICE, dtype=dtype)
    k_cache = torch.randn(batch, kv_heads, capacity, head_dim, device=DEVICE, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    angles = positions[:, None].double() * torch.rand(head_dim // 2, device=DEVICE).double()
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype)

    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q = apply_rope(q.view(batch, heads, 1, head_dim), cos[:, None, None], sin[:, None, None])
    k = apply_rope(k.view(batch, kv_heads, 1, head_dim), cos[:, None, None], sin[:, None, None])
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    rows = torch.arange(batch, device=DEVICE)
    k_ref[rows, :, positions] = k[:, :, 0]
    v_ref[rows, :, positions] = v.view(batch, kv_heads, head_dim)
    ref = _reference(q, k_ref, v_ref, positions + 1, heads // kv_heads)

    if scored:  # a selection layer's variant: the same attention plus the softmax weights
        k_before, v_before = k_cache.clone(), v_cache.clone()
        out, logits, slice_lse = fused_decode_attention_scored(
            qkv, k_cache, v_cache, positions + 1, cos, sin, heads
        )
        visible = torch.arange(capacity, device=DEVICE)[None, :] <= positions[:, None]
        weights = group_weights(logits, slice_lse, visible, kv_heads)
        expect = attention_weights(q.double(), k_ref.double(), visible)
        assert (weights.double() - expect).abs().max() < _tolerance(dtype)
        group_total = torch.full_like(weights[..., 0], heads // kv_heads)
        assert torch.allclose(weights.sum(-1), group_total, atol=1e-3)
        # and the cache writes / output equal the unscored kernel's
        plain = fused_decode_attention(qkv, k_before, v_before, positions + 1, cos, sin, heads)
        assert torch.equal(out, plain) and torch.equal(k_before, k_cache)
    else:
        out = fused_decode_attention(qkv, k_cache, v_cache, positions + 1, cos, sin, heads)
    tol = _tolerance(dtype)
    assert (out.double() - ref).norm() / ref.norm() < tol
    assert (k_cache.double() - k_ref.double()).norm() / k_ref.double().norm() < tol
    assert torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_decode_step_matches_forward(tiny_model, arch):
    """The fused decode step (QKV matmul, Triton RoPE+store+attention, fused residual+norm)
    gives the logits and cache of the generic forward."""
    from fastdecode.model.fused_decode import FusedDecodeStep
    from fastdecode.model.load import load_model

    directory, _ = tiny_model(arch)
    model = load_model(directory, dtype=torch.float32, device=DEVICE, progress=False).model
    torch.manual_seed(2)
    batch, prompt = 3, 9
    tokens = torch.randint(0, model.config.vocab_size, (batch, prompt + 1), device=DEVICE)
    positions = torch.arange(prompt, device=DEVICE).expand(batch, prompt)
    generic, fused = model.new_cache(batch, 32), model.new_cache(batch, 32)
    for cache in (generic, fused):
        model.forward(tokens[:, :prompt], positions, cache)
    step_positions = torch.full((batch,), prompt, device=DEVICE)
    ref = model.forward(tokens[:, prompt:], step_positions[:, None], generic)[:, 0]
    out = FusedDecodeStep(model, compile=False)(tokens[:, prompt], step_positions, fused)
    tol = 1e-4 if DEVICE == "cpu" else 5e-3  # tf32 dots on the GPU
    assert (out - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())
    for a, b in zip(generic.k + generic.v, fused.k + fused.v, strict=True):
        assert torch.allclose(a[:, :, : prompt + 1], b[:, :, : prompt + 1], atol=1e-5)


def _random_tree_mask(batch, width, prefix):
    """Ancestor-closed tree visibility: column 0 is the root, every node sees a random
    earlier node's ancestors and itself (like DraftTree.ancestor_rows)."""
    local = torch.zeros(batch, width, width, dtype=torch.bool)
    for b in range(batch):
        local[b, 0, 0] = True
        for t in range(1, width):
            parent = int(torch.randint(0, t, ()))
            local[b, t] = local[b, parent]
            local[b, t, t] = True
    from fastdecode.kv.tree_mask import TreeMask

    return TreeMask(prefix.to(DEVICE), local.to(DEVICE))


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES + [(14, 2, 16)])
@pytest.mark.parametrize("width", [2, 9, 40])
def test_tree_attention_matches_masked_sdpa(heads, kv_heads, head_dim, width):
    """Prefix split-K + masked tree slice + merge == SDPA with the dense [T, capacity] mask,
    for ragged prefixes, several query tiles (group x width > 64) and a tree that reaches
    the cache's last slot."""
    from fastdecode.kv.triton_tree import tree_attention

    torch.manual_seed(3)
    batch, capacity = 4, 300
    dtype = torch.float32
    q = torch.randn(batch, heads, width, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(batch, kv_heads, capacity, head_dim, device=DEVICE, dtype=dtype)
    v = torch.randn(batch, kv_heads, capacity, head_dim, device=DEVICE, dtype=dtype)
    prefix = torch.tensor([1, 63, 200, capacity - width])
    tree = _random_tree_mask(batch, width, prefix)
    mask = fold_mask_for_gqa(tree.dense(capacity), heads // kv_heads)
    ref = cache_attention(q.double(), k.double(), v.double(), mask)
    out = tree_attention(q, k, v, tree.prefix, tree.local)
    assert (out.double() - ref).norm() / ref.norm() < _tolerance(dtype)


def test_forward_with_tree_kernel_matches_dense_mask(tiny_model):
    """A verify-shaped forward through the tree kernel (TreeMask) gives the logits of the
    same forward with the equivalent dense mask (SDPA), padded width bucket included."""
    from fastdecode.model.load import load_model

    directory, _ = tiny_model("qwen2")
    model = load_model(directory, dtype=torch.float32, device=DEVICE, progress=False).model
    torch.manual_seed(4)
    batch, prompt, width, capacity = 3, 11, 6, 40
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (batch, prompt), device=DEVICE)
    prefix = torch.tensor([11, 7, 9], device=DEVICE)
    tree = _random_tree_mask(batch, width, prefix.cpu()).padded(8)
    tokens = torch.randint(0, vocab, (batch, 8), device=DEVICE)
    slots = prefix[:, None] + torch.arange(8, device=DEVICE)
    positions = prefix[:, None] + tree.local.sum(-1) - 1  # depth in the tree
    outputs = []
    for use_kernel in (False, True):
        cache = model.new_cache(batch, capacity)
        model.forward(prompts, torch.arange(prompt, device=DEVICE).expand(batch, -1), cache)
        model.decode_kernel = use_kernel
        mask = tree if use_kernel else tree.dense(capacity)
        outputs.append(model.forward(tokens, positions, cache, slots=slots, mask=mask))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-4)


def test_snapkv_fused_decode_appends_like_the_generic_step(tiny_model):
    """SnapKV never evicts while decoding, so its compacted cache decodes with the dense
    fused kernel (slot = filled, RoPE at the true position): same logits, K/V, slot
    positions as its generic per-token insert + masked attention, with unequal prompts."""
    from fastdecode.kv.policies import KVPolicyConfig
    from fastdecode.kv.sparse import SparseKVCache
    from fastdecode.model.fused_decode import FusedDecodeStep
    from fastdecode.model.load import load_model

    directory, _ = tiny_model("qwen2")
    model = load_model(directory, dtype=torch.float32, device=DEVICE, progress=False).model
    cfg = model.config
    torch.manual_seed(3)
    lengths, steps, budget = torch.tensor([40, 8, 31], device=DEVICE), 6, 12
    policy = KVPolicyConfig("snapkv", budget, {"window": 4}).build(context=40 + steps)
    caps = [policy.capacity(i, 40, steps) for i in range(cfg.num_layers)]

    def new_cache():
        return SparseKVCache(policy, caps, 3, cfg.num_kv_heads, cfg.head_dim, torch.float32, DEVICE)

    generic, fused = new_cache(), new_cache()
    assert fused.dense_reads
    tokens = torch.randint(0, cfg.vocab_size, (3, 40 + steps), device=DEVICE)
    positions = torch.arange(40, device=DEVICE).expand(3, 40)
    for cache in (generic, fused):
        model.forward(tokens[:, :40], positions, cache, logit_index=lengths - 1, prefill=True)
    assert fused.filled.tolist() == [12, 8, 12]  # a short row keeps its whole prompt
    step = FusedDecodeStep(model, compile=False)
    for t in range(steps):
        pos = lengths + t
        token = tokens[torch.arange(3), pos]
        ref = model.forward(token[:, None], pos[:, None], generic)[:, 0]
        out = step(token, pos, fused)
        assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert torch.equal(generic.filled, fused.filled)
    for layer in range(cfg.num_layers):
        assert torch.equal(generic.pos[layer], fused.pos[layer])
        live = fused.pos[layer] >= 0
        for a, b in ((generic.k, fused.k), (generic.v, fused.v)):
            assert torch.allclose(a[layer][live], b[layer][live], atol=1e-5)
