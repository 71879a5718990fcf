#!/usr/bin/env python3
"""Writes the corpus of real exports under fixtures/exports/ (committed, so CI
needs no Python). Run by hand when the corpus changes:

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch torchvision onnx onnxscript onnxruntime
    /tmp/venv/bin/python scripts/export_corpus.py

Every model is a real torch module (torchvision's blocks at reduced width,
or a few lines of user code for a pattern), exported the way users export:
the classic exporter (`dynamo=False`) at opsets 13 and 17, the dynamo
exporter (torch's default since 2.9) with and without `optimize`, plus the
file variants converters write (initializers listed as inputs, weights as
Constant nodes, external data). `manifest.json` records, for each file, what
the tests check against and what was measured here, independently of our
tool: the parameter count (torch), the MACs of Conv/Gemm/MatMul at the
export size (forward hooks), the input shape, and onnxruntime's output on a
fixed input (`INPUT` below), so a test can compare tract's numbers with it.
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from onnx import numpy_helper
from torchvision.models.resnet import BasicBlock, Bottleneck

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "exports")
SIZE = 64  # export resolution of the fixed-size files (keeps every file and test small)


class SmallResNet(torchvision.models.ResNet):
    """torchvision's ResNet (its blocks, its layout: stride on the 3x3 conv of
    Bottleneck) at a fraction of the width, so a file stays well under 2 MB."""

    def __init__(self, block, layers, width=16, num_classes=10):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)


class ViewHead(nn.Module):
    """User code: `x.view(x.size(0), -1)` instead of torch.flatten, and the
    preprocessing baked in: `(x - mean.view(1,3,1,1)) / std`."""

    def __init__(self):
        super().__init__()
        self.body = SmallResNet(BasicBlock, [1, 1, 1, 1], width=8)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]))

    def forward(self, x):
        x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        x = b.avgpool(x)
        return b.fc(x.view(x.size(0), -1))


class SE(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class PadSENet(nn.Module):
    """EfficientNet-style user code: explicit `F.pad` before a strided conv
    (TF 'SAME' padding), SiLU, squeeze-excitation, hardswish, ReLU6."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.se = SE(16)
        self.pw = nn.Conv2d(16, 32, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.silu(self.bn(self.stem(F.pad(x, (0, 1, 0, 1)))))
        x = F.relu6(self.bn2(self.dw(x)))
        x = self.se(x)
        x = F.hardswish(self.bn3(self.pw(x)))
        x = F.relu(self.conv(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FPNNet(nn.Module):
    """An FPN-style top-down path: `F.interpolate` of a coarse map added to a finer one."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.lat1 = nn.Conv2d(16, 16, 1)
        self.top = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        f1 = F.relu(self.c1(x))
        f2 = F.relu(self.c2(f1))
        p = self.lat1(f1) + F.interpolate(self.top(f2), scale_factor=2.0, mode="nearest")
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(p), 1), 1))


def models():
    torch.manual_seed(0)
    return {
        "resnet18": SmallResNet(BasicBlock, [2, 2, 2, 2], width=8),
        "resnet50": SmallResNet(Bottleneck, [3, 4, 6, 3], width=8),
        "mobilenetv2": torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10),
        "viewhead": ViewHead(),
        "padse": PadSENet(),
        "fpn": FPNNet(),
    }


def randomize_bn(model):
    """Trained-looking BN statistics, so folding is not the identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def count_macs(model, x):
    """MACs of Conv2d and Linear layers, by forward hooks (independent of ONNX)."""
    total = [0]

    def conv(m, _inp, out):
        total[0] += out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, _inp, out):
        total[0] += out.numel() // out.shape[0] * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total[0]


def export(model, path, x, dynamo, opset, dynamic_hw=False, keep_inputs=False, optimize=True):
    names = dict(input_names=["input"], output_names=["logits"])
    if dynamo:
        dims = {0: torch.export.Dim("batch", min=1, max=64)}
        if dynamic_hw:
            dims[2], dims[3] = torch.export.Dim("height", min=32, max=512), torch.export.Dim("width", min=32, max=512)
        prog = torch.onnx.export(model, (x,), dynamic_shapes=({k: v for k, v in dims.items()},), dynamo=True,
                                 opset_version=opset, optimize=optimize, **names)
        prog.save(path)
    else:
        axes = {0: "batch"}
        if dynamic_hw:
            axes.update({2: "height", 3: "width"})
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset, dynamic_axes={"input": axes, "logits": {0: "batch"}},
                          keep_initializers_as_inputs=keep_inputs, do_constant_folding=not keep_inputs, **names)


def weights_as_constants(path, out):
    """paddle2onnx style: every initializer becomes a Constant node, and conv
    biases become `Add(conv, Reshape(Constant, Constant))`."""
    m = onnx.load(path)
    g = m.graph
    consts = []
    for init in g.initializer:
        consts.append(onnx.helper.make_node("Constant", [], [init.name], name=init.name + "_const", value=init))
    del g.initializer[:]
    nodes = list(g.node)
    new_nodes = []
    for n in nodes:
        if n.op_type == "Conv" and len(n.input) == 3:
            bias = n.input[2]
            del n.input[2]
            conv_out = n.output[0]
            n.output[0] = conv_out + "_nobias"
            shape_name = bias + "_shape"
            consts.append(onnx.helper.make_node("Constant", [], [shape_name], name=shape_name + "_const",
                                                value=numpy_helper.from_array(np.array([1, -1, 1, 1], dtype=np.int64), shape_name)))
            new_nodes += [n, onnx.helper.make_node("Reshape", [bias, shape_name], [bias + "_4d"], name=bias + "_reshape"),
                          onnx.helper.make_node("Add", [conv_out + "_nobias", bias + "_4d"], [conv_out], name=conv_out + "_bias_add")]
        else:
            new_nodes.append(n)
    del g.node[:]
    g.node.extend(consts + new_nodes)
    onnx.checker.check_model(m)
    onnx.save(m, out)


def run_ort(path, x):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def main():
    os.makedirs(OUT, exist_ok=True)
    manifest = {}
    rng = np.random.default_rng(0)
    built = models()
    variants = []
    for name, model in built.items():
        randomize_bn(model)
        model.eval()
        variants.append((f"{name}-classic-op17", model, dict(dynamo=False, opset=17)))
        variants.append((f"{name}-dynamo-op18", model, dict(dynamo=True, opset=18)))
    r18, r50 = built["resnet18"], built["resnet50"]
    variants += [
        ("resnet50-classic-op13", r50, dict(dynamo=False, opset=13)),
        ("resnet18-dynamo-op18-noopt", r18, dict(dynamo=True, opset=18, optimize=False)),
        ("resnet18-classic-op17-dynhw", r18, dict(dynamo=False, opset=17, dynamic_hw=True)),
        ("resnet18-dynamo-op18-dynhw", r18, dict(dynamo=True, opset=18, dynamic_hw=True)),
        ("resnet18-classic-op13-initinputs", r18, dict(dynamo=False, opset=13, keep_inputs=True)),
    ]
    x = torch.from_numpy(rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32))
    for fname, model, kw in variants:
        path = os.path.join(OUT, fname + ".onnx")
        export(model, path, x, **kw)
        onnx.checker.check_model(onnx.load(path))
        manifest[fname] = entry(model, path, x, kw.get("dynamic_hw", False))
    # Converter-written variants of a classic export.
    src = os.path.join(OUT, "resnet18-classic-op17.onnx")
    path = os.path.join(OUT, "resnet18-constnodes.onnx")
    weights_as_constants(src, path)
    manifest["resnet18-constnodes"] = entry(r18, path, x, False)
    ext_dir = os.path.join(OUT, "external")
    os.makedirs(ext_dir, exist_ok=True)
    path = os.path.join(ext_dir, "resnet18-external.onnx")
    if os.path.exists(path + ".data"):
        os.remove(path + ".data")  # onnx.save appends to an existing data file
    m = onnx.load(os.path.join(OUT, "resnet18-dynamo-op18.onnx"))
    onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="resnet18-external.onnx.data", size_threshold=1024)
    manifest["external/resnet18-external"] = entry(r18, path, x, False)
    manifest.update(keras_exports())
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    for k, v in sorted(manifest.items()):
        print(f"{k:40s} {v['bytes']:>9d} B  params {v['params']:>8d}  MACs {v['macs']:>11d}")


def keras_exports():
    """Keras (tf.keras 3) through tf2onnx, opset 13: the NHWC input as Keras
    has it (tf2onnx puts one Transpose after it) and with `inputs_as_nchw`.
    Skipped, keeping the files already written, when tensorflow is absent
    (`pip install tensorflow-cpu tf2onnx`)."""
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf
        import tf2onnx
    except ImportError:
        print("tensorflow/tf2onnx not installed: Keras exports not rewritten", file=sys.stderr)
        with open(os.path.join(OUT, "manifest.json")) as f:
            return {k: v for k, v in json.load(f).items() if k.startswith("keras-")}
    L = tf.keras.layers

    def block(x, c, stride):
        s = x
        y = L.ReLU()(L.BatchNormalization()(L.Conv2D(c, 3, strides=stride, padding="same", use_bias=False)(x)))
        y = L.BatchNormalization()(L.Conv2D(c, 3, padding="same", use_bias=False)(y))
        if stride != 1 or s.shape[-1] != c:
            s = L.BatchNormalization()(L.Conv2D(c, 1, strides=stride, use_bias=False)(s))
        return L.ReLU()(L.Add()([y, s]))

    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((SIZE, SIZE, 3), name="input")
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 7, strides=2, padding="same", use_bias=False)(inp)))
    x = L.MaxPooling2D(3, 2, padding="same")(x)
    for c, stride in [(8, 1), (16, 2), (32, 2), (64, 2)]:
        x = block(x, c, stride)
    model = tf.keras.Model(inp, L.Dense(10, name="logits")(L.GlobalAveragePooling2D()(x)))
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([(rng.random(n) + 0.5).astype("f4"), (rng.standard_normal(n) * 0.1).astype("f4"),
                               (rng.standard_normal(n) * 0.1).astype("f4"), (rng.random(n) + 0.5).astype("f4")])
    macs = 0
    for layer in model.layers:
        if isinstance(layer, L.Conv2D):
            _, h, w, c = layer.output.shape
            macs += h * w * c * layer.kernel_size[0] * layer.kernel_size[1] * layer.input.shape[-1]
        elif isinstance(layer, L.Dense):
            macs += layer.units * layer.input.shape[-1]
    spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name="input"),)
    out = {}
    for name, nchw in (("keras-nhwc-op13", False), ("keras-nchw-op13", True)):
        path = os.path.join(OUT, name + ".onnx")
        tf2onnx.convert.from_keras(model, input_signature=spec, opset=13, output_path=path, inputs_as_nchw=["input"] if nchw else None)
        shape = [1, 3, SIZE, SIZE] if nchw else [1, SIZE, SIZE, 3]
        x = np.sin(np.arange(3 * SIZE * SIZE, dtype=np.float64) * 0.37).astype(np.float32).reshape(shape)
        want = model(np.transpose(x, (0, 2, 3, 1)) if nchw else x).numpy()
        got = run_ort(path, x)
        assert float(np.abs(got - want).max()) < 1e-4, name
        out[name] = {"params": int(model.count_params()), "macs": int(macs), "input": shape, "dynamic_hw": False,
                     "bytes": os.path.getsize(path), "output": [float(v) for v in got.reshape(-1)], "torch": "tf " + tf.__version__}
    return out


def test_input(size):
    """The fixed input the tests rebuild: sin(0.37 i) over the flat index i."""
    return np.sin(np.arange(3 * size * size, dtype=np.float64) * 0.37).astype(np.float32).reshape(1, 3, size, size)


def entry(model, path, x, dynamic_hw):
    """What the tests check a file against; MACs and outputs at 224 px for
    dynamic H/W (the size the tool must take when none is given)."""
    size = 224 if dynamic_hw else SIZE
    xin = torch.from_numpy(test_input(size))
    with torch.no_grad():
        want = model(xin).numpy()
    got = run_ort(path, xin.numpy())
    err = float(np.abs(got - want).max())
    assert err < 1e-4, (path, err)
    data = os.path.getsize(path) + sum(os.path.getsize(os.path.join(os.path.dirname(path), f)) for f in os.listdir(os.path.dirname(path))
                                       if f.endswith(".data") and f.startswith(os.path.basename(path)))
    return {
        "params": int(sum(p.numel() for p in model.parameters())),
        "macs": int(count_macs(model, xin)),
        "input": [1, 3, size, size],
        "dynamic_hw": dynamic_hw,
        "bytes": data,
        "output": [float(v) for v in got.reshape(-1)],
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
