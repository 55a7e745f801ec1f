"""Per-image BatchNorm statistics: the rule (which layers, what share) and its PyTorch twin.

Every BatchNorm of the ResNet trunks normalises with its running (reference) statistics mixed with the image's
own, ``μ = (1 − α)·μ_ref + α·μ_img``, ``σ² = (1 − α)·σ²_ref + α·σ²_img`` (per image and channel, over the
feature map's pixels; Schneider et al., NeurIPS 2020). α may differ by stage: the stem and ``layer1`` see colour
and exposure most directly. ``export.image_bn`` builds the same thing into an exported graph and is checked
against ``mixed_image_bn`` (parity gate); its docstring derives the folded form.

torch is imported only by ``mixed_image_bn``: the rule is shared with the torch-free graph code.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Sequence

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
TRUNKS = ("branch_a.", "branch_b.", "net.")  # the dual models' trunks (nn.Sequential) and the ResNet baselines'


def stage_of(module: str) -> int | None:
    """Stage index (0 = stem … 4 = layer4) of a trunk module name (``branch_a.4.0.conv1``, ``net.layer2.0.bn1``,
    ``net.conv1``), or None for a module outside the trunks. In a dual model's trunk Sequential, children 0–3 are
    conv1, bn1, relu, maxpool and 4–7 are layer1–layer4 (``model.TRUNK_LAYERS``)."""
    if not module.startswith(TRUNKS):
        return None
    rest = module.split(".", 1)[1]
    if module.startswith("net."):
        m = re.match(r"layer(\d)\.", rest)
        return int(m.group(1)) if m else 0
    child = int(rest.split(".", 1)[0])
    return child - 3 if child >= 4 else 0


def stage_alphas(alpha: float | Sequence[float]) -> tuple[float, ...]:
    """One α per stage: a single number for all, or one per stage (stem, layer1 … layer4). Raises ValueError."""
    values = (float(alpha),) * len(STAGES) if isinstance(alpha, (int, float)) else tuple(float(a) for a in alpha)
    if len(values) != len(STAGES):
        raise ValueError(f"alpha: one number, or {len(STAGES)} ({', '.join(STAGES)}); got {len(values)}")
    if not all(0.0 <= a < 1.0 for a in values):
        raise ValueError(f"alpha: each in [0, 1) (the image's share of the statistics), got {values}")
    return values


def _mixed_forward(bn, alpha: float):
    import torch

    def forward(x):
        mu_i = x.mean(dim=(2, 3))
        var_i = x.var(dim=(2, 3), unbiased=False)
        mu = (1 - alpha) * bn.running_mean + alpha * mu_i
        var = (1 - alpha) * bn.running_var + alpha * var_i
        scale = bn.weight / torch.sqrt(var + bn.eps)
        return (x - mu[:, :, None, None]) * scale[:, :, None, None] + bn.bias[None, :, None, None]
    return forward


@contextlib.contextmanager
def mixed_image_bn(model, alpha: float | Sequence[float]) -> Iterator[int]:
    """Within the block, the trunks' BatchNorm2d layers of MODEL use mixed statistics (eval mode only), at
    ``stage_alphas(alpha)``. Yields the number of layers changed."""
    import torch.nn as nn

    alphas = stage_alphas(alpha)
    bns = []
    for name, m in model.named_modules():
        stage = stage_of(name)
        if isinstance(m, nn.BatchNorm2d) and stage is not None and alphas[stage] > 0:
            m.forward = _mixed_forward(m, alphas[stage])
            bns.append(m)
    try:
        yield len(bns)
    finally:
        for m in bns:
            del m.forward
