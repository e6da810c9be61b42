"""Conditioning: what the text side hands the UNet, one named type for every family.

SD1/SD2 condition on a cross-attention sequence only; SDXL adds a vector (the pooled text embedding and the
size/crop embeddings). The caches and the trainer handle both through the helpers here and never look inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class Cond:
    crossattn: torch.Tensor  # [B, tokens, width]: the text encoders' hidden states
    vector: Optional[torch.Tensor] = None  # [B, features]: SDXL's pooled text + size/crop embeddings

    @property
    def batch_size(self) -> int:
        return self.crossattn.shape[0]

    @property
    def shape(self) -> Tuple[Tuple[int, ...], Optional[Tuple[int, ...]]]:
        """Conditionings of one shape concatenate into a batch."""
        return tuple(self.crossattn.shape), None if self.vector is None else tuple(self.vector.shape)

    def tensors(self) -> List[torch.Tensor]:
        return [self.crossattn] if self.vector is None else [self.crossattn, self.vector]

    def to(self, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> "Cond":
        vector = None if self.vector is None else self.vector.to(device=device, dtype=dtype)
        return Cond(self.crossattn.to(device=device, dtype=dtype), vector)

    def isfinite(self) -> bool:
        return all(bool(torch.isfinite(tensor).all()) for tensor in self.tensors())

    def as_sgm(self) -> Dict[str, torch.Tensor]:
        """The dict sgm's DiffusionEngine passes to its UNet wrapper ({crossattn, vector})."""
        return {"crossattn": self.crossattn} if self.vector is None else \
            {"crossattn": self.crossattn, "vector": self.vector}

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        """One batch from conditionings of one shape (see `shape`)."""
        vectors = [cond.vector for cond in conds]
        vector = None if vectors[0] is None else torch.cat(vectors)
        return Cond(torch.cat([cond.crossattn for cond in conds]), vector)
