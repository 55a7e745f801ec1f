"""cadbcnn_runtime — torch-free ONNX Runtime inference for CADBCNN models.

Depends on numpy, onnxruntime and OpenCV only; never imports torch or the
other cadbcnn packages.
"""

from .errors import (
    ArgumentError,
    CadbcnnError,
    CheckpointError,
    DatasetError,
    DeviceError,
    ExportError,
    ImageError,
    ModelLoadError,
    ModelRunError,
    ModelSpecError,
    OutputError,
)
from .preprocess import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, load_and_preprocess, preprocess, read_image
from .spec import METADATA_KEY, SCHEMA_VERSION, ModelSpec

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing the package must not load onnxruntime
    if name in ("Classifier", "Prediction"):
        from . import classifier

        return getattr(classifier, name)
    raise AttributeError(name)


__all__ = [
    "Classifier", "Prediction",
    "ArgumentError", "CadbcnnError", "CheckpointError", "ModelRunError", "OutputError", "DatasetError", "DeviceError", "ExportError", "ImageError",
    "ModelLoadError", "ModelSpecError", "IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS", "load_and_preprocess",
    "preprocess", "read_image", "METADATA_KEY", "SCHEMA_VERSION", "ModelSpec", "__version__",
]
