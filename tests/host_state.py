"""What "the host model is exactly as it was" means in tests: tensors, flags, modes and hooks, compared."""

from __future__ import annotations

import torch


def snapshot(model: torch.nn.Module):
    """Everything a job must give back: tensors (values and memory layout), requires_grad and training flags,
    ldm's checkpoint flags."""
    return ({k: (v.clone(), v.stride()) for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()},
            {n: (getattr(m, "checkpoint", None), getattr(m, "use_checkpoint", None)) for n, m in model.named_modules()})


def assert_same_model(model: torch.nn.Module, before) -> None:
    state, grads, modes, flags = snapshot(model)
    assert state.keys() == before[0].keys()
    assert [k for k in state if not torch.equal(state[k][0], before[0][k][0])] == []
    assert [k for k in state if state[k][1] != before[0][k][1]] == []
    assert grads == before[1] and modes == before[2] and flags == before[3]
    assert [n for n, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__] == []
