"""LoRA for attention held as one fused `nn.MultiheadAttention` (OpenCLIP's text towers: SD2's, SDXL's second).

Such a layer keeps q, k and v as the three thirds of `in_proj_weight` and applies `out_proj.weight` itself,
without calling `out_proj`, so no forward hook can reach the projections. A kohya file still names them apart
(`..._self_attn_q_proj`, `_k_proj`, `_v_proj`, `_out_proj`), and the WebUI's built-in Lora merges them as

    in_proj_weight + [dq; dk; dv],  out_proj.weight + dout,  d = up @ down * (alpha / rank) * multiplier.

While attached, the attention computes the same thing in bypass form, the base projection plus the adapter's
low-rank path (`LoRAModule`, dropout on its input, fp32 weights), then heads, masks and softmax as
`F.multi_head_attention_forward` does, with explicit F.* calls. Bypass rather than a merged weight: dropout on the
adapter's input has no merged form, and backward keeps rank-sized activations instead of a full weight per layer.

`attach_fused_attention` installs that forward on the instance and the handle's `remove()` deletes it again,
so the class forward is back as it was and the layer is bit-identical. The installed forward never calls the class
forward, which the WebUI's built-in Lora replaces process-wide to merge the prompt's LoRAs into these weights.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("q", "k", "v", "out")
# An adapter as the attention calls it: (projection input, multiplier) -> the update to add (a LoRAModule).
ProjectionAdapter = Callable[[torch.Tensor, float], torch.Tensor]


class FusedAttentionError(ValueError):
    """An attention layer that cannot take the fused adapter; the message says what to do."""


@dataclass(frozen=True, eq=False)
class FusedProjection:
    """The target of one kohya stem inside a fused attention: its q, k or v third of `in_proj_weight`, or `out`."""

    attention: nn.MultiheadAttention
    part: str  # one of PROJECTIONS

    def __post_init__(self):
        if self.part not in PROJECTIONS:
            raise FusedAttentionError(f"projection {self.part!r} is not one of {PROJECTIONS}")
        attention = self.attention
        if not attention._qkv_same_embed_dim or attention.bias_k is not None or attention.add_zero_attn:
            raise FusedAttentionError("only self-attention with one in_proj_weight (no kdim/vdim, bias_k or "
                                      "add_zero_attn) takes a fused LoRA adapter; leave this layer out of the targets")

    @property
    def in_features(self) -> int:
        return self.attention.embed_dim

    @property
    def out_features(self) -> int:
        return self.attention.embed_dim


class FusedAttentionOverride:
    """The attached state of one attention layer; remove() gives the layer back its class forward."""

    def __init__(self, attention: nn.MultiheadAttention):
        self._attention = attention

    def remove(self) -> None:
        if self._attention is not None:
            del self._attention.forward
            self._attention = None


def attach_fused_attention(attention: nn.MultiheadAttention, adapters: Dict[str, ProjectionAdapter],
                           multiplier: Callable[[], float]) -> FusedAttentionOverride:
    """Makes `attention` run with the adapters of its projections (a subset of PROJECTIONS) until remove().

    Raises:
        FusedAttentionError: the layer already has an instance forward (another network is attached to it).
    """
    if "forward" in attention.__dict__:
        raise FusedAttentionError("this attention layer already runs an instance forward (is another LoRA network "
                                  "attached to the model?); detach that one first")
    attention.forward = functools.partial(lora_attention, attention, adapters, multiplier)
    return FusedAttentionOverride(attention)


def lora_attention(attention: nn.MultiheadAttention, adapters: Dict[str, ProjectionAdapter],
                   multiplier: Callable[[], float], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                   attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                   is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """nn.MultiheadAttention.forward (same arguments and results) with each adapter's update on its projection."""
    batched = query.dim() == 3
    if batched and attention.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    elif not batched:
        query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
    scale = multiplier()
    weights = attention.in_proj_weight.chunk(3)
    biases = attention.in_proj_bias.chunk(3) if attention.in_proj_bias is not None else (None,) * 3
    q, k, v = (_projected(x, weight, bias, adapters.get(part), scale)
               for x, weight, bias, part in zip((query, key, value), weights, biases, PROJECTIONS))
    causal = is_causal and key_padding_mask is None and not need_weights  # the hint, as torch takes it
    mask = None if causal else _additive_mask(attn_mask, key_padding_mask, query.shape[1], attention.num_heads,
                                              query.dtype)
    dropout = attention.dropout if attention.training else 0.0
    mixed, probabilities = _attend(q, k, v, attention.num_heads, mask, dropout, need_weights, causal)
    output = _projected(mixed, attention.out_proj.weight, attention.out_proj.bias, adapters.get("out"), scale)
    if probabilities is not None and average_attn_weights:
        probabilities = probabilities.mean(dim=1)
    if not batched:
        return output.squeeze(1), probabilities.squeeze(0) if probabilities is not None else None
    return (output.transpose(0, 1) if attention.batch_first else output), probabilities


def _projected(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               adapter: Optional[ProjectionAdapter], multiplier: float) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return y if adapter is None else y + adapter(x, multiplier).to(y.dtype)


def _additive_mask(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor], batch: int,
                   heads: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """One float mask broadcastable to [batch, heads, L, S]: boolean masks give -inf where True, floats add."""
    masks = []
    if attn_mask is not None:
        mask = _as_float(attn_mask, dtype)
        masks.append(mask if mask.dim() == 2 else mask.view(batch, heads, *mask.shape[-2:]))
    if key_padding_mask is not None:
        masks.append(_as_float(key_padding_mask, dtype).view(batch, 1, 1, -1))
    return functools.reduce(torch.add, masks) if masks else None


def _as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: Optional[torch.Tensor],
            dropout: float, need_weights: bool, causal: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scaled dot-product attention over heads: q [L, N, E], k and v [S, N, E] -> [L, N, E] (and [N, H, L, S])."""
    length, batch, width = q.shape
    q, k, v = (x.reshape(x.shape[0], batch, heads, width // heads).permute(1, 2, 0, 3) for x in (q, k, v))
    if need_weights:
        scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
        probabilities = (scores if mask is None else scores + mask).softmax(dim=-1)
        probabilities = F.dropout(probabilities, dropout) if dropout else probabilities
        mixed = probabilities @ v
    else:
        probabilities = None
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    return mixed.permute(2, 0, 1, 3).reshape(length, batch, width), probabilities
