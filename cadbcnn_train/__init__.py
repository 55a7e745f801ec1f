"""cadbcnn_train — the CADBCNN model, data pipeline, training and evaluation (PyTorch).

``create_model`` and ``MODELS`` load torch on first use, so torch-free parts of the package
(``cadbcnn_train.synthetic``) can be imported where torch is not installed.
"""

__all__ = ["MODELS", "create_model"]


def __getattr__(name: str):
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'cadbcnn_train' has no attribute {name!r}")
