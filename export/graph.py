"""Graph building and surgery: PyTorch → ONNX, the spec in the metadata, FP16 storage/compute, the OOD
output's nodes, static INT8 (QDQ) quantisation. Pure functions of ONNX protos and files.
"""

from __future__ import annotations

import heapq
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cadbcnn_runtime._onnxmeta import content_digest
from cadbcnn_runtime.errors import ExportError
from cadbcnn_runtime.spec import INPUT_NAME, METADATA_KEY, OOD_OUTPUT_NAME, OUTPUT_NAME, ModelSpec


# ---------------------------------------------------------------------------
# Graph building
# ---------------------------------------------------------------------------
def torch_to_onnx(model, image_size: tuple[int, int], opset: int,
                  output_names: Sequence[str] = (OUTPUT_NAME,)) -> onnx.ModelProto:
    """Export a ``torch.nn.Module`` with the dynamo exporter and a dynamic batch axis (traced at batch 2).

    The only function of this module that needs torch (imported here, so graph surgery stays torch-free)."""
    import torch

    if opset < 17:
        raise ExportError(f"--opset {opset} is too old: LayerNormalization needs opset ≥ 17")
    x = torch.randint(0, 256, (2, 3, *image_size), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.onnx.export(model.eval(), (x,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=list(output_names), dynamic_shapes=({0: batch},),
                                    opset_version=opset, external_data=False, verbose=False)
    except Exception as exc:  # the exporter raises many types
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc)[:500]}") from exc
    proto = program.model_proto
    if proto.opset_import and max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) < opset:
        proto = onnx.version_converter.convert_version(proto, opset)
    return strip_debug_metadata(proto)


def strip_debug_metadata(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the exporter's per-node debug records (Python stack traces with source paths and line numbers, FX
    node names, module scopes): they make the file depend on where and at which line the code lived — an
    edit elsewhere in a module changed the exported bytes — and leak the build machine's paths."""
    def graphs(g: onnx.GraphProto):
        yield g
        for n in g.node:
            for a in n.attribute:
                if a.g.node:
                    yield from graphs(a.g)
                for sub in a.graphs:
                    yield from graphs(sub)

    for g in graphs(proto.graph):
        for n in g.node:
            del n.metadata_props[:]
    for f in proto.functions:
        for n in f.node:
            del n.metadata_props[:]
    return proto


def set_spec(proto: onnx.ModelProto, spec: ModelSpec) -> onnx.ModelProto:
    """Embed SPEC, stamped with the content hash of this graph and spec (what the runtime verifies at load).

    Call it last: any later change to the graph, the weights or the spec makes the runtime refuse the file.
    """
    spec = spec.without_content_hash()
    _put_spec(proto, spec)
    digest = content_digest(proto.SerializeToString(), spec.hashed_json())
    return _put_spec(proto, spec.replace(content_sha256=digest))


def _put_spec(proto: onnx.ModelProto, spec: ModelSpec) -> onnx.ModelProto:
    keep = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    proto.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=spec.to_json()))
    proto.producer_name = "cadbcnn-export"
    proto.doc_string = f"{spec.name} {spec.version} ({spec.variant}): {', '.join(spec.class_names)}"
    return proto


def fp16_weight_storage(proto: onnx.ModelProto, min_elements: int = 1024) -> onnx.ModelProto:
    """Store large float32 initializers as float16 with a Cast back to float32.

    Compute stays fp32 (ORT folds the Casts when it builds the session); the
    file is about half the size.
    """
    g = proto.graph
    casts, keep = [], []
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and np.prod(init.dims) >= min_elements:
            arr = numpy_helper.to_array(init)
            half = numpy_helper.from_array(arr.astype(np.float16), init.name + "__fp16")
            keep.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                          name=init.name + "__cast_fp32"))
        else:
            keep.append(init)
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(casts + nodes)
    return proto


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and compute, fp32 I/O; Softmax/LayerNorm/head (Gemm) and the OOD head (with the stage statistics
    it reads) stay fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    block = ["Softmax", "LayerNormalization", "ReduceMean", "Gemm"]
    half = convert_float_to_float16(proto, keep_io_types=True, op_block_list=block, node_block_list=ood_nodes(proto),
                                    disable_shape_infer=False)
    return topological_sort(half)  # the converter appends its I/O Casts at the end of the node list


def topological_sort(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Order PROTO's nodes so every node comes after the producers of its inputs (as the ONNX standard requires and
    ``drop_output`` assumes), keeping the existing order wherever it is already valid. In place; returns PROTO."""
    g = proto.graph
    nodes = list(g.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producer[x] for x in n.input if x in producer} - {i} for i, n in enumerate(nodes)]
    users: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = [nodes[i].name or nodes[i].op_type for i in range(len(nodes)) if waiting[i] > 0][:5]
        raise ExportError(f"the graph has a cycle through nodes {stuck}; it cannot be written as ONNX")
    del g.node[:]
    g.node.extend(nodes[i] for i in order)
    return proto


def ood_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes only the OOD score needs: the head (downstream of the ``ood.*`` statistics) and what
    feeds nothing else — the mean and standard deviation of the stage maps that the multi-layer score reads."""
    g = proto.graph
    if OOD_OUTPUT_NAME not in {o.name for o in g.output}:
        return []
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    stack = [o.name for o in g.output if o.name != OOD_OUTPUT_NAME]
    needed: set[int] = set()
    while stack:  # every node the other outputs (the logits) depend on
        i = producer.get(stack.pop())
        if i is not None and i not in needed:
            needed.add(i)
            stack.extend(g.node[i].input)
    return [n.name for i, n in enumerate(g.node) if i not in needed]


def ood_feature_readers(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes that read the features the OOD score is computed on (the OOD head and the classifier head).

    Left in FP32 by the INT8 quantizer: quantizing them puts a Quantize/Dequantize pair with a single 8-bit scale on
    the feature vector itself, and the whitening in the Mahalanobis score amplifies that rounding noise in the
    low-variance directions until in-distribution images score like foreign ones.
    """
    inits = {i.name for i in proto.graph.initializer}
    readers = [n for n in proto.graph.node if any(i.startswith("ood.") and "whitening" in i for i in n.input)]
    # the activations beside each part's Σ^-1/2 (directly, or behind an FP16-storage Cast)
    casts = {n.output[0] for n in proto.graph.node if n.op_type == "Cast" and n.input[0].startswith("ood.")}
    heads = readers + [n for n in proto.graph.node if casts.intersection(n.input) and n.op_type == "MatMul"]
    feats = {i for n in heads for i in n.input if i not in inits and i not in casts}
    return [n.name for n in proto.graph.node if any(i in feats for i in n.input)]


def drop_output(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """Remove graph output NAME and every node and initializer that only it needed."""
    g = topological_sort(proto).graph
    outputs = [o for o in g.output if o.name != name]
    del g.output[:]
    g.output.extend(outputs)
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):  # nodes are topologically sorted
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    for field_ in (g.initializer, g.value_info):
        kept = [t for t in field_ if t.name in needed]
        del field_[:]
        field_.extend(kept)
    return proto


def attention_matmuls(proto: onnx.ModelProto) -> list[str]:
    """Names of MatMul nodes between two activations (QKᵀ and attention·V)."""
    inits = {i.name for i in proto.graph.initializer}
    consts = {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in proto.graph.node
            if n.op_type == "MatMul" and not any(i in inits or i in consts for i in n.input)]


def unfold_fp16_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The inverse of ``fp16_weight_storage``: FP16-stored initializers read through a Cast to float become
    FP32 initializers again (exactly: FP16 → FP32 is lossless), so the quantiser sees constant weights."""
    inits = {i.name: i for i in proto.graph.initializer}
    keep, new = [], []
    for n in proto.graph.node:
        src = inits.get(n.input[0]) if n.op_type == "Cast" and n.input else None
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        if src is not None and src.data_type == TensorProto.FLOAT16 and to == TensorProto.FLOAT:
            new.append(numpy_helper.from_array(numpy_helper.to_array(src).astype(np.float32), n.output[0]))
            continue
        keep.append(n)
    if not new:
        return proto
    used = {i for n in keep for i in n.input}
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    kept_inits = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept_inits + new)
    return proto


#: What INT8 quantises: the convolutions of the CNN branches (≈ all of the compute) and the ReLUs after them.
#: Quantising the ReLU lets the Conv's output be quantised once, on the ReLU's [0, max] range (ONNX Runtime then
#: fuses Conv + ReLU into one QLinearConv); with Conv alone every ReLU sat between a DequantizeLinear and a
#: QuantizeLinear (25 requantisations at batch 1: 1.7 ms of 22.5) and the Conv output was quantised on its
#: signed range, half of the levels wasted. Released model, measured: 0.35× → 0.32× ORT FP32 latency at batch 1
#: (0.31× → 0.29× at 8), mean |Δlogit| to FP32 0.094 → 0.011 on the validation images.
#: The cross-attention fusion (its 1×1 projections and the Q/K/V/output MatMuls), the head and the OOD head stay
#: FP32: quantising the fusion adds half of the INT8 feature error (relative error of the fused features
#: 0.17 → 0.11 on 96 validation images when it stays float) for ~10 % of the INT8 latency, and that error is what
#: the OOD score reads.
INT8_OP_TYPES = ("Conv", "Relu")


def fusion_convs(proto: onnx.ModelProto) -> list[str]:
    """Names of the Conv nodes of the cross-attention fusion (weights named ``….fusion.…``)."""
    return [n.name for n in proto.graph.node if n.op_type == "Conv" and len(n.input) > 1 and ".fusion." in
            f".{n.input[1]}"]


def to_int8(fp32_path: Path, out_path: Path, calib: np.ndarray, *, per_channel: bool = True,
            method: str = "minmax") -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray, batch: int = 16):
            self.batches = iter([{INPUT_NAME: x[i:i + batch]} for i in range(0, len(x), batch)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        pre_proto = onnx.load(str(pre), load_external_data=False)
        exclude = sorted(set(attention_matmuls(pre_proto) + ood_nodes(pre_proto) + ood_feature_readers(pre_proto)
                             + fusion_convs(pre_proto)))
        quantize_static(
            str(pre), str(out_path), Reader(calib), quant_format=QuantFormat.QDQ, per_channel=per_channel,
            # U8S8 is what ORT recommends for x86-64 (VNNI runs it without saturation)
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=list(INT8_OP_TYPES), nodes_to_exclude=exclude,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                              "entropy": CalibrationMethod.Entropy}[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
