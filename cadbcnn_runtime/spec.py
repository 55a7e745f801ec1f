"""`ModelSpec`: the single source of truth about a model's input and output.

The spec travels with the weights: the trainer stores it in every checkpoint,
the exporter writes it as JSON into the ONNX ``metadata_props`` under
``cadbcnn.spec``, and the runtime refuses a model without a valid one. JSON
only — never ``repr``/``eval``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ModelSpecError

SCHEMA_VERSION = 1
METADATA_KEY = "cadbcnn.spec"
#: A spec is a few kilobytes; anything over this is refused unparsed.
MAX_SPEC_BYTES = 1 << 20

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The graph's tensor names (the spec records them per model; these are what cadbcnn-export writes).
INPUT_NAME, OUTPUT_NAME, OOD_OUTPUT_NAME = "image", "logits", "ood_score"

INTERPOLATIONS = ("nearest", "linear", "area", "cubic")
OUTPUT_SEMANTICS = ("logits",)
VARIANTS = ("fp32", "fp32-fp16weights", "fp16", "int8")

DATASET_CITATION = (
    'M. Aria, M. Ghaderzadeh, D. Bashash, H. Abolghasemi, F. Asadi, A. Hosseini, '
    '"Acute Lymphoblastic Leukemia (ALL) image dataset", Kaggle, 2021. '
    "DOI: 10.34740/KAGGLE/DSV/2175623"
)


@dataclass(frozen=True)
class ModelSpec:
    """Everything a caller needs to feed a model and read its output.

    ``image_size`` is ``(height, width)``. ``mean``/``std`` are informational
    when ``normalization_in_graph`` is true (the graph normalises itself).
    """

    name: str
    version: str
    class_names: tuple[str, ...]
    image_size: tuple[int, int] = (224, 224)
    input_name: str = INPUT_NAME
    input_layout: str = "NCHW"
    input_dtype: str = "uint8"
    color_order: str = "RGB"
    interpolation: str = "area"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    normalization_in_graph: bool = True
    output_name: str = OUTPUT_NAME
    output_semantics: str = "logits"
    review_threshold: float = 0.80
    variant: str = "fp32"              # fp32 | fp32-fp16weights | fp16 | int8 (how the graph computes)
    ood: Mapping[str, Any] | None = None   # second output: {"output", "method", "threshold", ...}
    calibration: Mapping[str, Any] | None = None  # {"method": "temperature", "temperature": T, ...}
    quality: Mapping[str, Any] | None = None  # field-content check: {"measure", "min_content", ...}
    appearance: Mapping[str, Any] | None = None  # appearance check per predicted class (appearance.py)
    training: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] | None = None
    adaptation: tuple[Mapping[str, Any], ...] = ()  # local changes after release, oldest first (refit-ood, …)
    software: Mapping[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    weights_sha256: str | None = None   # the PyTorch weights it was exported from (provenance)
    content_sha256: str | None = None   # graph + this spec, written by the exporter, checked by the runtime
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_shapes(self)
        # Normalise sequence fields to tuples so equality survives JSON.
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "training", copy.deepcopy(dict(self.training)))
        object.__setattr__(self, "software", dict(self.software))
        object.__setattr__(self, "adaptation", tuple(copy.deepcopy(dict(a)) for a in self.adaptation))
        if self.metrics is not None:
            object.__setattr__(self, "metrics", copy.deepcopy(dict(self.metrics)))
        if self.ood is not None:
            object.__setattr__(self, "ood", copy.deepcopy(dict(self.ood)))
        if self.calibration is not None:
            object.__setattr__(self, "calibration", copy.deepcopy(dict(self.calibration)))
        if self.quality is not None:
            object.__setattr__(self, "quality", copy.deepcopy(dict(self.quality)))
        if self.appearance is not None:
            object.__setattr__(self, "appearance", copy.deepcopy(dict(self.appearance)))
        self.validate()

    # -- validation ---------------------------------------------------------
    def validate(self) -> None:
        problems = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                problems.append(msg)

        need(self.schema_version == SCHEMA_VERSION,
             f"schema_version {self.schema_version!r} is not supported (this runtime reads {SCHEMA_VERSION})")
        need(isinstance(self.name, str) and bool(self.name), "name must be a non-empty string")
        need(isinstance(self.version, str) and bool(self.version), "version must be a non-empty string")
        need(len(self.class_names) >= 2 and all(isinstance(c, str) and c for c in self.class_names),
             "class_names must hold at least two non-empty strings")
        need(len(set(self.class_names)) == len(self.class_names), "class_names must be unique")
        need(len(self.image_size) == 2 and all(8 <= v <= 4096 for v in self.image_size),
             "image_size must be (height, width) with 8 <= each <= 4096")
        need(self.input_layout == "NCHW", "input_layout must be 'NCHW'")
        need(self.input_dtype in ("uint8", "float32"), "input_dtype must be 'uint8' or 'float32'")
        need(self.color_order == "RGB", "color_order must be 'RGB'")
        need(self.interpolation in INTERPOLATIONS, f"interpolation must be one of {INTERPOLATIONS}")
        need(len(self.mean) == 3 and len(self.std) == 3 and all(s > 0 for s in self.std),
             "mean and std must hold 3 values, std > 0")
        need(isinstance(self.normalization_in_graph, bool), "normalization_in_graph must be a bool")
        need(bool(self.input_name) and bool(self.output_name), "input_name and output_name must be set")
        need(self.output_semantics in OUTPUT_SEMANTICS, f"output_semantics must be one of {OUTPUT_SEMANTICS}")
        need(isinstance(self.review_threshold, (int, float)) and not isinstance(self.review_threshold, bool)
             and math.isfinite(self.review_threshold) and 0.0 <= self.review_threshold <= 1.0,
             "review_threshold must be a number in [0, 1]")
        if self.ood is not None:
            thr = self.ood.get("threshold")
            need(isinstance(self.ood.get("output"), str) and bool(self.ood.get("output"))
                 and self.ood.get("output") != self.output_name, "ood.output must name a second graph output")
            need(isinstance(thr, (int, float)) and not isinstance(thr, bool) and math.isfinite(thr),
                 "ood.threshold must be a finite number")
        if self.calibration is not None:
            t = self.calibration.get("temperature")
            need(self.calibration.get("method") == "temperature", "calibration.method must be 'temperature'")
            need(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0,
                 "calibration.temperature must be a finite number > 0")
            per_class = self.calibration.get("class_review")
            if per_class is not None:
                thr = per_class.get("thresholds") if isinstance(per_class, Mapping) else None
                need(isinstance(thr, Mapping) and set(thr) <= set(self.class_names) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 <= v <= 1.0
                    for v in thr.values()),
                     "calibration.class_review.thresholds must map class names to numbers in [0, 1]")
            if self.calibration.get("review_score") is not None:
                from .review_score import check_entry as check_review_score

                need(self.appearance is not None, "calibration.review_score reads the appearance check's "
                                                  "statistics: the spec needs an appearance entry")
                problems += check_review_score(self.calibration["review_score"], self.class_names)
        if self.quality is not None:
            m = self.quality.get("min_content")
            need(isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m) and m >= 0,
                 "quality.min_content must be a finite number >= 0")
        if self.appearance is not None:
            from .appearance import check_entry

            problems += check_entry(self.appearance, self.class_names)
        need(self.variant in VARIANTS, f"variant must be one of {VARIANTS}")
        for key in ("weights_sha256", "content_sha256"):
            v = getattr(self, key)
            need(v is None or (isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)),
                 f"{key} must be a 64-character lower-case hex digest or null")
        if problems:
            raise ModelSpecError("invalid model spec: " + "; ".join(problems))

    # -- (de)serialisation --------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("class_names", "image_size", "mean", "std", "adaptation"):
            d[key] = list(d[key])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "spec") -> "ModelSpec":
        if not isinstance(data, Mapping):
            raise ModelSpecError(f"{source}: the model spec must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        required = {"name", "version", "class_names", "schema_version"}
        missing = sorted(required - set(data))
        extra = sorted(set(data) - known)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing field(s) {missing}")
            if extra:
                parts.append(f"unknown field(s) {extra}")
            raise ModelSpecError(
                f"{source}: invalid model spec: {', '.join(parts)}. Re-export the model with a "
                "matching cadbcnn-export version.")
        try:
            return cls(**dict(data))
        except ModelSpecError as exc:
            raise ModelSpecError(f"{source}: {exc}. Re-export the model with cadbcnn-export.") from None
        except (TypeError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
            raise ModelSpecError(f"{source}: invalid model spec ({exc}). Re-export the model with cadbcnn-export.") from None

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "spec") -> "ModelSpec":
        """Parse a spec; any malformed input (bad UTF-8, bad JSON, absurd nesting or size) is a ModelSpecError."""
        if len(text) > MAX_SPEC_BYTES:
            raise ModelSpecError(f"{source}: the model spec is {len(text):,} bytes, over the {MAX_SPEC_BYTES:,}-byte "
                                 "limit — not a cadbcnn spec. Re-export the model with cadbcnn-export.")
        try:
            if isinstance(text, (bytes, bytearray)):
                text = bytes(text).decode("utf-8")
            data = json.loads(text)
        except UnicodeDecodeError as exc:
            raise ModelSpecError(f"{source}: the model spec is not valid UTF-8 ({exc.reason} at byte {exc.start}). "
                                 "Re-export the model with cadbcnn-export.") from None
        except (json.JSONDecodeError, TypeError) as exc:
            raise ModelSpecError(f"{source}: the model spec is not valid JSON ({exc})") from None
        except RecursionError:
            raise ModelSpecError(f"{source}: the model spec is nested too deeply to be a cadbcnn spec. Re-export "
                                 "the model with cadbcnn-export.") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], *, source: str) -> "ModelSpec":
        if METADATA_KEY not in metadata:
            raise ModelSpecError(
                f"{source}: no '{METADATA_KEY}' entry in the ONNX metadata — this is not a model exported by "
                "cadbcnn-export. Export it with `cadbcnn-export CHECKPOINT -o MODEL.onnx`.")
        return cls.from_json(metadata[METADATA_KEY], source=source)

    @classmethod
    def from_onnx(cls, path: str | Path) -> "ModelSpec":
        """Read the spec from an ONNX file's metadata without building a session."""
        from ._onnxmeta import read_metadata_props

        return cls.from_metadata(read_metadata_props(path), source=str(path))

    # -- helpers ------------------------------------------------------------
    def hashed_json(self) -> str:
        """The spec text that ``content_sha256`` covers (see ``canonical_spec_json``)."""
        return canonical_spec_json(self.to_dict())

    def without_content_hash(self) -> "ModelSpec":
        return self if self.content_sha256 is None else self.replace(content_sha256=None)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def replace(self, **changes: Any) -> "ModelSpec":
        d = self.to_dict()
        d.update(changes)
        return ModelSpec.from_dict(d)


def canonical_spec_json(raw: Mapping[str, Any]) -> str:
    """The spec as hashed by ``content_sha256``: the stored JSON object with ``content_sha256`` set to null,
    keys sorted. Built from the object as stored (not from this runtime's dataclass), so that a field added to
    the schema later does not change the hash of a model written before it."""
    return json.dumps({**raw, "content_sha256": None}, sort_keys=True, allow_nan=False)


_SEQUENCES = {"class_names": str, "image_size": int, "mean": (int, float), "std": (int, float)}
_MAPPINGS = ("training", "software", "metrics", "ood", "calibration", "quality")
_NULLABLE = ("metrics", "ood", "calibration", "quality")


def _check_shapes(spec: ModelSpec) -> None:
    """Container types before normalisation: a string is not a list of class names, a list is not a mapping."""
    problems = []
    for key, kind in _SEQUENCES.items():
        v = getattr(spec, key)
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, kind) and not isinstance(x, bool) for x in v):
            problems.append(f"{key} must be a list of {getattr(kind, '__name__', 'number')}s")
        elif key != "class_names" and not all(math.isfinite(float(x)) for x in v):
            problems.append(f"{key} must hold finite numbers")
    for key in _MAPPINGS:
        v = getattr(spec, key)
        if not (v is None and key in _NULLABLE) and not isinstance(v, Mapping):
            problems.append(f"{key} must be a JSON object" + (" or null" if key in _NULLABLE else ""))
    if not isinstance(spec.software, Mapping) or not all(isinstance(v, str) for v in spec.software.values()):
        problems.append("software must map names to version strings")
    if not isinstance(spec.adaptation, (list, tuple)) or not all(isinstance(a, Mapping) for a in spec.adaptation):
        problems.append("adaptation must be a list of JSON objects")
    if problems:
        raise ModelSpecError("invalid model spec: " + "; ".join(problems))
