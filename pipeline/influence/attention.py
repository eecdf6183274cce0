"""nn.MultiheadAttention with its projections where hooks can see them.

torch's MultiheadAttention hands its weights to `F.multi_head_attention_forward`, which
does the q/k/v in-projection and the out-projection inside, out of reach of module hooks.
While the tracker captures, it swaps the module's forward for `attention_forward`: the same
in-projection matmuls as torch's (same calls, same operands), run here so their inputs and
outputs can be watched, then torch's own functional for everything between (heads, masks,
bias_k / bias_v, zero attention, dropout) with identity projection weights, then out_proj
as torch applies it ([T*B, E] matmul). Identity matmuls copy exactly, so the output equals
torch's slow path bit for bit; they cost an extra E x E matmul per watched projection
during capture only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# (sequence-first input, part name, projection output) -> the output to use instead.
WatchIn = Callable[[torch.Tensor, str, torch.Tensor], torch.Tensor]
# (sequence-first out_proj input [T, B, E], its output [T, B, E]) -> the output to use.
WatchOut = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sequence_first(query, key, value):
    """batch_first inputs as [T, B, E], keeping which of them are the same tensor."""
    if key is value:
        if query is key:
            query = key = value = query.transpose(1, 0)
        else:
            query, key = (x.transpose(1, 0) for x in (query, key))
            value = key
    else:
        query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    return query, key, value


def _in_projection(mha: nn.MultiheadAttention, query, key, value, watch: WatchIn):
    """q, k, v by the matmuls torch's functional would do, each output watched."""
    e, bias = mha.embed_dim, mha.in_proj_bias
    b = bias.chunk(3) if bias is not None else (None, None, None)
    if not mha._qkv_same_embed_dim:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        return tuple(
            watch(x, part, F.linear(x, w, bb))
            for x, part, w, bb in zip((query, key, value), "qkv", weights, b, strict=True)
        )
    weight = mha.in_proj_weight
    if key is value and query is key:
        proj = watch(query, "qkv", F.linear(query, weight, bias))
        return proj[..., :e], proj[..., e : 2 * e], proj[..., 2 * e :]
    q = watch(query, "q", F.linear(query, weight[:e], b[0]))
    if key is value:
        kv_bias = bias[e:] if bias is not None else None
        kv = watch(key, "kv", F.linear(key, weight[e:], kv_bias))
        return q, kv[..., :e], kv[..., e:]
    k = watch(key, "k", F.linear(key, weight[e : 2 * e], b[1]))
    v = watch(value, "v", F.linear(value, weight[2 * e :], b[2]))
    return q, k, v


def attention_forward(
    mha: nn.MultiheadAttention, watch_in: WatchIn | None, watch_out: WatchOut | None
) -> Callable:
    """A forward for `mha` equal to its own, exposing the watched projections."""
    e = mha.embed_dim

    def forward(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if mha.batch_first and batched:
            query, key, value = _sequence_first(query, key, value)
        eye = torch.eye(e, dtype=query.dtype, device=query.device)
        if watch_in is not None:
            query, key, value = _in_projection(mha, query, key, value, watch_in)
            projection = dict(in_proj_weight=None, in_proj_bias=None, separate=True)
            projection.update(q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye)
        else:
            projection = dict(
                in_proj_weight=mha.in_proj_weight,
                in_proj_bias=mha.in_proj_bias,
                separate=not mha._qkv_same_embed_dim,
                q_proj_weight=mha.q_proj_weight,
                k_proj_weight=mha.k_proj_weight,
                v_proj_weight=mha.v_proj_weight,
            )
        out_weight, out_bias = (
            (eye, None) if watch_out is not None else (mha.out_proj.weight, mha.out_proj.bias)
        )
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            e,
            mha.num_heads,
            projection["in_proj_weight"],
            projection["in_proj_bias"],
            mha.bias_k,
            mha.bias_v,
            mha.add_zero_attn,
            mha.dropout,
            out_weight,
            out_bias,
            training=mha.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=projection["separate"],
            q_proj_weight=projection["q_proj_weight"],
            k_proj_weight=projection["k_proj_weight"],
            v_proj_weight=projection["v_proj_weight"],
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if watch_out is not None:
            heads = out
            out = F.linear(heads.reshape(-1, e), mha.out_proj.weight, mha.out_proj.bias)
            out = watch_out(heads, out.view(heads.shape))
        if mha.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

    return forward
