"""The optimizers and the EMA run their multi-tensor (foreach) code, the code cuda runs, on the CPU too, and it
equals their per-tensor code over a few steps within float tolerance, for every optimizer a recipe uses."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from timm.utils import ModelEmaV3

from fastrsb.config import EmaConfig, ModelConfig, OptimConfig
from fastrsb.model import create_ema, create_model
from fastrsb.op_count import OUTSIDE, OpCount
from fastrsb.optim import create_optimizer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# every recipe's optimizer, and AdamW (the config takes any timm name; AdamW is the common other choice)
RECIPE_OPTIMIZERS = sorted({(yaml.safe_load(p.read_text()).get("optim") or {}).get("name", OptimConfig.name)
                            for p in CONFIGS.glob("*.yaml")} | {"adamw"})


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(ModelConfig(name="resnet10t"), 10, torch.device("cpu"))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (4,), generator=g)


def _foreach_ops(ops: OpCount) -> list[str]:
    return [name for name in ops.ops[OUTSIDE] if name.startswith("aten._foreach_")]



def test_recipes_use_the_optimizers_tested_here():
    assert {"lamb", "sgd", "momentum", "adamw"} <= set(RECIPE_OPTIMIZERS)


@pytest.mark.parametrize("name", RECIPE_OPTIMIZERS)
def test_foreach_optimizer_equals_the_per_tensor_one(name):
    """fastrsb's optimizer steps with foreach ops on CPU tensors (torch and timm pick them on cuda only) and,
    given the same gradients, ends 3 steps with the weights of the same optimizer told to take its per-tensor
    path."""
    model, twin = _model(), _model()
    start = [p.detach().clone() for p in model.parameters()]
    cfg = OptimConfig(name=name, weight_decay=0.05)
    fast, slow = create_optimizer(model, cfg, 0.05), create_optimizer(twin, cfg, 0.05)
    for group in slow.param_groups:
        group["foreach"] = False
    for step in range(3):
        x, y = _batch(step)
        fast.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for p, q in zip(model.parameters(), twin.parameters()):  # the same gradients: the optimizers alone differ
            q.grad = p.grad.clone()
        counted = []
        for opt in (fast, slow):
            with OpCount() as ops:
                opt.step()
            counted.append(ops)
        # a proper superset: timm's LAMB takes the global grad norm with a foreach op on either path
        assert set(_foreach_ops(counted[0])) > set(_foreach_ops(counted[1]))
    for p, q, p0 in zip(model.parameters(), twin.parameters(), start):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # LAMB: ~1.5e-8 apart here, the others equal
    assert any(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), start))


def test_foreach_ema_equals_the_per_tensor_one():
    """fastrsb's EMA updates with one foreach lerp and ends 3 updates (weights and BN statistics moving) equal to
    timm's per-tensor EMA."""
    model = _model()
    ema, ref = create_ema(model, EmaConfig(enabled=True, decay=0.9)), ModelEmaV3(model, decay=0.9, foreach=False)
    for step in range(1, 4):
        with torch.no_grad():
            model(_batch(step)[0])  # train-mode BN: running statistics move
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)
        with OpCount() as ops:
            ema.update(model, step=step)
        ref.update(model, step=step)
        assert _foreach_ops(ops) == ["aten._foreach_lerp_"]
    torch.testing.assert_close(ema.module.state_dict(), ref.module.state_dict(), rtol=0, atol=0)  # to the bit
    assert not torch.equal(ema.module.conv1[0].weight, model.conv1[0].weight)


def test_a_checkpoint_keeps_the_foreach_path():
    """Loading optimizer state replaces the param groups whole: one saved before fastrsb asked for foreach (None:
    cuda only) still steps with it."""
    opt = create_optimizer(_model(), OptimConfig(name="lamb"), 1e-3)
    state = opt.state_dict()
    for group in state["param_groups"]:
        group["foreach"] = None
    opt.load_state_dict(state)
    assert [g["foreach"] for g in opt.param_groups] == [True, True]
