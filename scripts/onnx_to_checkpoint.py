"""A released ONNX file's weights as a training checkpoint, to refit what only a checkpoint can carry (e.g. the
multi-layer OOD score, whose stage statistics need a re-export): docs/OOD.md, "The multi-layer score on the
released v0.1.0 weights".

    python scripts/onnx_to_checkpoint.py TEMPLATE.pt MODEL.onnx OUT.pt

TEMPLATE.pt: any checkpoint of the same architecture (its config, class folders and split hash are kept; every
weight is replaced). The weights come back through ``cadbcnn_train.onnx_init.load_onnx_weights`` (the folded
BatchNorms become identities carrying the bias, so the model computes exactly what the graph computes); the spec
is MODEL.onnx's without its OOD entry, and the checkpoint's own metrics and OOD statistics are dropped.
Then: ``cadbcnn-train fit-ood OUT.pt …`` and ``cadbcnn-export OUT.pt …``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cadbcnn_runtime.spec import ModelSpec
from cadbcnn_train.checkpoint import load_checkpoint, resave_checkpoint
from cadbcnn_train.onnx_init import load_onnx_weights


def main(template: Path, onnx_path: Path, dest: Path) -> None:
    ck = load_checkpoint(template)
    model = ck.build_model()
    info = load_onnx_weights(model, onnx_path)
    spec = ModelSpec.from_onnx(onnx_path)
    resave_checkpoint(ck, dest, model=model.eval(), spec=spec.replace(ood=None), drop=("metrics", "ood"))
    print(f"{dest}: {info['modules']} modules from {onnx_path} ({info['folded_batchnorms']} folded BatchNorms)")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*map(Path, sys.argv[1:]))
