"""`Classifier`: the embedding API — load a cadbcnn ONNX model and predict.

    from cadbcnn_runtime import Classifier
    with Classifier.from_file("models/cadbcnn.onnx", device="cpu") as clf:
        p = clf.predict("cell.jpg")          # path, bytes, or H×W×3 RGB uint8 array
        print(p.label, p.confidence, p.needs_review)

One ``Classifier`` may be shared by many threads (ONNX Runtime sessions are
thread-safe for ``run``, the OpenVINO backend locks its request; nothing else here is
mutated after construction).

``backend="openvino"`` (extra ``cadbcnn[openvino]``) runs the same verified bytes on OpenVINO's CPU plugin in
FP32 precision (``openvino_backend``); it is never chosen, nor fallen back to, on its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ._onnxmeta import content_digest, metadata_of, read_model_bytes
from .errors import ArgumentError, DeviceError, ModelLoadError, ModelRunError, ModelSpecError
from .calibration import review_thresholds, temperature_of
from .preprocess import ImageSource, load_and_preprocess
from .appearance import AppearanceCheck, atypical
from .review_score import ReviewScore
from .quality import content_scores
from .reliability import softmax
from .session import BACKEND_NAMES, CPU_EP, CUDA_EP, check_backend, make_verified_session, resolve_threads
from .spec import METADATA_KEY, ModelSpec, canonical_spec_json
from .variants import check_same_model, choose, variant_key
_ONNX_DTYPES = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}


@dataclass(frozen=True)
class Prediction:
    """One image's result. ``probabilities`` and ``confidence`` are calibrated when the spec carries a
    temperature (``spec.calibration``)."""

    label: str
    index: int
    confidence: float
    probabilities: dict[str, float]
    needs_review: bool                   # low confidence or out of distribution
    ood_score: float | None = None       # None when the model has no OOD output
    out_of_distribution: bool = False
    content_score: float | None = None   # None when the spec has no field-content check
    low_content: bool = False            # blank / near-uniform field: always needs review
    backend: str = "onnxruntime"         # what computed it: onnxruntime | openvino
    appearance_score: float | None = None  # None when the spec has no appearance check; > 1: atypical
    atypical_appearance: bool = False    # colour/contrast unlike the training images of its label: needs review
    review_score: float | None = None    # None when the spec has no learned review score; P(label right), learned
    low_review_score: bool = False       # below its label's review-score threshold (or not a number): needs review


def default_model_path() -> Path:
    """The released model: $CADBCNN_MODEL, else models/cadbcnn.onnx of this checkout/installation."""
    env = os.environ.get("CADBCNN_MODEL")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here / "models" / "cadbcnn.onnx", here.parent / "models" / "cadbcnn.onnx"):
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        "no model given and no released model found (looked for $CADBCNN_MODEL and models/cadbcnn.onnx). "
        "Pass a model exported with `cadbcnn-export` (--model PATH / Classifier.from_file(path)).")


def _check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def _cuda_available(ort) -> bool:
    return CUDA_EP in ort.get_available_providers()


class Classifier:
    """A cadbcnn ONNX model with its spec, on ONNX Runtime's CPU or CUDA execution provider, or on OpenVINO's CPU."""

    def __init__(self, session, spec: ModelSpec, path: Path, device: str, *, review_threshold: float | None = None,
                 ood_threshold: float | None = None, threads: int | None = None, backend: str = "onnxruntime"):
        self.session = session
        self.backend = backend  # onnxruntime | openvino: what runs the model
        self.spec = spec
        self.path = path
        self.device = device  # what is really used: "cpu" or "cuda"
        self.threads = threads  # intra-op threads (capped at the CPUs this process may use; 0 = ORT's default)
        self.review_threshold = spec.review_threshold if review_threshold is None else float(review_threshold)
        if not 0.0 <= self.review_threshold <= 1.0:
            raise ArgumentError(f"review_threshold must be in [0, 1], got {self.review_threshold}")
        self.review_override = None if review_threshold is None else self.review_threshold  # what the caller gave
        # The threshold of each predicted class: the spec's, raised per class where its calibration says so
        # (calibration.class_review); a review_threshold given by the caller replaces the whole rule.
        self.review_thresholds = review_thresholds(None if review_threshold is not None else spec.calibration,
                                                   spec.class_names, self.review_threshold)
        self._thresholds = [self.review_thresholds[n] for n in spec.class_names]  # floats: flags stay Python bools
        self.precision = variant_key(spec)  # fp32 | int8 | fp16: what this file computes in
        self.precision_reason = "the file given"
        self.session_cache = "off (session given)"  # optimised-graph cache: hit | miss | off (why); session_cache.py
        self.temperature = temperature_of(spec.calibration)  # logits / T before the softmax (1.0: uncalibrated)
        self.ood_threshold = None if spec.ood is None else (
            float(spec.ood["threshold"]) if ood_threshold is None else float(ood_threshold))
        self._outputs = [spec.output_name] + ([spec.ood["output"]] if spec.ood else [])
        self.appearance = None if spec.appearance is None else AppearanceCheck(spec.appearance, spec.class_names)
        # The learned review score (calibration.review_score), unless the caller set the rule by review_threshold.
        entry = (spec.calibration or {}).get("review_score") if review_threshold is None else None
        self.review_score = None if entry is None else ReviewScore(entry, spec.class_names)

    # -- construction ----------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike | None = None, device: str = "auto", threads: int | None = None,
                  *, allow_fallback: bool = False, review_threshold: float | None = None,
                  ood_threshold: float | None = None, precision: str = "auto",
                  backend: str = "onnxruntime") -> "Classifier":
        """Load and validate a model. ``path=None`` loads the released model.

        ``device``: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when its EP is available). Asking for
        ``"cuda"`` where it is not available raises ``DeviceError`` unless ``allow_fallback``.
        ``precision``: ``"auto"`` runs the fastest variant of this model that the machine supports (INT8 on
        CPUs with VNNI, FP16 on CUDA, when those files sit next to it — ``cadbcnn_runtime.variants``);
        ``"fp32"``, ``"int8"``, ``"fp16"`` ask for one. The choice: ``.precision``, ``.precision_reason``.
        ``backend``: ``"onnxruntime"`` or ``"openvino"`` (OpenVINO's CPU plugin in FP32 precision; refused with
        ``device="cuda"`` or when OpenVINO is not installed). The choice: ``.backend``.
        """
        import onnxruntime as ort

        path = Path(path) if path is not None else default_model_path()
        _check_device(device)
        check_backend(backend, device)
        if not path.is_file():
            raise ModelLoadError(f"{path}: model file not found. Check the path, or export one with "
                                 "`cadbcnn-export CHECKPOINT -o MODEL.onnx`.")
        data = read_model_bytes(path)
        base = ModelSpec.from_metadata(metadata_of(data, path), source=str(path))
        named = variant_key(base)
        if named != "fp32":  # a variant named directly is used as it is
            if precision not in ("auto", named):
                raise ArgumentError(f"{path}: is the {named.upper()} file but --precision {precision} was asked; "
                                    "pass the FP32 model (X.onnx) to choose among its variants")
            key, chosen, reason = named, path, "the file named"
        else:
            cuda = backend == "onnxruntime" and (device == "cuda" or (device == "auto" and _cuda_available(ort)))
            key, chosen, reason = choose(path, precision, cuda=cuda)
            if chosen != path:
                data = read_model_bytes(chosen)
                check_same_model(base, ModelSpec.from_metadata(metadata_of(data, chosen), source=str(chosen)), chosen)
        clf = cls.from_bytes(data, name=chosen, device=device, threads=threads, allow_fallback=allow_fallback,
                             review_threshold=review_threshold, ood_threshold=ood_threshold, backend=backend)
        clf.precision, clf.precision_reason = key, reason
        return clf

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str | os.PathLike = "<bytes>", device: str = "auto",
                   threads: int | None = None, allow_fallback: bool = False, review_threshold: float | None = None,
                   ood_threshold: float | None = None, backend: str = "onnxruntime") -> "Classifier":
        """Load and validate a model held in memory (e.g. shipped to a worker on another machine).

        The same checks as ``from_file``: spec, content hash, graph inputs/outputs, device, backend. ``name`` is
        the model's origin, used in messages and as ``Classifier.path``.
        """
        path = Path(name)
        _check_device(device)
        check_backend(backend, device)
        providers = _ort_providers(device, allow_fallback) if backend == "onnxruntime" else None

        meta = metadata_of(data, path)
        spec = ModelSpec.from_metadata(meta, source=str(path))
        if backend == "openvino":  # refused before the hash check and the compile
            from .openvino_backend import check_precision

            check_precision(variant_key(spec), str(path))
        verify_content(data, spec, json.loads(meta[METADATA_KEY]), path)
        n_threads = resolve_threads(threads)
        # built from the very bytes that were verified: no second read of the file
        if backend == "openvino":
            from .openvino_backend import openvino_session

            session, cache_status = openvino_session(data, threads=n_threads, name=str(path)), "off (openvino backend)"
        else:
            session, cache_status = _ort_session(data, spec, path, providers, n_threads)
        del data
        _check_io(session, spec, path)
        used = "cuda" if CUDA_EP in session.get_providers() else "cpu"
        if device == "cuda" and used != "cuda" and not allow_fallback:
            raise DeviceError(f"{path}: the CUDA EP could not be initialised (session providers: "
                              f"{session.get_providers()}); check the CUDA/cuDNN libraries or use --device cpu.")
        clf = cls(session, spec, path, used, review_threshold=review_threshold, ood_threshold=ood_threshold,
                  threads=n_threads, backend=backend)
        clf.session_cache = cache_status
        return clf

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.session = None

    # -- inference ---------------------------------------------------------------
    def preprocess(self, image: ImageSource, *, name: str | None = None) -> np.ndarray:
        return load_and_preprocess(image, self.spec, name=name)

    def run_all(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, ood_score or None) for a preprocessed (N, 3, H, W) batch."""
        session = self.session
        if session is None:
            raise ModelLoadError(f"{self.path}: this Classifier was closed")
        try:
            outs = session.run(self._outputs, {self.spec.input_name: batch})
        except Exception as exc:  # ORT raises its own types (e.g. allocation failures); not a per-image problem
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ModelRunError(f"{self.path}: {BACKEND_NAMES[self.backend]} failed while running the model on a "
                                f"batch of {len(batch)} ({msg}). Try a smaller --batch, free memory, or re-export "
                                "the model with cadbcnn-export.") from None
        return outs[0], (outs[1] if len(outs) > 1 else None)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a preprocessed (N, 3, H, W) batch."""
        return self.run_all(batch)[0]

    def predictions(self, logits: np.ndarray, ood: np.ndarray | None = None,
                    content: np.ndarray | None = None, appearance: np.ndarray | None = None) -> list[Prediction]:
        """needs_review = confidence < the review threshold of the predicted class, or out of distribution, or a
        blank/near-uniform field, or an appearance unlike the training images of the predicted class
        (``appearance``: the images' ``appearance_features``, scored against the spec's check), or — with a learned
        review score in the spec — that score below its class's threshold."""
        probs = softmax(logits, self.temperature)
        min_content = None if self.spec.quality is None else float(self.spec.quality["min_content"])
        labels = probs.argmax(1)
        trust = low_all = None
        if self.review_score is not None:  # reads the distance to every class; the check's is its label's column
            if appearance is None:
                raise ArgumentError(f"{self.path.name}: its review rule reads the images' appearance features; pass "
                                    "them (Classifier.appearance.features(batch)) or call classify(batch)")
            ratios = self.appearance.ratios(appearance)
            looks = ratios[np.arange(len(labels)), labels]
            trust = self.review_score.scores(probs, ood, ratios)
            low_all = self.review_score.low(trust, labels)
        else:
            looks = (None if appearance is None or self.appearance is None
                     else self.appearance.scores(appearance, labels))
        odd_all = None if looks is None else atypical(looks)
        out = []
        for i, p in enumerate(probs):
            k = int(labels[i])
            conf = float(p[k])
            score = None if ood is None else float(ood[i])
            is_ood = score is not None and self.ood_threshold is not None and not score <= self.ood_threshold
            c = None if content is None else float(content[i])
            low = c is not None and min_content is not None and not c >= min_content
            a = None if looks is None else float(looks[i])
            odd = odd_all is not None and bool(odd_all[i])
            unsure = low_all is not None and bool(low_all[i])
            out.append(Prediction(self.spec.class_names[k], k, conf,
                                  {n: float(v) for n, v in zip(self.spec.class_names, p)},
                                  conf < self._thresholds[k] or is_ood or low or odd or unsure, score, is_ood, c, low,
                                  self.backend, appearance_score=a, atypical_appearance=odd,
                                  review_score=None if trust is None else float(trust[i]), low_review_score=unsure))
        return out

    def classify(self, batch: np.ndarray) -> list[Prediction]:
        """Predictions for a preprocessed (N, 3, H, W) batch."""
        content = content_scores(batch) if self.spec.quality is not None else None
        looks = self.appearance.features(batch) if self.appearance is not None else None
        return self.predictions(*self.run_all(batch), content, looks)

    def predict(self, image: ImageSource) -> Prediction:
        return self.classify(self.preprocess(image)[None])[0]

    def predict_batch(self, images: Iterable[ImageSource], batch_size: int = 16) -> list[Prediction]:
        """Predict many images; raises ``ImageError`` naming the first unreadable one."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ArgumentError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        out: list[Prediction] = []
        for chunk in _chunks(images, batch_size):
            out += self.classify(np.stack([self.preprocess(im) for im in chunk]))
        return out


def _ort_providers(device: str, allow_fallback: bool) -> list[str]:
    """ONNX Runtime's providers for DEVICE; DeviceError when CUDA is asked for, missing and no fallback allowed."""
    import onnxruntime as ort

    cuda = _cuda_available(ort)
    if device == "cuda" and not cuda and not allow_fallback:
        raise DeviceError(
            "device 'cuda' requested but ONNX Runtime's CUDA execution provider is not available "
            f"(available: {ort.get_available_providers()}). Install the GPU build "
            "(`pip uninstall -y onnxruntime && pip install 'cadbcnn[gpu]'`) and check the CUDA/cuDNN "
            "libraries, or use --device cpu / --allow-fallback.")
    return [CUDA_EP, CPU_EP] if device in ("cuda", "auto") and cuda else [CPU_EP]


def _ort_session(data: bytes, spec: ModelSpec, path: Path, providers: list[str], threads: int):
    """(session, optimised-graph cache status) through the runtime's session factory; ModelLoadError if ORT fails."""
    try:
        return make_verified_session(data, spec.content_sha256, providers=providers, threads=threads)
    except Exception as exc:  # ORT raises its own exception types
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load this file ({str(exc).splitlines()[0][:300]}). "
                             "Is it an ONNX model exported with cadbcnn-export?") from None


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def verify_content(data: bytes, spec: ModelSpec, raw_spec: dict, path: Path) -> None:
    """Refuse a model whose graph, weights or spec changed after export (or that was never stamped).

    This catches edits and mix-ups — a spec with swapped class names, a spec moved onto other weights, a
    re-saved graph — not a deliberate forgery: anyone can recompute an unkeyed hash. For that, compare the
    file's sha256 with the one published in the model card.
    """
    if spec.content_sha256 is None:
        raise ModelSpecError(
            f"{path}: the model spec has no content hash (exported by cadbcnn < 0.2, or its spec was replaced), so "
            "its graph and spec cannot be checked against each other. Re-export it with `cadbcnn-export`.")
    try:
        got = content_digest(data, canonical_spec_json(raw_spec))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX file ({exc}). Re-export it with cadbcnn-export.") from None
    if got != spec.content_sha256:
        raise ModelSpecError(
            f"{path}: integrity check failed — the graph, weights or spec were changed after export (content "
            f"sha256 {got[:16]}… ≠ {spec.content_sha256[:16]}… recorded by cadbcnn-export). Get the file again "
            "from its source, or re-export it with `cadbcnn-export`.")


def _check_io(session, spec: ModelSpec, path: Path) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    problems = []
    if [i.name for i in inputs] != [spec.input_name]:
        problems.append(f"inputs {[i.name for i in inputs]} != spec input {spec.input_name!r}")
    else:
        i = inputs[0]
        if i.type != _ONNX_DTYPES[spec.input_dtype]:
            problems.append(f"input type {i.type} != spec {spec.input_dtype}")
        shape = list(i.shape)
        if len(shape) != 4 or shape[1:] != [3, *spec.image_size] or isinstance(shape[0], int):
            problems.append(f"input shape {shape} != [batch, 3, {spec.image_size[0]}, {spec.image_size[1]}] "
                            "with a dynamic batch axis")
    names = [o.name for o in outputs]
    if spec.ood is not None:
        oo = next((o for o in outputs if o.name == spec.ood["output"]), None)
        if oo is None:
            problems.append(f"outputs {names} lack the spec's OOD output {spec.ood['output']!r}")
        elif oo.type != "tensor(float)" or len(oo.shape) != 1:
            problems.append(f"OOD output {oo.name} is {oo.type} {list(oo.shape)}, expected float [batch]")
    if spec.output_name not in names:
        problems.append(f"outputs {names} lack the spec output {spec.output_name!r}")
    else:
        o = outputs[names.index(spec.output_name)]
        if o.type != "tensor(float)" or len(o.shape) != 2 or o.shape[1] != spec.num_classes:
            problems.append(f"output {o.name} is {o.type} {list(o.shape)}, expected float [batch, {spec.num_classes}]")
    if problems:
        raise ModelSpecError(f"{path}: the graph does not match its spec: " + "; ".join(problems)
                             + ". Re-export the model with cadbcnn-export.")
