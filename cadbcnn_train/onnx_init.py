"""Weights read back from an exported ONNX file into the PyTorch model: ``cadbcnn-train fit --init MODEL.onnx``.

A lab that holds only the released ONNX file can fine-tune it. The exporter folds each BatchNorm into the
convolution before it (``W' = W·γ/√(σ²+ε)``, ``b' = β − μ·γ/√(σ²+ε)``), stores large weights as FP16 behind a
Cast, and writes Linear weights transposed into MatMul constants named only by their bias. ``load_onnx_weights``
undoes all three:

- Conv: its (folded) weight and bias; the BatchNorm after it becomes an identity carrying the bias
  (``μ = 0``, ``σ² = 1``, ``γ = √(1+ε)``, ``β = b'``), so the model computes exactly what the graph computes;
- MatMul + Add(``model.X.bias``): the Linear ``X`` (weight transposed back); Gemm: the head; LayerNorm: scale/bias;
- every parameter and buffer of the model must be covered (a different architecture is refused).

``rederive_batchnorm`` then gives each of those BatchNorms real statistics of local images without changing
the function in eval mode (``μ, σ²`` measured, ``γ = √(σ²+ε)``, ``β = b' + μ``), so training-mode batch
statistics start where the released model is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cadbcnn_runtime.errors import CheckpointError

PREFIX = "model."   # with an OOD head the exporter wraps the classifier as ``model`` (beside ``ood``)


def _consts(proto) -> dict[str, np.ndarray]:
    """Every constant tensor: initializers, and the FP32 outputs of Casts that read one (FP16-stored weights)."""
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Cast" and n.input[0] in out:
            out[n.output[0]] = out[n.input[0]].astype(np.float32)
    return out


def onnx_parameters(path: Path) -> dict[str, np.ndarray]:
    """The model's (folded) parameters in an exported ONNX file, keyed like the PyTorch modules:
    ``branch_a.0`` → {"weight", "bias"} for a Conv, ``fusion.attn_ab.q`` for a Linear, and so on."""
    import onnx

    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 (protobuf raises many kinds)
        raise CheckpointError(f"--init {path}: not a readable ONNX file ({exc})") from None
    consts = _consts(proto)
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found: dict[str, dict[str, np.ndarray]] = {}
    shared: list[dict[str, np.ndarray]] = []  # LayerNorms whose parameters another LayerNorm's name holds
    prefix = PREFIX if any(i.name.startswith(PREFIX) for i in proto.graph.initializer) else ""

    def module(name: str) -> str:
        return name[len(prefix):].rsplit(".", 1)[0]

    def ours(name: str) -> bool:  # a parameter name of the classifier (not the OOD head, not anonymous)
        return name.startswith(prefix) and not name.startswith("ood.") and "." in name

    for n in proto.graph.node:
        if n.op_type == "Conv" and ours(n.input[1]):
            entry = {"weight": consts[n.input[1]]}
            if len(n.input) > 2 and n.input[2]:
                entry["bias"] = consts[n.input[2]]
            found[module(n.input[1])] = entry
        elif n.op_type == "Gemm" and ours(n.input[1]):
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            w = consts[n.input[1]]
            found[module(n.input[1])] = {"weight": w if trans_b else w.T, "bias": consts[n.input[2]]}
        elif n.op_type == "MatMul" and n.input[1] in consts and not n.input[1].startswith("ood."):
            add = next((m for m in consumers.get(n.output[0], []) if m.op_type == "Add"), None)
            bias = next((i for i in (add.input if add else []) if ours(i) and i.endswith(".bias")), None)
            if bias is not None:
                found[module(bias)] = {"weight": consts[n.input[1]].T, "bias": consts[bias]}
        elif n.op_type == "LayerNormalization" and ours(n.input[1]):
            entry = {"weight": consts[n.input[1]], "bias": consts[n.input[2]]}
            if module(n.input[1]) in found:  # the exporter shares identical initializers (e.g. two fresh norms)
                shared.append(entry)
            else:
                found[module(n.input[1])] = entry
    if not found:
        raise CheckpointError(f"--init {path}: no cadbcnn weights found (was it written by cadbcnn-export?)")
    if shared:
        found[SHARED] = shared  # type: ignore[assignment]
    return found


SHARED = "<shared layer norms>"


def _conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """conv module name → the BatchNorm registered right after it (torchvision ResNet order: conv1/bn1, …)."""
    pairs, last_conv = {}, None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last_conv = name
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and last_conv is not None:
            pairs[last_conv] = name
            last_conv = None
    return pairs


@torch.no_grad()
def load_onnx_weights(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load the exported weights at PATH into MODEL (in place). Raises CheckpointError when they do not fit."""
    params = onnx_parameters(path)
    shared = params.pop(SHARED, [])
    modules = dict(model.named_modules())
    unnamed = [n for n, m in modules.items() if isinstance(m, nn.LayerNorm) and n not in params]
    for name, entry in zip(unnamed, shared):  # same values, so the order among them does not matter
        params[name] = entry
    pairs = _conv_bn_pairs(model)
    covered: set[str] = set()
    problems = []
    for name, entry in params.items():
        m = modules.get(name)
        if m is None:
            problems.append(f"{name} is not a module of this model")
            continue
        for key, value in entry.items():
            p = getattr(m, key, None)
            if p is None and key == "bias" and name in pairs:
                p = None  # folded BN bias: goes to the BatchNorm below
            elif p is None or tuple(p.shape) != value.shape:
                problems.append(f"{name}.{key}: shape {None if p is None else tuple(p.shape)} ≠ {value.shape}")
                continue
            if p is not None:
                p.copy_(torch.from_numpy(np.array(value, np.float32)))
                covered.add(f"{name}.{key}")
        if name in pairs:
            bn = modules[pairs[name]]
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.weight.fill_(float(np.sqrt(np.float32(1.0) + np.float32(bn.eps))))
            bn.bias.copy_(torch.from_numpy(np.array(entry.get("bias", np.zeros(bn.num_features)), np.float32)))
            covered.update(f"{pairs[name]}.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                                         "num_batches_tracked"))
    missing = [k for k in model.state_dict() if k not in covered]
    if missing:
        problems.append(f"{len(missing)} parameter(s) of the model are not in the file (e.g. {missing[:3]})")
    if problems:
        raise CheckpointError(f"--init {path}: its weights do not fit this model ({'; '.join(problems[:4])}). "
                              "Use the --model the file was trained with (the released model is cadbcnn).")
    return {"modules": len(params), "folded_batchnorms": sum(1 for n in params if n in pairs)}


@torch.no_grad()
def rederive_batchnorm(model: nn.Module, loader: DataLoader, device: torch.device, max_images: int = 512) -> int:
    """Give the identity BatchNorms of ``load_onnx_weights`` the statistics of local images, keeping the eval-mode
    function unchanged: per channel μ, σ² of the BN input measured, then γ = √(σ²+ε), β = β + μ.
    Returns the number of images used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    sums: dict[nn.Module, list] = {m: [0.0, 0.0, 0] for m in bns}

    def hook(m, inputs, _out):
        x = inputs[0].detach().double()
        s = sums[m]
        s[0] = s[0] + x.sum(dim=(0, 2, 3))
        s[1] = s[1] + (x * x).sum(dim=(0, 2, 3))
        s[2] += x.numel() // x.shape[1]

    handles = [m.register_forward_hook(hook) for m in bns]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for x, _ in loader:
            model(x.to(device))
            seen += len(x)
            if seen >= max_images:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for m, (s1, s2, n) in sums.items():
        if not n:
            continue
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        # the BN's current eval function is y = (x − rm)/√(rv+ε)·γ + β; keep it, with rm = mean, rv = var
        scale = m.weight.double() / torch.sqrt(m.running_var.double() + m.eps)
        shift = m.bias.double() - m.running_mean.double() * scale
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.weight.copy_(scale * torch.sqrt(var + m.eps))
        m.bias.copy_(shift + mean * scale)
    return seen


def frozen_modules(model: nn.Module, what: str) -> list[str]:
    """The names of the modules ``--freeze WHAT`` fixes: ``early`` = each branch's stem and first two stages,
    ``backbone`` = both branches entirely (only the fusion and the head learn)."""
    if what == "none":
        return []
    trunks = [n for n in ("branch_a", "branch_b") if hasattr(model, n)]
    if not trunks:
        raise CheckpointError(f"--freeze {what}: this model has no branches to freeze")
    names = []
    for t in trunks:
        parts = [n for n, _ in getattr(model, t).named_children()]
        keep = parts if what == "backbone" else parts[:6]  # stem conv, bn, relu, maxpool, layer1, layer2
        names += [f"{t}.{n}" for n in keep]
    return names


def freeze(model: nn.Module, what: str) -> list[str]:
    """Stop training ``frozen_modules(model, what)``. Frozen BatchNorms stay in eval mode (see
    ``keep_frozen_bn_eval``) and keep their statistics in precise BN (``train.recalibrate_bn(keep=…)``).
    Returns the frozen module names."""
    names = frozen_modules(model, what)
    for name in names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(False)
    return names


def keep_frozen_bn_eval(model: nn.Module) -> None:
    """After ``model.train()``: BatchNorms whose parameters are frozen keep their running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.weight.requires_grad:
            m.eval()


def _init_spec(path: str):
    from cadbcnn_runtime.spec import ModelSpec

    return ModelSpec.from_onnx(path)


def check_init_matches(cfg, class_names) -> None:
    """--init: the local dataset's classes and the image size must be the file's (refused before training)."""
    spec = _init_spec(cfg.init)
    if tuple(class_names) != tuple(spec.class_names):
        raise CheckpointError(f"--init {cfg.init}: the model's classes {list(spec.class_names)} ≠ this dataset's "
                              f"{list(class_names)}; name the class folders as in the model "
                              f"({', '.join((spec.training or {}).get('class_folders') or spec.class_names)})")
    if tuple(spec.image_size) != (cfg.image_size, cfg.image_size):
        raise CheckpointError(f"--init {cfg.init}: the model takes {spec.image_size[0]}×{spec.image_size[1]} images; "
                              f"pass --image-size {spec.image_size[0]}")


def init_provenance(path: str) -> dict[str, Any]:
    from cadbcnn_runtime._onnxmeta import file_sha256

    spec = _init_spec(path)
    return {"file": Path(path).name, "sha256": file_sha256(Path(path)), "name": spec.name, "version": spec.version}


def init_adaptation(path: str, dataset: str, images: int) -> tuple[dict[str, Any], ...]:
    """The fine-tuned model's ``adaptation`` record: the init file's own steps, then this fine-tune."""
    import datetime as dt

    spec = _init_spec(path)
    step = {"step": "fine-tune", "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            "init": init_provenance(path), "data": dataset, "images": images}
    return (*spec.adaptation, step)
