"""ONNX export: a trained model as one graph that takes RAW rows, so any ONNX runtime can serve it.

    ddp export --checkpoint runs/digits/best.npz --format onnx --out model.onnx
    model.to_onnx("model.onnx")                 # a ddp.Model (ddp.load, ddp.fit, an estimator's model_)

The graph: input "X" (n, n_features) float32 -> the saved standardization -> each layer as its ONNX operator
(Gemm, Conv, MaxPool/AveragePool, Flatten, BatchNormalization, LayerNormalization, the activations; dropout is
the identity at inference) -> for classification the softmax (or the sigmoid of binary cross-entropy) as output
"probabilities" and the class labels as "label"; for regression the targets in their own units as "prediction".
Images stay NCHW, ONNX's layout and the one ddp's weights are kept in. Needs `pip install -e ".[onnx]"`.
"""
from __future__ import annotations

import numpy as np

from .errors import UsageError

OPSET = 17          # LayerNormalization
ACTIVATIONS = {"relu": "Relu", "leaky_relu": "LeakyRelu", "sigmoid": "Sigmoid", "tanh": "Tanh", "identity": "Identity"}


def to_onnx(model, path: str | None = None):
    """The onnx.ModelProto of a ddp.Model (checked by onnx.checker); written to `path` if given."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise UsageError('ONNX export needs the onnx package: pip install -e ".[onnx]"') from None
    net, prep, nodes, inits = model.mlp, model.prep, [], []

    def const(name, a):
        a = np.asarray(a)
        inits.append(numpy_helper.from_array(a.astype(np.float32) if a.dtype.kind == "f" else a, name))
        return name

    def op(kind, inputs, **attrs):
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    x = op("Div", [op("Sub", ["X", const("x_mean", prep.x.mean)]), const("x_std", prep.x.std)])
    if len(net.input_shape) == 3:
        x = op("Reshape", [x, const("image_shape", np.array([-1, *net.input_shape], np.int64))])
    for L in net.seq:
        p = lambda name: const(f"L{L.pos}.{name}", getattr(L, name))   # noqa: E731
        if L.kind == "dense":
            x = op("Gemm", [x, p("W"), p("b")], transB=1)
        elif L.kind == "conv":
            x = op("Conv", [x, p("W"), p("b")], kernel_shape=[L.k] * 2, strides=[L.s] * 2, pads=[L.pad] * 4)
        elif L.kind in ("maxpool", "avgpool"):
            x = op("MaxPool" if L.kind == "maxpool" else "AveragePool", [x], kernel_shape=[L.k] * 2, strides=[L.k] * 2)
        elif L.kind == "flatten":
            x = op("Flatten", [x], axis=1)
        elif L.kind == "batchnorm":
            x = op("BatchNormalization", [x, p("W"), p("b"), p("running_mean"), p("running_var")], epsilon=1e-5)
        elif L.kind == "layernorm":
            x = op("LayerNormalization", [x, p("W"), p("b")], axis=1, epsilon=1e-5)
        elif L.kind in ACTIVATIONS:
            x = op(ACTIVATIONS[L.kind], [x], **({"alpha": 0.01} if L.kind == "leaky_relu" else {}))
        elif L.kind != "dropout":
            raise UsageError(f"ONNX export does not know the layer kind {L.kind!r}")
    if prep.task == "regression":
        if prep.y is not None:
            x = op("Add", [op("Mul", [x, const("y_std", prep.y.std)]), const("y_mean", prep.y.mean)])
        outputs = [(x, "prediction", TensorProto.FLOAT, [net.n_out])]
    else:
        if net.loss_name == "binary_cross_entropy":
            p1 = op("Sigmoid", [x])
            proba = op("Concat", [op("Sub", [const("one", np.ones(1)), p1]), p1], axis=1)
        else:
            proba = op("Softmax", [x], axis=1)
        classes = prep.classes if prep.classes.dtype.kind in "US" else prep.classes.astype(np.int64)
        label = op("Gather", [const("classes", classes), op("ArgMax", [proba], axis=1, keepdims=0)])
        kind = TensorProto.STRING if classes.dtype.kind in "US" else TensorProto.INT64
        outputs = [(label, "label", kind, []), (proba, "probabilities", TensorProto.FLOAT, [len(classes)])]
    for t, name, *_ in outputs:
        nodes.append(helper.make_node("Identity", [t], [name]))
    graph = helper.make_graph(
        nodes, "ddp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", prep.n_features])],
        [helper.make_tensor_value_info(name, kind, ["n", *dims]) for _, name, kind, dims in outputs],
        inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ddp")
    onnx.checker.check_model(proto, full_check=True)
    if path:
        try:
            onnx.save(proto, path)
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    return proto

