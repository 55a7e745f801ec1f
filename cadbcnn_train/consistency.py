"""Consistency with the starting model (``fit --init MODEL.onnx --consistency W``): fine-tune for robustness
without forgetting what the starting model knew.

A robust fine-tune of the released file learns to survive stain, exposure and scale shifts but loses 1–2 points
of clean accuracy (docs/SHIFT.md, the stage-1 runs). Here the starting model, frozen, is the teacher: it sees the
*clean* training image, the model being trained sees the augmented one, and the loss adds
``W · KL(teacher(clean) ‖ model(augmented))`` to the label's cross-entropy (knowledge distillation, Hinton et
al. 2015, with the teacher's view un-augmented as in consistency training, e.g. AugMix's clean-vs-augmented
term, Hendrycks et al. 2020). The teacher's answer on the clean image is what the model should give on every
augmented copy of it: the augmentation has to become invisible, and the clean answers stay the released ones.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def teacher_of(model: nn.Module) -> nn.Module:
    """A frozen copy of MODEL (eval mode, no gradients): the starting point's answers, fixed for the run."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def consistency_loss(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(softmax(teacher) ‖ softmax(logits)), mean over the batch; zero when the two agree. Gradients reach
    ``logits`` only."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), F.log_softmax(teacher_logits.detach().float(), dim=1),
                    reduction="batchmean", log_target=True)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, clean: Tensor) -> Tensor:
    return teacher(clean)
