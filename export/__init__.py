"""cadbcnn_export — ONNX export of cadbcnn checkpoints (installed from the top-level `export/` folder)."""
