import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lightfn as lf
from lightfn.random import _attention as A
from lightfn import random as R

E, H, L, S, N = 8, 2, 3, 5, 4


def _mha_case(batched, self_attn, separate, bias_kv, zero_attn, mask_kind, kpm_kind):
    kdim = 6 if separate else None
    m = nn.MultiheadAttention(E, H, add_bias_kv=bias_kv, add_zero_attn=zero_attn, kdim=kdim, vdim=kdim)
    q = torch.randn(L, N, E) if batched else torch.randn(L, E)
    if self_attn:
        k = v = q
    else:
        k = torch.randn(S, N, kdim or E) if batched else torch.randn(S, kdim or E)
        v = k if not separate else k.clone()
    src = L if self_attn else S
    mask = {None: None, "bool": torch.rand(L, src) > 0.7, "float": torch.randn(L, src),
            "float3": torch.randn(N * H if batched else H, L, src)}[mask_kind]
    kpm_shape = (N, src) if batched else (src,)
    kpm = {None: None, "bool": torch.rand(kpm_shape) > 0.7, "float": torch.randn(kpm_shape)}[kpm_kind]
    if kpm is not None and kpm.dtype == torch.bool:
        kpm[..., 0] = False  # no fully padded row: torch gives NaN there
    args = (q, k, v, E, H, m.in_proj_weight, m.in_proj_bias, m.bias_k, m.bias_v, zero_attn, 0.0,
            m.out_proj.weight, m.out_proj.bias)
    kw = dict(training=True, key_padding_mask=kpm, attn_mask=mask)
    if separate:
        kw.update(use_separate_proj_weight=True, q_proj_weight=m.q_proj_weight, k_proj_weight=m.k_proj_weight,
                  v_proj_weight=m.v_proj_weight)
    return args, kw


@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
def test_multi_head_attention_matches_torch_over_its_options(need_weights, average):
    torch.manual_seed(0)
    cases = 0
    for batched, self_attn, separate, bias_kv, zero_attn, mask_kind, kpm_kind in itertools.product(
        (True, False), (True, False), (False, True), (False, True), (False, True),
        (None, "bool", "float", "float3"), (None, "bool", "float"),
    ):
        if self_attn and separate:
            continue
        if mask_kind and kpm_kind and (mask_kind == "bool") != (kpm_kind == "bool"):
            continue  # torch deprecates mixing mask kinds
        args, kw = _mha_case(batched, self_attn, separate, bias_kv, zero_attn, mask_kind, kpm_kind)
        kw.update(need_weights=need_weights, average_attn_weights=average)
        with torch.no_grad():
            ref = F.multi_head_attention_forward(*args, **kw)
            got = A.multi_head_attention(A.bind_mha(args, kw), lambda x, p: x)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6, equal_nan=True)  # fully masked rows
        assert (got[1] is None) == (ref[1] is None)
        if ref[1] is not None:
            torch.testing.assert_close(got[1], ref[1], rtol=1e-6, atol=1e-6, equal_nan=True)
        cases += 1
    assert cases > 200


def test_causal_hint_matches_torch():
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(N, L, E)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    ref = m(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
    with R.rng_scope(R.key(0)):  # dropout 0: torch's own function runs
        same = m(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
    args = (x.transpose(0, 1),) * 3 + (E, H, m.in_proj_weight, m.in_proj_bias, None, None, False, 0.0,
                                       m.out_proj.weight, m.out_proj.bias)
    kw = dict(attn_mask=causal, is_causal=True, need_weights=False)
    got = A.multi_head_attention(A.bind_mha(args, kw), lambda t, p: t)[0].transpose(0, 1)
    torch.testing.assert_close(same, ref, rtol=0, atol=0)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("need_weights", [False, True])
def test_multi_head_attention_dropout_is_keyed_and_unbiased(need_weights):
    # nn.MultiheadAttention's inner SDPA/dropout is invisible to a TorchFunctionMode: without
    # the rebuilt function its dropout drew from torch's global RNG inside a step.
    torch.manual_seed(0)
    m = nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True).train()
    x = torch.randn(1, L, E).expand(4000, L, E)  # one sequence, 4000 independent masks

    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        with R.rng_scope(R.key(seed)):
            return m(x, x, x, need_weights=need_weights)[0]

    a = run(1, 0)
    assert torch.equal(a, run(1, 123))  # independent of the global generator
    assert not torch.equal(a, run(2, 0))
    assert not torch.allclose(a[0], a[1])  # rows get different masks
    m.eval()
    ref = m(x[:1], x[:1], x[:1], need_weights=need_weights)[0][0]
    # E[dropout(probs)] = probs and attention is linear in probs after the softmax
    torch.testing.assert_close(a.mean(0), ref, rtol=0, atol=0.03)


def test_transformer_layer_gradients_in_bf16_mixed_track_float32_with_the_same_masks():
    # Keyed masks depend only on the key: a bf16-mixed step and a 32-true step drop the same
    # entries, so their gradients differ only by rounding (bf16 flips a few ReLUs: torch's
    # own kernels without dropout differ by up to 15% in norm on linear1 here; a wrong mask
    # or scale would be ~100%).
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.2, batch_first=True).train()
    apply, params = lf.functionalize(layer)
    x, y = torch.randn(4, 5, 16), torch.randn(4, 5, 16)

    def grads(precision):
        def loss_fn(p, batch):
            return ((apply(p, batch[0]).float() - batch[1]) ** 2).mean()
        opt = lf.optim.sgd(1.0)
        step = lf.train_step(loss_fn, opt, precision=precision, grad_transform=lambda g: seen.append(g) or g)
        seen: list = []
        step(lf.TrainState.create(params=params, optimizer=opt, seed=3), (x, y))
        return seen[0]

    full, mixed = grads("32-true"), grads("bf16-mixed")
    for name in full:
        assert ((mixed[name] - full[name]).norm() / full[name].norm()).item() < 0.25, name
