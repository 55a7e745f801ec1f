"""cadbcnn_train — the CADBCNN model, data pipeline, training and evaluation (PyTorch)."""

from .model import MODELS, create_model

__all__ = ["MODELS", "create_model"]
