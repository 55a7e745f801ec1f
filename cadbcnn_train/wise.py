"""WiSE-FT: a fine-tune's weights interpolated toward the model it started from (Wortsman et al., CVPR 2022).

θ = (1 − α)·θ_start + α·θ_fine-tune, where θ_start is the released ONNX file the fine-tune was initialised from
(``fit --init``), read back into PyTorch the same way ``--init`` reads it (``load_onnx_weights``, BatchNorm
re-derived on clean training images). Both ends share one architecture, so every floating-point tensor is mixed
elementwise; the BatchNorm running statistics are then measured again on the mixed weights (precise BN, as
``recalibrate-bn``). α = 1 is the fine-tune, α = 0 the start. Calibration, OOD statistics and metrics are derived
from weights and are dropped: run ``calibrate``, ``fit-ood`` and ``evaluate`` on the result (``scripts/release.sh``).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cadbcnn_runtime.errors import ArgumentError, DatasetError
from cadbcnn_runtime.spec import ModelSpec

from . import data as D
from .checkpoint import load_checkpoint, resave_checkpoint, weights_sha256
from .onnx_init import frozen_modules, init_provenance, load_onnx_weights, rederive_batchnorm
from .train import clean_epoch_loader, recalibrate_bn


def mix_state_dicts(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                    alpha: float) -> dict[str, torch.Tensor]:
    """(1 − α)·START + α·TUNED for every floating-point tensor; integer buffers (BatchNorm's batch counter) are
    TUNED's. Refuses state dicts of different architectures."""
    if start.keys() != tuned.keys():
        only = sorted(start.keys() ^ tuned.keys())[:3]
        raise ArgumentError(f"the two models differ in architecture (tensors only in one: {only}); interpolate a "
                            "fine-tune toward the very file it was trained from (`fit --init`)")
    out = {}
    for k, t in tuned.items():
        if t.shape != start[k].shape:
            raise ArgumentError(f"{k}: shape {tuple(t.shape)} ≠ {tuple(start[k].shape)}; interpolate a fine-tune "
                                "toward the very file it was trained from (`fit --init`)")
        out[k] = torch.lerp(start[k].to(t.dtype), t, alpha) if t.is_floating_point() else t.clone()
    return out


def fit_init_loader(ck, data: Path, split_file: Path) -> DataLoader:
    """The clean training batches ``fit --init`` re-derived the start model's BatchNorms on (``clean_epoch_loader``
    at epoch −1: the split's train images in dataset order, shuffled by seed·1000 − 1), so that θ_start is the
    fine-tune's exact starting point: modules the fine-tune froze are then identical at both ends."""
    root = Path(data)
    train = {root / r["path"] for r in D.split_rows(Path(split_file)) if r["split"] == "train"}
    if not train:
        raise DatasetError(f"{split_file}: has no train rows; pass the split file the checkpoint was trained with")
    ds = D.load(root, class_folders=ck.class_folders, only=train)
    return clean_epoch_loader(ds.samples, ck.spec, ds.images, int(ck.config.get("batch_size", 32)),
                              int(ck.config.get("seed", 0)), -1)


def check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ArgumentError(f"--alpha {alpha}: the fine-tune's weight must lie in [0, 1] (0 = the start model, "
                            "1 = the fine-tune; 0.5 is the usual first try)")
    return float(alpha)


def interpolate_checkpoint(checkpoint: Path, toward: Path | None, alpha: float, data: Path, out: Path, *,
                           split_file: Path | None = None, images: int = 1024, seed: int = 0, log=print) -> Path:
    """Write OUT: CHECKPOINT's weights interpolated toward the ONNX file TOWARD by ``alpha`` (see the module).
    TOWARD None: the fine-tune's ``--init`` path as its config records it."""
    from .posthoc import clean_train_loader

    check_alpha(alpha)
    out = Path(out)
    if out.resolve() == Path(checkpoint).resolve():
        raise ArgumentError(f"--out {out}: is the fine-tune itself; write the interpolation to a new file")
    ck = load_checkpoint(checkpoint)
    started = (ck.spec.training or {}).get("init")
    if not started:
        raise ArgumentError(f"{checkpoint}: was not fine-tuned from an ONNX file (no `fit --init` in its spec); "
                            "interpolation needs a fine-tune and the very model it started from")
    toward = Path(toward if toward is not None else ck.config.get("init") or started.get("file", ""))
    if toward.suffix != ".onnx" or not toward.is_file():
        raise ArgumentError(f"--toward {toward}: not an ONNX file; pass the released model the fine-tune started "
                            "from (its `fit --init` file)")
    start_file = init_provenance(str(toward))
    if started.get("sha256") != start_file["sha256"]:
        raise ArgumentError(f"--toward {toward}: sha256 {start_file['sha256'][:12]} is not the file {checkpoint} was "
                            f"fine-tuned from ({started.get('file')}, sha256 {str(started.get('sha256'))[:12]}); "
                            "pass that file")
    sf = Path(split_file) if split_file else Path(checkpoint).parent / "split.csv"
    start = ck.build_model()
    load_onnx_weights(start, toward)
    # The fine-tune's own starting point: its BatchNorm γ, β re-derived on the very batches `fit --init` used.
    rederive_batchnorm(start, fit_init_loader(ck, data, sf), torch.device("cpu"))
    loader = clean_train_loader(ck, data, sf, images=images, seed=seed)
    model = ck.build_model()
    model.load_state_dict(mix_state_dicts(start.state_dict(), model.state_dict(), alpha))
    frozen = frozen_modules(model, ck.config.get("freeze", "none"))
    n = recalibrate_bn(model, loader, torch.device("cpu"), "fp32", images, keep=frozen)
    step = {"step": "wise-ft", "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            "alpha": alpha, "toward": start_file, "bn_recalibrated_on": n}
    spec = ck.spec.replace(weights_sha256=weights_sha256(model.state_dict()), calibration=None,
                           review_threshold=ModelSpec.review_threshold, ood=None, metrics=None,
                           adaptation=(*ck.spec.adaptation, step))
    out.parent.mkdir(parents=True, exist_ok=True)
    resave_checkpoint(ck, out, model=model, spec=spec, extra={"wise_ft": step}, drop=("metrics", "ood"))
    log(f"WiSE-FT: {alpha:g} × {checkpoint} + {1 - alpha:g} × {toward}, BatchNorm statistics on {n} clean "
        f"train-split images → {out}; run `cadbcnn-train calibrate`, `fit-ood` and `evaluate` on it")
    return out
