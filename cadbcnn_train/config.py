"""Frozen training configuration, written next to every checkpoint."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cadbcnn_runtime.errors import ArgumentError

#: The choices of the training options — one home; the CLI's enums and the validation below read these.
#: ``MODEL_NAMES`` are the keys of ``cadbcnn_train.model.MODELS`` (kept torch-free here; a test checks they agree).
MODEL_NAMES = ("cadbcnn", "dual_concat", "resnet18", "resnet34", "resnet50", "efficientnet_b0")
SPLITS = ("stratified", "grouped")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FREEZE_CHOICES = ("none", "early", "backbone")
#: What a stain copy of a training image keeps of it when the review checks are fitted on such copies
#: (``--stain-keep``; ``augment.StainCopies``): ``nothing`` — the stain part's whole change, lightness included (the
#: HED jitter changes how dark the stain is); ``lightness`` — the image's own CIELAB L*, only a* and b* (hue,
#: chroma) from the copy, so the checks still see exposure.
STAIN_KEEP = ("nothing", "lightness")

#: Options that ``fit --resume`` may change: where things are and how long to go on, never what is learned per step
#: (``epochs`` extends or shortens the cosine schedule, as documented for ``--resume``). ``split_file`` is a path: the
#: split itself is checked by its hash, so the run's own ``OUT/split.csv`` resumes a run that drew its split.
RESUME_FREE = frozenset({"data", "out", "epochs", "patience", "workers", "threads", "cache", "max_steps",
                         "fit_ood", "calibrate", "review_target_risk", "split_file"})


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    model: str = "cadbcnn"
    epochs: int = 30
    batch_size: int = 32
    image_size: int = 224
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.05
    seed: int = 0
    split: str = "stratified"          # stratified | grouped
    split_file: str | None = None
    block_size: int = 20               # file-number block for --split grouped
    ratios: tuple[float, float, float] = (0.70, 0.15, 0.15)
    max_per_class: int | None = None
    augment: bool = True
    augment_parts: tuple[str, ...] = ()  # robust augmentation parts on top of the standard one (augment.PARTS)
    robust_p: float = 1.0              # share of training images that get the robust parts (the rest: standard)
    augment_part_p: dict[str, float] = field(default_factory=dict)  # parts drawn at their own share instead
    crop_scale: float | None = 0.80
    class_weights: bool = True
    precision: str = "auto"           # auto | fp32 | bf16 | fp16
    patience: int = 10                 # early stopping on val macro-F1
    workers: int = 0
    threads: int | None = None
    pretrained: str | None = None      # None | "imagenet"
    init: str | None = None            # start from an exported model's weights (MODEL.onnx), e.g. the released one
    freeze: str = "none"               # none | early | backbone (with --init: what stays fixed)
    consistency: float = 0.0           # with --init: weight of KL(init model on the clean image ‖ model on the
                                       # augmented one) beside the cross-entropy; 0 = off (consistency.py)
    teacher: str | None = None         # with consistency: the teacher's logits from this table instead of the
                                       # --init model's forward pass (cadbcnn-train teacher; --init then optional)
    cache: bool = True
    max_steps: int | None = None       # stop each epoch after N steps (smoke tests)
    fit_ood: bool = True               # fit the OOD statistics at the end of training
    calibrate: bool = True             # fit a temperature and the review threshold on the validation split
                                       # and the field-content (blank field) check on the training split
    review_target_risk: float = 0.005  # review rule: <= this error rate among non-reviewed validation images
    bn_recal_images: int = 512         # precise-BN before each validation (0 = off)
    ema: float = 0.0                   # decay of a moving average of the weights (0 = off); see ema.py
    select_shifted: int = 0            # shifted copies of each validation image in the selection score (selection.py)
    shifted_target_risk: float | None = None  # with select_shifted: the review rule also holds on those images
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
        object.__setattr__(self, "augment_parts", tuple(self.augment_parts))
        object.__setattr__(self, "augment_part_p", {k: float(v) for k, v in dict(self.augment_part_p).items()})
        from .augment import check_parts
        if self.model not in MODEL_NAMES:
            raise ArgumentError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}")

        check_parts(self.augment_parts, self.robust_p, self.augment_part_p)
        if self.split not in SPLITS:
            raise ArgumentError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.precision not in PRECISIONS:
            raise ArgumentError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0.0 <= self.review_target_risk <= 1.0:
            raise ArgumentError(f"review_target_risk must be in [0, 1], got {self.review_target_risk}")
        if not (self.ema == 0.0 or 0.0 < self.ema < 1.0):
            raise ArgumentError(f"ema must be 0 (off) or a decay in (0, 1) such as 0.997, got {self.ema}")
        from .shifts import check_copies
        check_copies(self.select_shifted, "select_shifted")
        if self.shifted_target_risk is not None:
            if not self.select_shifted or not self.calibrate:
                raise ArgumentError("shifted_target_risk (--shifted-target-risk) holds the end-of-run review rule on "
                                    "the shifted validation images: it needs select_shifted >= 1 "
                                    "(--select-shifted 2) and calibration on (no --no-calibrate)")
            if not 0.0 <= self.shifted_target_risk <= 1.0:
                raise ArgumentError(f"shifted_target_risk must be in [0, 1], got {self.shifted_target_risk}")
        if self.freeze not in FREEZE_CHOICES:
            raise ArgumentError(f"freeze must be one of {', '.join(FREEZE_CHOICES)}, got {self.freeze!r}")
        if self.init is not None:
            if self.pretrained is not None:
                raise ArgumentError("--init and --pretrained both set the starting weights; pass one of them")
            if not str(self.init).endswith(".onnx") or not Path(self.init).is_file():
                raise ArgumentError(f"--init {self.init}: needs an exported model file (MODEL.onnx) that exists")
        if not (math.isfinite(self.consistency) and self.consistency >= 0.0):
            raise ArgumentError(f"consistency must be a finite weight >= 0 (e.g. 1.0), got {self.consistency}")
        if self.consistency and ((self.init is None and self.teacher is None) or not self.augment):
            raise ArgumentError("--consistency keeps a teacher's answers on clean images for the augmented copies: it "
                                "needs a teacher (--init MODEL.onnx, or --teacher TEACHER.json from `cadbcnn-train "
                                "teacher`) and augmentation (no --no-augment)")
        if self.teacher is not None:
            if not self.consistency:
                raise ArgumentError("--teacher gives the targets of the consistency term: pass --consistency W "
                                    "(e.g. 1.0) with it")
            if not Path(self.teacher).is_file():
                raise ArgumentError(f"--teacher {self.teacher}: not found; write it with `cadbcnn-train teacher "
                                    "MODEL.onnx --data DATA --out TEACHER.json`")
        if self.pretrained not in (None, "imagenet"):
            raise ArgumentError(f"pretrained must be 'imagenet' or unset, got {self.pretrained!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratios"] = list(d["ratios"])
        d["augment_parts"] = list(d["augment_parts"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def resume_mismatch(stored: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The options (outside ``RESUME_FREE``) where ``cfg`` differs from the interrupted run's ``stored`` config:
    ``{name: (stored value, new value)}``; empty when the run may be resumed with ``cfg``."""
    new = cfg.to_dict()
    old = TrainConfig.from_dict({**new, **stored}).to_dict()  # the same normalisation on both sides
    return {k: (old[k], new[k]) for k in new if k not in RESUME_FREE and old[k] != new[k]}
