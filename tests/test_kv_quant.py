"""The `quant` KV policy (KIVI 2/4-bit + ZipCache salient tokens): the token-planar packing
and quantization error bounds, the cache against exact attention (flushes that fill part of
a packed tile included), the Triton kernel against the PyTorch reference (TRITON_INTERPRET=1
on CPU: float32 exact, and the fp16 path with its offset codes), its PTX bit tricks
(emulated), real memory savings, the engine, bad options.

    python -m pytest -q tests/test_kv_quant.py        (on a GPU the kernel runs compiled)
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import assert_prefill_and_decode_match_dense, with_policy  # noqa: E402

from fastdecode import SamplingParams  # noqa: E402
from fastdecode.kv.policies import KVPolicyConfig  # noqa: E402
from fastdecode.kv.policies.quant import QuantPolicy  # noqa: E402
from fastdecode.kv.quant import QuantKVCache, quant_attention_reference  # noqa: E402
from fastdecode.kv.quantize import (  # noqa: E402
    PLANE,
    dequantize_keys,
    dequantize_values,
    pack,
    quantize_keys,
    quantize_values,
    tile_tokens,
    unpack,
)
from fastdecode.kv.step import StepContext  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5 if DEVICE == "cpu" else 5e-3  # the CUDA kernel's fp32 dots run in tf32
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs the triton package"
)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("channel_major", [False, True])
def test_pack_roundtrip_and_error_bounds(bits, channel_major):
    torch.manual_seed(0)
    tile, dim = tile_tokens(bits), 24
    codes = torch.randint(0, 2**bits, (3, 2 * tile + 5, dim), dtype=torch.uint8)  # partial tile
    packed = pack(codes, bits, channel_major)
    assert packed.shape == ((3, 3, dim, PLANE) if channel_major else (3, 3, PLANE, dim))
    back = unpack(packed, bits, channel_major)
    assert torch.equal(back[:, : codes.shape[1]], codes)
    assert not back[:, codes.shape[1] :].any()  # zero padding
    # token-planar: byte (row r, channel d) of tile t holds token t*tile + i*PLANE + r at
    # bits [i*bits, (i+1)*bits); values store the tile transposed ([d, r])
    for t, i, r, d in [(0, 0, 0, 0), (1, 8 // bits - 1, 3, 7), (1, 1, 15, 23)]:
        byte = packed[0, t, d, r] if channel_major else packed[0, t, r, d]
        code = (int(byte) >> (i * bits)) & (2**bits - 1)
        assert code == int(codes[0, t * tile + i * PLANE + r, d])

    k = torch.randn(2, 3, 64, 16) * torch.linspace(0.1, 8, 16)  # outlier channels
    v = torch.randn(2, 3, 64, 16)
    kq, ks, kz = quantize_keys(k, bits, 32, torch.float32)
    vq, vs, vz = quantize_values(v, bits, 8, torch.float32)
    k_err = (dequantize_keys(kq, ks, kz, bits, 32) - k).abs()
    v_err = (dequantize_values(vq, vs, vz, bits, 8) - v).abs()
    # round to nearest: at most half a step of the group's own range (+ float slack)
    assert (k_err <= ks.repeat_interleave(32, 2) / 2 + 1e-5).all()
    assert (v_err <= vs.repeat_interleave(8, -1) / 2 + 1e-5).all()


def test_salient_tokens_do_not_widen_key_range():
    k = torch.randn(1, 1, 32, 16)
    k[0, 0, 5] = 100.0  # one outlier token
    _, wide, _ = quantize_keys(k, 2, 32, torch.float32)
    exclude = torch.zeros(1, 1, 32, dtype=torch.bool)
    exclude[0, 0, 5] = True
    _, narrow, _ = quantize_keys(k, 2, 32, torch.float32, exclude)
    assert (narrow < wide / 10).all()


# -- the cache driven directly (one layer), against exact attention over the same K/V --


def _cache(batch, kv_heads, context, prompt_len, head_dim=16, dtype=torch.float32, **opts):
    policy = QuantPolicy(1, **opts)
    return QuantKVCache(policy, 1, batch, kv_heads, context, prompt_len, head_dim, dtype, DEVICE)


def _exact(q, k_all, v_all, positions):
    """Causal attention of q [B, Hq, T, D] at positions [B, T] over k_all [B, Hkv, P, D]."""
    group = q.shape[1] // k_all.shape[1]
    k, v = (x.repeat_interleave(group, 1) for x in (k_all, v_all))
    visible = torch.arange(k.shape[2], device=k.device)[None, None, :] <= positions[:, :, None]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None])


def _run(cache, lengths, steps, heads=4, kv_heads=2, head_dim=16, seed=0):
    """Prefill right-padded prompts of `lengths`, then `steps` decode steps; yields each
    step's (output, exact output, positions, q)."""
    torch.manual_seed(seed)
    batch, width = len(lengths), max(lengths)
    total = width + steps
    k_all = torch.randn(batch, kv_heads, total, head_dim, device=DEVICE)
    v_all = torch.randn(batch, kv_heads, total, head_dim, device=DEVICE)
    q = torch.randn(batch, heads, width, head_dim, device=DEVICE)
    pos = torch.arange(width, device=DEVICE).expand(batch, width)
    rows = torch.arange(batch, device=DEVICE)[:, None]
    lens = torch.tensor(lengths, device=DEVICE)
    step = StepContext(pos, pos, rows, None, None, True, lens)
    cache.store_and_attend(0, q, k_all[:, :, :width], v_all[:, :, :width], step)
    for i in range(steps):
        positions = (lens + i)[:, None]
        # the token at each row's position (rows are shorter than the padded prompt)
        index = positions[:, None, :, None].expand(-1, kv_heads, -1, head_dim)
        k_new, v_new = k_all.gather(2, index), v_all.gather(2, index)
        qd = torch.randn(batch, heads, 1, head_dim, device=DEVICE)
        step = StepContext(positions, positions, rows, None, None, False, None)
        out = cache.store_and_attend(0, qd, k_new, v_new, step)
        yield out, _exact(qd, k_all, v_all, positions), positions, qd


def test_window_covering_context_is_exact():
    """With residual >= context nothing is quantized: full attention (float32)."""
    cache = _cache(3, 2, context=60, prompt_len=40, group=16, residual=64, salient=0.1)
    for out, ref, _, _ in _run(cache, [40, 23, 7], steps=20):
        torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    assert int(cache.layers[0].nq.max()) == 0


@pytest.mark.parametrize("bits,tol", [(4, 0.15), (2, 0.6)])
def test_quantized_attention_is_close(bits, tol):
    cache = _cache(3, 2, context=200, prompt_len=150, bits=bits, group=16, residual=16)
    errors = []
    for out, ref, _, _ in _run(cache, [150, 97, 40], steps=40):
        errors.append(float((out - ref).norm() / ref.norm()))
    nq = cache.layers[0].nq
    # flushed one whole group at a time: R..R+G-1 recent tokens stay in full precision
    assert nq.tolist() == [(n + 40 - 16) // 16 * 16 for n in (150, 97, 40)]
    assert max(errors) < tol


@pytest.mark.parametrize("bits", [2, 4])
def test_flushes_fill_packed_tiles_plane_by_plane(bits):
    """Groups of 16 tokens are smaller than a packed tile (64 tokens at 2 bits, 32 at 4):
    each flush rewrites only its planes. Every quantized, non-salient position must still
    dequantize to its own token within half a step (an overwritten plane would not)."""
    torch.manual_seed(1)
    batch, kv_heads, dim, total = 2, 2, 16, 230
    cache = _cache(batch, kv_heads, context=total, prompt_len=70, bits=bits, group=16,
                   residual=16, salient=0.05)  # fmt: skip
    lay, spec = cache.layers[0], cache.spec
    k_all = torch.randn(batch, kv_heads, total, dim, device=DEVICE) * 3
    v_all = torch.randn(batch, kv_heads, total, dim, device=DEVICE)
    lens = torch.tensor([70, 41], device=DEVICE)
    pos = torch.arange(70, device=DEVICE).expand(batch, 70)
    rows = torch.arange(batch, device=DEVICE)[:, None]
    q = torch.randn(batch, 4, 70, dim, device=DEVICE)
    step = StepContext(pos, pos, rows, None, None, True, lens)
    cache.store_and_attend(0, q, k_all[:, :, :70], v_all[:, :, :70], step)
    for i in range(total - 71):
        p = (lens + i)[:, None]
        index = p[:, None, :, None].expand(-1, kv_heads, -1, dim)
        step = StepContext(p, p, rows, None, None, False, None)
        cache.store_and_attend(0, q[:, :, :1], k_all.gather(2, index), v_all.gather(2, index), step)
    k = dequantize_keys(lay.kq, lay.ks, lay.kz, bits, spec.group)
    v = dequantize_values(lay.vq, lay.vs, lay.vz, bits, spec.vgroup)
    salient = (lay.sal[..., None] >> torch.arange(8, device=DEVICE, dtype=torch.uint8)) & 1
    salient = salient.flatten(-2).bool()
    assert (lay.nq % spec.tile != 0).all()  # every row ends inside a packed tile
    for b in range(batch):
        n = int(lay.nq[b])
        keep = ~salient[b, :, :n]  # [H, n]
        k_step = lay.ks[b].repeat_interleave(spec.group, 1)[:, :n]
        v_step = lay.vs[b].repeat_interleave(spec.vgroup, -1)[:, :n]
        k_err = (k[b, :, :n] - k_all[b, :, :n]).abs()
        v_err = (v[b, :, :n] - v_all[b, :, :n]).abs()
        assert (k_err <= k_step / 2 + 1e-4)[keep].all()
        assert (v_err <= v_step / 2 + 1e-4).all()


@needs_triton
@pytest.mark.parametrize(
    "bits,group,head_dim", [(2, 16, 32), (2, 64, 64), (4, 16, 64), (4, 128, 32)]
)
def test_triton_flush_matches_pytorch(bits, group, head_dim):
    """The one-launch Triton flush (used on CUDA) writes exactly what the PyTorch flush
    writes (same codes, scales, planes, freed ring slots, nq), outside the trash block."""
    caches = []
    for fused in (False, True):
        cache = _cache(2, 2, context=420, prompt_len=150, head_dim=head_dim, bits=bits,
                       group=group, residual=16, salient=0.05)  # fmt: skip
        cache.triton_flush = fused
        list(_run(cache, [150, 61], steps=260, head_dim=head_dim))
        caches.append(cache)
    spec = caches[0].spec
    live = spec.slots - spec.block  # the trash block: PyTorch writes it, Triton skips it
    limits = {"kq": live // spec.tile, "vq": live // spec.tile, "ks": live // group,
              "kz": live // group, "vs": live, "vz": live}  # fmt: skip
    assert int(caches[0].layers[0].nq.min()) >= 256
    for name, ref in vars(caches[0].layers[0]).items():
        got = getattr(caches[1].layers[0], name)
        if name in limits:
            ref, got = ref[:, :, : limits[name]], got[:, :, : limits[name]]
        assert torch.equal(ref, got), name


def test_high_precision_salient_tokens_reduce_error():
    """ZipCache: keeping the most-attended prompt tokens in full precision helps when a
    few tokens dominate attention (a strong sink-like key)."""
    errors = {}
    for salient in (0.0, 0.1):
        cache = _cache(2, 2, context=140, prompt_len=128, group=16, residual=16, salient=salient)
        lay = cache.layers[0]
        torch.manual_seed(3)
        k = torch.randn(2, 2, 128, 16, device=DEVICE)
        k[:, :, 3] *= 12  # an attention sink
        v, q = torch.randn(2, 2, 128, 16, device=DEVICE), torch.randn(2, 4, 128, 16, device=DEVICE)
        pos = torch.arange(128, device=DEVICE).expand(2, 128)
        rows = torch.arange(2, device=DEVICE)[:, None]
        step = StepContext(
            pos, pos, rows, None, None, True, torch.tensor([128, 128], device=DEVICE)
        )
        cache.store_and_attend(0, q, k, v, step)
        qd = q[:, :, -1:] * 3
        positions = torch.full((2, 1), 127, device=DEVICE)
        out = quant_attention_reference(qd, lay, cache.spec, positions)
        errors[salient] = float((out - _exact(qd, k, v, positions)).norm())
        if salient:
            assert (lay.fpos[:, :, : cache.spec.salient] == 3).any(-1).all()  # sink kept
    assert errors[0.1] < errors[0.0]


def test_multi_token_step_and_window_limit():
    cache = _cache(1, 2, context=100, prompt_len=50, group=16, residual=16)
    lay = cache.layers[0]
    list(_run(cache, [50], steps=0))
    k, v, q = (
        torch.randn(1, 2, 8, 16, device=DEVICE),
        torch.randn(1, 2, 8, 16, device=DEVICE),
        torch.randn(1, 4, 8, 16, device=DEVICE),
    )
    positions = torch.arange(50, 58, device=DEVICE)[None]
    step = StepContext(
        positions, positions, torch.zeros(1, 1, dtype=torch.long, device=DEVICE), None, None
    )
    assert cache.store_and_attend(0, q, k, v, step).shape == (1, 4, 8, 16)
    assert int(lay.nq[0]) == 32
    big = torch.arange(58, 78, device=DEVICE)[None]
    with pytest.raises(ValueError, match="residual"):
        cache.store_and_attend(
            0,
            torch.randn(1, 4, 20, 16, device=DEVICE),
            torch.randn(1, 2, 20, 16, device=DEVICE),
            torch.randn(1, 2, 20, 16, device=DEVICE),
            StepContext(big, big, torch.zeros(1, 1, dtype=torch.long, device=DEVICE), None, None),
        )


# -- the Triton kernel against the PyTorch reference --


@needs_triton
@pytest.mark.parametrize(
    "bits,head_dim,group,heads,kv_heads,sms",
    [
        (2, 64, 16, 14, 2, 1),  # GQA group 7; key groups smaller than a tile (per plane)
        (4, 32, 16, 4, 2, 1),  # two value groups of 16 channels
        (2, 64, 64, 7, 1, 64),  # a key group per tile; many slices (sms override)
        (4, 64, 128, 14, 2, 64),  # a key group spans tiles
    ],
)
def test_triton_kernel_matches_reference(bits, head_dim, group, heads, kv_heads, sms, monkeypatch):
    from fastdecode.kv import triton_quant
    from fastdecode.kv.triton_quant import launch_shape, quant_decode_attention

    monkeypatch.setattr(triton_quant, "MIN_SPLIT_BYTES", 1)  # short slices at this size

    cache = _cache(3, kv_heads, context=400, prompt_len=300, head_dim=head_dim, bits=bits,
                   group=group, residual=16, salient=0.05)  # fmt: skip
    *_, (_, _, positions, q) = _run(
        cache, [300, 97, 9], steps=3, heads=heads, kv_heads=kv_heads, head_dim=head_dim
    )
    lay = cache.layers[0]
    assert int(lay.nq.min()) == 0 and int(lay.nq.max()) > 0  # an empty and a quantized row
    assert (lay.sal > 0).any()
    lay.fpos[2, :, -1] = 399  # a stale (rolled-back) entry beyond the query: ignored
    if sms > 1:  # the slices really split the rows
        shape = launch_shape(cache.spec, 3, kv_heads, lay.fk.shape[2], head_dim, sms)
        assert shape[1] > 2 and shape[3] > 1
    ref = quant_attention_reference(q.double(), lay, cache.spec, positions)
    out = quant_decode_attention(q, lay, cache.spec, positions[:, 0].to(torch.int32), sms=sms)
    assert (out.double() - ref).norm() / ref.norm() < TOL


@needs_triton
@pytest.mark.parametrize("bits", [2, 4])
def test_triton_kernel_16bit_path(bits):
    """16-bit models: codes enter the tensor cores as fp16 1024 + code * 2**(bits*i), q*s
    and p*s as fp16; the offsets are removed exactly (interpreted here, minus the PTX)."""
    from fastdecode.kv.triton_quant import quant_decode_attention

    cache = _cache(2, 2, context=400, prompt_len=300, head_dim=64, dtype=torch.float16,
                   bits=bits, group=64, residual=16, salient=0.05)  # fmt: skip
    torch.manual_seed(0)
    lay = cache.layers[0]
    *_, (_, _, positions, q) = _run(cache, [300, 170], steps=3, heads=14, head_dim=64)
    k_offset = torch.randn(64, device=DEVICE) * 20  # a large per-channel key offset: q.zero
    lay.kz.add_(k_offset.to(lay.kz.dtype))
    q16 = q.to(torch.float16)
    ref = quant_attention_reference(q16.double(), lay, cache.spec, positions)
    out = quant_decode_attention(q16, lay, cache.spec, positions[:, 0].to(torch.int32), sms=16)
    assert (out.double() - ref).norm() / ref.norm() < 3e-3


@pytest.mark.parametrize("bits", [2, 4])
def test_ptx_planes_match_masks(bits):
    """The PTX that splits 4 packed bytes into fp16 planes, run on an emulator of its three
    instructions for every byte value: plane i of byte x reads 1024 + (x & mask_i), and
    element k of the pack comes from byte k (low half of each register first)."""
    pytest.importorskip("triton")
    from fastdecode.kv.triton_quant import planes_ptx

    per = 8 // bits
    ptx = planes_ptx(bits)
    for start in range(0, 256, 4):
        data = bytes([start, start + 1, start + 2, start + 3])
        regs = {f"${2 * per}": int.from_bytes(data, "little")}
        for line in ptx.splitlines():
            op, *args = line.replace(",", " ").replace(";", "").split()
            if op == "prmt.b32":
                d, a, b, sel = args
                pool = regs[a].to_bytes(4, "little") + int(b, 0).to_bytes(4, "little")
                sel = int(sel, 0)
                out = bytes(pool[(sel >> (4 * k)) & 7] for k in range(4))
                regs[d] = int.from_bytes(out, "little")
            elif op == "and.b32":
                d, a, imm = args
                regs[d] = regs[a] & int(imm, 0)
            else:
                assert op in ("{", "}", ".reg"), op
        for i in range(per):
            mask = (2**bits - 1) << (bits * i)
            halves = []
            for j in range(2):
                word = regs[f"${2 * i + j}"]
                halves += [word & 0xFFFF, word >> 16]
            values = torch.tensor(halves, dtype=torch.int16).view(torch.float16).float()
            expect = torch.tensor([1024.0 + (x & mask) for x in data])
            assert torch.equal(values, expect)


# -- memory --


@pytest.mark.parametrize("bits,minimum", [(2, 5.0), (4, 3.2)])
def test_nbytes_is_really_smaller(bits, minimum):
    """bf16 model, Qwen2.5-0.5B head shape, 8K context: 16 bits -> `bits` + 0.5 bit of fp16
    scale/zero (keys: per channel per 64 tokens; values: per token per 64 channels) + the
    full-precision window of R + G tokens."""
    layers, heads, context, dim = 2, 2, 8192, 64
    policy = QuantPolicy(1, bits=bits, group=64, residual=128, salient=0.0)
    cache = QuantKVCache(policy, layers, 1, heads, context, 8000, dim, torch.bfloat16, "cpu")
    dense = 2 * layers * heads * context * dim * 2
    ratio = dense / cache.nbytes()
    assert minimum < ratio < 16 / (bits + 0.5)
    salient = QuantPolicy(1, bits=bits, group=64, residual=128, salient=0.02)
    with_fp = QuantKVCache(salient, layers, 1, heads, context, 8000, dim, torch.bfloat16, "cpu")
    extra = layers * heads * salient.salient_count(8000) * (2 * dim * 2 + 4)  # K, V, position
    assert with_fp.nbytes() - cache.nbytes() == extra


# -- options --


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"bits": 3}, "bits"),
        ({"group": 24}, "group"),
        ({"group": 8}, "group"),
        ({"residual": 0}, "residual"),
        ({"salient": 1.5}, "salient"),
        ({"window": 0}, "window"),
    ],
)
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        KVPolicyConfig.from_any({"name": "quant", **opts}).build(context=100)


def test_budget_larger_than_context_is_rejected():
    with pytest.raises(ValueError, match="larger than the context"):
        KVPolicyConfig.from_any({"name": "quant", "budget": 500}).build(context=100)


# -- the engine --


def test_engine_exact_when_window_covers_context(tiny_model):
    from fastdecode.model.load import load_model

    directory, _ = tiny_model("llama")
    model = load_model(directory, dtype=torch.float32, device="cpu", progress=False).model
    policy = KVPolicyConfig("quant", 1.0, {"group": 16, "residual": 64})
    assert_prefill_and_decode_match_dense(model, policy, [[5, 6, 7, 8, 9], [3, 4]], steps=4)


def test_engine_greedy_agrees_at_4_bits(tiny_llm):
    prompt = [3 + (i * 7) % 120 for i in range(120)]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    dense = tiny_llm.generate([prompt, prompt[:77]], params)
    quant = with_policy(
        tiny_llm, KVPolicyConfig("quant", 1.0, {"bits": 4, "group": 16, "residual": 16})
    )
    out = quant.generate([prompt, prompt[:77]], params)
    assert isinstance(quant.runner.cache, QuantKVCache)
    assert int(quant.runner.cache.layers[0].nq.min()) > 0  # really read quantized KV
    for a, b in zip(dense, out, strict=True):
        assert a.token_ids[:4] == b.token_ids[:4]
