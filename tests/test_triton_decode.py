"""The Triton decode-attention kernel against the SDPA reference (GPU only).

Run on a CUDA machine: python -m pytest -q tests/test_triton_decode.py
"""

import pytest
import torch

from fastdecode.kv.attention import cache_attention, decode_kernel_available, fold_mask_for_gqa

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not decode_kernel_available(torch.device("cuda")),
    reason="needs CUDA and Triton",
)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (12, 2, 128), (14, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_sdpa(heads, kv_heads, head_dim, dtype):
    torch.manual_seed(0)
    batch, capacity = 5, 1280
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, kv_heads, capacity, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(batch, kv_heads, capacity, head_dim, device="cuda", dtype=dtype)
    lengths = torch.tensor([1, 17, 256, 257, 1280], device="cuda")
    mask = torch.arange(capacity, device="cuda")[None, :] < lengths[:, None]
    mask = fold_mask_for_gqa(mask[:, None, None, :], heads // kv_heads)
    ref = cache_attention(q.double(), k.double(), v.double(), mask)
    out = cache_attention(q, k, v, None, lengths)
    err = (out.double() - ref).norm() / ref.norm()
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-3), err
