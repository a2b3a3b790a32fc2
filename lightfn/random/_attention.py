"""Attention with dropout written as plain tensor ops, for :func:`lightfn.random.rng_scope`.

torch draws attention dropout inside aten from its global generator, which is not part of
a train state, so a step using it is not a function of its state. On CPU, SDPA with
``dropout_p > 0`` also runs a math kernel that upcasts to float32 with autocast excluded;
under ``torch.func.grad`` autocast re-enters below the grad level, the forward mixes
dtypes, and the backward fails ("expected scalar type BFloat16 but found Float", while
``.backward()`` is fine). Written as plain ops, each one is autocast at the grad level like
any other op, and the dropout mask comes from a key.

``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer`` / ``DecoderLayer``) calls
``F.multi_head_attention_forward``, whose SDPA call a ``TorchFunctionMode`` cannot see (a
mode is switched off while it handles a call), so the whole function is rebuilt here when
its dropout is active; with dropout off torch's own function runs unchanged.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import StepError

__all__ = ["sdpa", "multi_head_attention", "bind_mha"]

Drop = Callable[[torch.Tensor, float], torch.Tensor]

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_MHA_NAMES = tuple(_MHA_SIGNATURE.parameters)
_MHA_DEFAULTS = {n: p.default for n, p in _MHA_SIGNATURE.parameters.items() if p.default is not inspect.Parameter.empty}


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    drop: Drop,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with its dropout done by ``drop(probs, p)``.

    Scores and softmax are float32 (as torch's math kernel computes them); the weighted
    sum is in ``v``'s dtype. A fully masked row attends to nothing (zeros, as torch does),
    not NaN.
    """
    if enable_gqa and k.dim() > 2 and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    scores = (q @ k.transpose(-2, -1)).float() * scale
    mask = attn_mask
    if is_causal:
        if mask is not None:
            raise StepError("scaled_dot_product_attention: pass attn_mask or is_causal=True, not both")
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    attn = torch.softmax(scores, dim=-1)
    if mask is not None:
        attn = torch.where(torch.isneginf(scores).all(-1, keepdim=True), torch.zeros_like(attn), attn)
    attn = drop(attn, dropout_p)
    return attn.to(v.dtype) @ v


def bind_mha(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``F.multi_head_attention_forward``'s arguments by name, defaults filled in."""
    bound = dict(_MHA_DEFAULTS)
    bound.update(zip(_MHA_NAMES, args))
    bound.update(kwargs)
    return bound


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # MHA's masks: True (or a float) marks what is NOT attended; as an additive float mask.
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise StepError(f"nn.MultiheadAttention masks must be bool or floating point, got {mask.dtype}")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _in_projection(a: dict[str, Any], embed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    query, key, value = a["query"], a["key"], a["value"]
    bias = a["in_proj_bias"]
    if a["use_separate_proj_weight"]:
        bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
        return (F.linear(query, a["q_proj_weight"], bq), F.linear(key, a["k_proj_weight"], bk),
                F.linear(value, a["v_proj_weight"], bv))
    w = a["in_proj_weight"]
    if key is value and query is key:  # self-attention: one matmul, as torch does
        out = F.linear(query, w, bias).unflatten(-1, (3, embed)).movedim(-2, 0).contiguous()
        return out[0], out[1], out[2]
    wq, wk, wv = w.chunk(3)
    bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
    if key is value:
        kv = F.linear(key, torch.cat([wk, wv]), None if bias is None else torch.cat([bk, bv]))
        kv = kv.unflatten(-1, (2, embed)).movedim(-2, 0).contiguous()
        return F.linear(query, wq, bq), kv[0], kv[1]
    return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)


def multi_head_attention(a: dict[str, Any], drop: Drop) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.multi_head_attention_forward`` on bound arguments (see :func:`bind_mha`), with
    its attention dropout done by ``drop(probs, p)``. Inputs are sequence-first
    ``(L, N, E)`` or unbatched ``(L, E)``, as torch's function takes them."""
    query, heads = a["query"], a["num_heads"]
    batched = query.dim() == 3
    kpm = a["key_padding_mask"]
    if not batched:
        # Separate tensors from here on, as in torch (which then projects q, k, v apart).
        a = {**a, "query": query.unsqueeze(1), "key": a["key"].unsqueeze(1), "value": a["value"].unsqueeze(1)}
        kpm = kpm.unsqueeze(0) if kpm is not None else None
    tgt_len, bsz, embed = a["query"].shape
    if embed != a["embed_dim_to_check"] or embed % heads:
        raise StepError(f"nn.MultiheadAttention got embedding size {embed}; expected {a['embed_dim_to_check']}, divisible by num_heads={heads}")
    head_dim = embed // heads
    dtype = a["query"].dtype
    kpm = _additive(kpm, dtype)
    mask, causal = a["attn_mask"], a["is_causal"]
    if causal and mask is None:
        raise StepError("nn.MultiheadAttention: is_causal=True needs attn_mask (e.g. nn.Transformer.generate_square_subsequent_mask)")
    if causal and kpm is None and not a["need_weights"]:
        mask = None  # the hint lets attention build the causal mask itself
    else:
        mask, causal = _additive(mask, dtype), False
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)

    q, k, v = _in_projection(a, embed)
    if a["bias_k"] is not None:
        k = torch.cat([k, a["bias_k"].repeat(1, bsz, 1)])
        v = torch.cat([v, a["bias_v"].repeat(1, bsz, 1)])
        mask = F.pad(mask, (0, 1)) if mask is not None else None
        kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
    q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = a["static_k"] if a["static_k"] is not None else k.reshape(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
    v = a["static_v"] if a["static_v"] is not None else v.reshape(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
    if a["add_zero_attn"]:
        k = torch.cat([k, k.new_zeros(bsz * heads, 1, head_dim)], dim=1)
        v = torch.cat([v, v.new_zeros(bsz * heads, 1, head_dim)], dim=1)
        mask = F.pad(mask, (0, 1)) if mask is not None else None
        kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
    src_len = k.shape[1]
    if kpm is not None:
        kpm = kpm.reshape(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
        mask = kpm if mask is None else mask + kpm
    p = float(a["dropout_p"]) if a["training"] else 0.0

    weights = None
    if a["need_weights"]:
        q = q * math.sqrt(1.0 / head_dim)
        scores = torch.bmm(q, k.transpose(-2, -1)) if mask is None else torch.baddbmm(mask, q, k.transpose(-2, -1))
        weights = drop(torch.softmax(scores, dim=-1), p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed)
        weights = weights.reshape(bsz, heads, tgt_len, src_len)
        if a["average_attn_weights"]:
            weights = weights.mean(dim=1)
    else:
        if mask is not None:
            mask = mask.unsqueeze(0) if mask.shape[0] == 1 else mask.reshape(bsz, heads, -1, src_len)
        out = sdpa(q.reshape(bsz, heads, tgt_len, head_dim), k.reshape(bsz, heads, src_len, head_dim),
                   v.reshape(bsz, heads, src_len, head_dim), attn_mask=mask, dropout_p=p, drop=drop, is_causal=causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed)
    out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"]).reshape(tgt_len, bsz, -1)
    if not batched:
        out = out.squeeze(1)
        weights = weights.squeeze(0) if weights is not None else None
    return out, weights
