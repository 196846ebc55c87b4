"""Every attention backend equals the eager reference on packed rows (documents laid side by side, padding, grouped
key/value heads), forward and backward: on the CPU where the backend runs there, on a GPU (marked ``gpu``) where it
needs one. ``varlen``'s wiring (the flattened layout, cumulative lengths, causality, padding) is checked on the CPU
against a stand-in for torch's CUDA kernel that follows its documented contract segment by segment."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import torch.nn.attention.varlen as torch_varlen
import torch.nn.functional as F

from lit_internvl.components import Decoder, LanguageConfig
from lit_internvl.components.attention import VarlenMask, attention, make_mask, set_attention_backend

# Two rows: row 0 packs documents of 5, 9 and 3 tokens then 3 padding tokens (document id -1, as the packing
# collator writes); row 1 is one document of 14 tokens and 6 padding tokens.
DOCUMENTS = torch.tensor([[0] * 5 + [1] * 9 + [2] * 3 + [-1] * 3, [0] * 14 + [-1] * 6])
PADDING = (DOCUMENTS >= 0).long()


def _qkv(device="cpu", dtype=torch.float32, heads=4, kv_heads=2, dim=16, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    batch, length = DOCUMENTS.shape
    shapes = ((batch, heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim))
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_(requires_grad) for s in shapes]


def _run(backend, causal, device="cpu", dtype=torch.float32, backward=True):
    """Output and input gradients of one backend on the packed rows; the upstream gradient is zero at padding."""
    q, k, v = _qkv(device, dtype, requires_grad=backward)
    documents, padding = DOCUMENTS.to(device), PADDING.to(device)
    mask = make_mask(backend, causal=causal, attention_mask=padding, document_ids=documents)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex on the CPU warns that it runs unfused
        out = attention(q, k, v, mask, is_causal=causal, backend=backend)
    real = padding.bool()[:, None, :, None]
    out = out.masked_fill(~real, 0.0)  # padding outputs are nobody's concern
    if not backward:
        return out.float(), None
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    grads = torch.autograd.grad((out * upstream).sum(), (q, k, v))
    return out.float(), [g.float() for g in grads]


def _assert_equal_to_eager(backend, causal, device="cpu", dtype=torch.float32, atol=1e-5, backward=True):
    out, grads = _run(backend, causal, device, dtype, backward)
    ref, ref_grads = _run("eager", causal, device, dtype, backward)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    if backward:
        for got, expected in zip(grads, ref_grads):
            torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def _stand_in_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
    """torch's ``varlen_attn`` by its docstring: (T, H, D) tokens, segments at ``cu_seq_*`` (int32), each attending
    within itself, causal for ``window_size=(-1, 0)``."""
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    lengths = (cu_seq_q[1:] - cu_seq_q[:-1]).tolist()
    assert max(lengths) <= max_q and sum(lengths) == q.shape[0]
    assert window_size in ((-1, -1), (-1, 0)) and enable_gqa == (q.shape[1] != k.shape[1])
    pieces = []
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=window_size == (-1, 0), enable_gqa=enable_gqa)
        pieces.append(out[0].transpose(0, 1))
    return torch.cat(pieces)


@pytest.fixture
def stand_in_varlen(monkeypatch):
    monkeypatch.setattr(torch_varlen, "varlen_attn", _stand_in_varlen_attn)


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_equals_eager_on_packed_rows_forward_and_backward(causal):
    _assert_equal_to_eager("sdpa", causal)


@pytest.mark.parametrize("causal", [True, False])
def test_flex_equals_eager_on_packed_rows_forward(causal):
    _assert_equal_to_eager("flex", causal, backward=False)  # flex has no backward on the CPU


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_wiring_equals_eager_on_packed_rows_forward_and_backward(causal, stand_in_varlen):
    _assert_equal_to_eager("varlen", causal)


def test_varlen_mask_lists_the_segments_of_documents_and_padding():
    mask = make_mask("varlen", causal=True, attention_mask=PADDING, document_ids=DOCUMENTS)
    assert isinstance(mask, VarlenMask) and mask.causal
    # row 0: 5, 9, 3, padding 3; row 1 (starting at 20): 14, padding 6
    assert mask.cu_seqlens.tolist() == [0, 5, 14, 17, 20, 34, 40]
    assert mask.max_length == 16  # a bound: the next power of two of the longest (14), at most the row (20)
    assert mask.keep.tolist() == PADDING.flatten().bool().tolist()
    # padding alone (no documents) splits each row into its real tokens and its padding
    mask = make_mask("varlen", causal=False, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert mask.cu_seqlens.tolist() == [0, 3, 4, 8] and not mask.causal
    # nothing masked: no mask, as sdpa (the flash path of one sequence a row)
    assert make_mask("varlen", causal=True, attention_mask=torch.ones(2, 5, dtype=torch.long)) is None


def test_decoder_on_varlen_equals_eager_on_packed_rows(stand_in_varlen):
    """The whole decoder (RoPE positions restarting per document, GQA) through the varlen path."""
    torch.manual_seed(0)
    decoder = Decoder(LanguageConfig.from_name("tiny", attn_backend="eager")).eval()
    ids = torch.randint(0, 256, DOCUMENTS.shape)
    positions = torch.zeros(DOCUMENTS.shape)
    for row in range(DOCUMENTS.shape[0]):
        for doc in DOCUMENTS[row].unique():
            where = DOCUMENTS[row] == doc
            positions[row, where] = torch.arange(int(where.sum()), dtype=torch.float32)
    kwargs = dict(attention_mask=PADDING, positions=positions, document_ids=DOCUMENTS)
    reference = decoder(ids, **kwargs)
    varlen = set_attention_backend(decoder, "varlen")(ids, **kwargs)
    real = PADDING.bool()
    torch.testing.assert_close(varlen[real], reference[real], atol=1e-5, rtol=0)


def test_sdpa_reads_grouped_heads_without_repeating_them(monkeypatch):
    """GQA through SDPA, mask or not, passes the Hkv heads as they are (enable_gqa), with no repeat_interleave."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", lambda *a, **k: calls.append(a) or pytest.fail("repeat"))
    q, k, v = (t.detach() for t in _qkv())
    mask = make_mask("sdpa", causal=True, attention_mask=PADDING, document_ids=DOCUMENTS)
    assert attention(q, k, v, mask, is_causal=True, backend="sdpa").shape == q.shape and not calls


# -- on a GPU ---------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["sdpa", "flex", "varlen", "xformers"])
@pytest.mark.parametrize("causal", [True, False])
def test_every_backend_equals_eager_on_a_gpu_forward_and_backward(backend, causal):
    if backend == "xformers" and importlib.util.find_spec("xformers") is None:
        pytest.skip("xformers is not installed")
    if backend == "varlen" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        pytest.skip("this torch has no varlen attention")
    _assert_equal_to_eager(backend, causal, device="cuda", dtype=torch.bfloat16, atol=3e-2)


def test_incremental_decoding_on_varlen_equals_the_full_forward(stand_in_varlen):
    """Generation with a KV cache on a varlen model: the cached steps run SDPA with a dense mask."""
    from lit_internvl.components.language import KVCache

    torch.manual_seed(0)
    decoder = Decoder(LanguageConfig.from_name("tiny", attn_backend="varlen")).eval()
    ids, padding = torch.randint(0, 256, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    padding[1, 6:] = 0
    full = decoder(ids, attention_mask=padding)
    cache = KVCache(len(decoder.layers))
    first = decoder(ids[:, :6], attention_mask=padding[:, :6], cache=cache)
    rest = decoder(ids[:, 6:7], attention_mask=padding[:, :7], cache=cache)
    torch.testing.assert_close(first, full[:, :6], atol=1e-5, rtol=0)
    torch.testing.assert_close(rest[0], full[0, 6:7], atol=1e-5, rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_varlen_refuses_float32_on_a_gpu_with_a_message():
    q, k, v = _qkv("cuda", requires_grad=False)
    mask = make_mask("varlen", causal=True, attention_mask=PADDING.cuda(), document_ids=DOCUMENTS.cuda())
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        attention(q, k, v, mask, is_causal=True, backend="varlen")
