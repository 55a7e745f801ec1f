"""Exponential moving average of a model's weights (Polyak averaging, as in timm's ``ModelEma``).

The averaged weights are what validation sees, what ``best.pt`` and ``last.pt`` hold and what is exported: a
fine-tune at a fixed-ish learning rate swings several points of validation accuracy from epoch to epoch
(docs/SHIFT.md), and the average over the last few hundred steps is steadier than any single step's weights.
BatchNorm statistics are not averaged: they are copied from the live model and, with precise BN on (the
default), recomputed for the averaged weights before each validation.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEma:
    """``ema = WeightEma(model, decay)``; ``ema.update(model)`` after every optimiser step; ``ema.module`` is the
    averaged model. The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so a
    short run is not dominated by its first (e.g. random) weights."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.updates += 1

    def state(self) -> dict:
        """What a checkpoint stores to resume the average (the averaged weights are the checkpoint's model)."""
        return {"decay": self.decay, "updates": self.updates}

    def load(self, state_dict: dict, state: dict) -> None:
        self.module.load_state_dict(state_dict)
        self.updates = int(state["updates"])
