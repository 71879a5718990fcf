#!/usr/bin/env python3
"""PyTorch's bf16 inference as a yardstick for `distill.precision: bf16` (issue #18).

Run by hand (not in CI), with torch and onnx2torch from PyPI in a local venv:

    /tmp/venv-torch/bin/python scripts/bf16_teacher.py ../shared

The shared ResNet-50 (onnx2torch) in f32 and under torch.autocast("cpu",
bfloat16) (oneDNN's AVX512-BF16 kernels; activations between layers in
bf16 too): ms per image at batch 1 and 16 on 2 threads (medians of 7 after
2 warm-ups), then top-1 of both, their top-1 agreement and KL on the 744
evaluation photos (the sample sorted by path, after the first 256; caffe
preprocessing: shorter side 256, centre 224, BGR minus the means). Our own
engine's figures: `cargo bench --bench pipeline -- --bf16-accuracy`.
"""
import statistics, sys, time, pathlib
import numpy as np, onnx, torch
from onnx2torch import convert
from PIL import Image
torch.set_num_threads(2)
root = pathlib.Path(sys.argv[1])
m = convert(onnx.load(str(root / "models/resnet50-imagenet.onnx"))).eval()
def med(fn, runs=7):
    for _ in range(2): fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
with torch.inference_mode():
    for b in (1, 16):
        x = torch.randn(b, 3, 224, 224) * 50
        f32 = med(lambda: m(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = med(lambda: m(x))
        print(f"batch {b:2}: f32 {1e3*f32/b:6.1f} ms/image, bf16 {1e3*bf/b:6.1f} ms/image, ratio {f32/bf:.2f}", flush=True)
    classes = [l.split()[0] for l in open(root / "data/imagenet-1k-classes.txt")]
    paths = sorted((root / "data/imagenet-1k-sample").glob("*/*"))[256:]
    mean = np.array([103.939, 116.779, 123.68], np.float32)
    def load(p):
        im = Image.open(p).convert("RGB"); w, h = im.size; s = 256 / min(w, h)
        im = im.resize((max(224, round(w * s)), max(224, round(h * s))), Image.BILINEAR)
        w, h = im.size; l, t = (w - 224) // 2, (h - 224) // 2
        a = np.asarray(im.crop((l, t, l + 224, t + 224)), np.float32)[:, :, ::-1] - mean
        return torch.from_numpy(a.transpose(2, 0, 1).copy())
    right = [0, 0]; agree = 0; maxrel = 0.0; kl = 0.0
    for i in range(0, len(paths), 16):
        ps = paths[i:i + 16]; x = torch.stack([load(p) for p in ps])
        a = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = m(x).float()
        la = torch.tensor([classes.index(p.parent.name) for p in ps])
        right[0] += (a.argmax(1) == la).sum().item(); right[1] += (b.argmax(1) == la).sum().item()
        agree += (a.argmax(1) == b.argmax(1)).sum().item()
        pa = a.softmax(1) if a.min() < 0 or a.max() > 1 else a
        pb = b.softmax(1) if b.min() < 0 or b.max() > 1 else b
        kl += (pa * (pa.clamp_min(1e-12).log() - pb.clamp_min(1e-12).log())).sum().item()
        maxrel = max(maxrel, ((a - b).abs().max() / a.abs().max()).item())
    n = len(paths)
    print(f"{n} photos: top-1 f32 {right[0]/n:.4f} bf16 {right[1]/n:.4f}; top-1 agreement {agree/n:.4f}; mean KL(f32||bf16) {kl/n:.2e}; max |diff|/max|out| {maxrel:.3f}")
