"""CADBCNN and its baselines. Pure: no I/O, keyword-only builders.

Layout follows timm: building blocks, the model classes, then thin builders
and a registry. Every model takes RGB images as uint8 (0–255) or float
(0–1) NCHW and normalises inside ``forward``, so an exported graph carries
mean/std and no caller can get them wrong. Every model has
``forward_features`` (pooled embedding) and ``forward_head`` (logits).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torchvision import models as tvm

# ImageNet statistics: one home, the spec module
from cadbcnn_runtime.spec import IMAGENET_MEAN, IMAGENET_STD


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------
class Normalize(nn.Module):
    """uint8 [0, 255] or float [0, 1] RGB → ImageNet-normalised float."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return (x - self.mean) / self.std


class CrossAttention(nn.Module):
    """Multi-head attention of ``query`` tokens over ``context`` tokens.

    Written with plain matmul/softmax (no fused kernels) so it exports to ONNX
    as real MatMul/Softmax operators with a dynamic batch axis.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)

    def _heads(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, H, N, D)
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def attention_weights(self, query: Tensor, context: Tensor) -> Tensor:
        q = self._heads(self.q(query)) * self.scale
        k = self._heads(self.k(context))
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # (B, H, Nq, Nk)

    def forward(self, query: Tensor, context: Tensor) -> Tensor:
        attn = self.attn_drop(self.attention_weights(query, context))
        out = attn @ self._heads(self.v(context))  # (B, H, Nq, D)
        return self.proj(out.transpose(1, 2).flatten(2))


class CrossAttentionFusion(nn.Module):
    """Bidirectional cross-attention between two branches' spatial tokens.

    Each branch's tokens are projected to ``dim``; A attends to B and B to A
    (queries from one branch, keys/values from the other), each with a
    residual connection and LayerNorm; the two token sets are mean-pooled and
    concatenated into a ``2 * dim`` embedding.
    """

    def __init__(self, in_a: int, in_b: int, *, dim: int = 256, num_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.proj_a = nn.Conv2d(in_a, dim, 1)
        self.proj_b = nn.Conv2d(in_b, dim, 1)
        self.attn_ab = CrossAttention(dim, num_heads, dropout)  # A queries B
        self.attn_ba = CrossAttention(dim, num_heads, dropout)  # B queries A
        self.norm_a = nn.LayerNorm(dim)
        self.norm_b = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.out_dim = 2 * dim

    def tokens(self, fa: Tensor, fb: Tensor) -> tuple[Tensor, Tensor]:
        return self.proj_a(fa).flatten(2).transpose(1, 2), self.proj_b(fb).flatten(2).transpose(1, 2)

    def fuse_tokens(self, ta: Tensor, tb: Tensor) -> tuple[Tensor, Tensor]:
        ya = self.norm_a(ta + self.drop(self.attn_ab(ta, tb)))
        yb = self.norm_b(tb + self.drop(self.attn_ba(tb, ta)))
        return ya, yb

    def forward(self, fa: Tensor, fb: Tensor) -> Tensor:
        ya, yb = self.fuse_tokens(*self.tokens(fa, fb))
        return torch.cat([ya.mean(1), yb.mean(1)], dim=1)


class ConcatFusion(nn.Module):
    """The paper's dual-branch baseline: pool each branch and concatenate."""

    def __init__(self, in_a: int, in_b: int):
        super().__init__()
        self.out_dim = in_a + in_b

    def forward(self, fa: Tensor, fb: Tensor) -> Tensor:
        return torch.cat([fa.mean((2, 3)), fb.mean((2, 3))], dim=1)


TRUNK_WIDTH = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
#: Names of a torchvision ResNet's children in the trunk Sequential (for loading ImageNet weights).
TRUNK_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def _resnet_trunk(arch: str) -> nn.Sequential:
    net = getattr(tvm, arch)(weights=None)
    return nn.Sequential(*(getattr(net, name) for name in TRUNK_LAYERS))


def _stage_maps(layers, names, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Run LAYERS (named NAMES) on X; the output of every ResNet stage (``layer1``…``layer4``) and the last output."""
    maps = {}
    for name, layer in zip(names, layers):
        x = layer(x)
        if name.startswith("layer"):
            maps[name] = x
    return maps, x


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------
class DualBranchNet(nn.Module):
    """Two ResNet trunks (ResNet18 + ResNet34 by default) and a fusion block.

    ``fusion="cross_attention"`` is CADBCNN; ``fusion="concat"`` is the
    paper's dual-branch model without cross-attention.
    """

    def __init__(self, *, num_classes: int, branches=("resnet18", "resnet34"), fusion: str = "cross_attention",
                 dim: int = 256, num_heads: int = 8, attn_dropout: float = 0.1, drop_rate: float = 0.2):
        super().__init__()
        self.normalize = Normalize()
        self.branch_a = _resnet_trunk(branches[0])
        self.branch_b = _resnet_trunk(branches[1])
        width_a, width_b = TRUNK_WIDTH[branches[0]], TRUNK_WIDTH[branches[1]]
        if fusion == "cross_attention":
            self.fusion = CrossAttentionFusion(width_a, width_b, dim=dim, num_heads=num_heads, dropout=attn_dropout)
        elif fusion == "concat":
            self.fusion = ConcatFusion(width_a, width_b)
        else:
            raise ValueError(f"unknown fusion {fusion!r}; use 'cross_attention' or 'concat'")
        self.num_features = self.fusion.out_dim
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_branches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Both trunks' last conv maps (B, 512, H/32, W/32) — Grad-CAM's targets."""
        x = self.normalize(x)
        return self.branch_a(x), self.branch_b(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """The fused, pooled embedding (B, num_features) — t-SNE's input."""
        return self.fusion(*self.forward_branches(x))

    def forward_stages(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """({"a_layer1": map, …, "b_layer4": map}, fused embedding): every stage's output of both trunks (a: the
        first, ResNet18; b: the second, ResNet34) and ``forward_features`` — in one pass, for the OOD score."""
        x = self.normalize(x)
        (ma, fa), (mb, fb) = (_stage_maps(branch, TRUNK_LAYERS, x) for branch in (self.branch_a, self.branch_b))
        maps = {**{f"a_{k}": v for k, v in ma.items()}, **{f"b_{k}": v for k, v in mb.items()}}
        return maps, self.fusion(fa, fb)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(self.head_drop(features))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class SingleBranchNet(nn.Module):
    """A torchvision classifier with normalisation inside (the baselines)."""

    def __init__(self, *, arch: str, num_classes: int, drop_rate: float = 0.2):
        super().__init__()
        self.normalize = Normalize()
        net = getattr(tvm, arch)(weights=None)
        if arch.startswith("resnet"):
            self.num_features = net.fc.in_features
            net.fc = nn.Identity()
        elif arch.startswith("efficientnet"):
            self.num_features = net.classifier[-1].in_features
            net.classifier = nn.Identity()
        else:
            raise ValueError(f"unsupported baseline architecture {arch!r}")
        self.net = net
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))

    def forward_stages(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """({"layer1": map, …}, features) for ResNets (no stages for other architectures), in one pass."""
        if not isinstance(self.net, tvm.ResNet):
            return {}, self.forward_features(x)
        names = (*TRUNK_LAYERS, "avgpool")
        maps, pooled = _stage_maps([getattr(self.net, n) for n in names], names, self.normalize(x))
        return maps, torch.flatten(pooled, 1)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(self.head_drop(features))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------
# Builders and registry
# ---------------------------------------------------------------------------
def cadbcnn(*, num_classes: int = 4, dim: int = 256, num_heads: int = 8, attn_dropout: float = 0.1,
            drop_rate: float = 0.2) -> DualBranchNet:
    """CADBCNN: ResNet18 + ResNet34 fused by bidirectional cross-attention."""
    return DualBranchNet(num_classes=num_classes, fusion="cross_attention", dim=dim, num_heads=num_heads,
                         attn_dropout=attn_dropout, drop_rate=drop_rate)


def dual_concat(*, num_classes: int = 4, drop_rate: float = 0.2) -> DualBranchNet:
    """ResNet18 + ResNet34 fused by concatenation (no attention)."""
    return DualBranchNet(num_classes=num_classes, fusion="concat", drop_rate=drop_rate)


def _single(arch: str) -> Callable[..., SingleBranchNet]:
    def build(*, num_classes: int = 4, drop_rate: float = 0.2) -> SingleBranchNet:
        return SingleBranchNet(arch=arch, num_classes=num_classes, drop_rate=drop_rate)

    build.__name__ = arch
    build.__doc__ = f"torchvision {arch} with normalisation inside and a {{num_classes}}-way head."
    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cadbcnn": cadbcnn,
    "dual_concat": dual_concat,
    "resnet18": _single("resnet18"),
    "resnet34": _single("resnet34"),
    "resnet50": _single("resnet50"),
    "efficientnet_b0": _single("efficientnet_b0"),
}

#: torchvision ImageNet weights each model's trunks would load with --pretrained imagenet.
PRETRAINED_SOURCES: dict[str, tuple[str, ...]] = {
    "cadbcnn": ("resnet18", "resnet34"),
    "dual_concat": ("resnet18", "resnet34"),
    "resnet18": ("resnet18",),
    "resnet34": ("resnet34",),
    "resnet50": ("resnet50",),
    "efficientnet_b0": ("efficientnet_b0",),
}


def create_model(name: str, *, num_classes: int, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
