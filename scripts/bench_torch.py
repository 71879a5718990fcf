#!/usr/bin/env python3
"""PyTorch's CPU training speed on the students our engine trains (issue #18).

Run by hand (not in CI), on an idle machine, beside our engine's figures:

    python3 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch==2.15.0 onnx2torch
    bash scripts/bench_torch.sh          # writes the students, runs both, prints the table

For each ONNX file given, this builds the same network in PyTorch
(onnx2torch), optionally with a BatchNorm2d after every conv (as our
`distill: {batchnorm: train}` and `cargo bench --bench pipeline -- --students`
do), and times forward, forward + backward (what our bench times) and a
whole step (+ Adam) at batch 16, 224 px, with the given threads: medians of
`--runs` after 2 warm-ups.
It also times a 1024x1024 float32 GEMM, the CPU's practical peak.
"""
import argparse
import statistics
import sys
import time


def with_bn(module, torch):
    """Puts a BatchNorm2d after every Conv2d (recursively)."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Conv2d):
            setattr(module, name, torch.nn.Sequential(child, torch.nn.BatchNorm2d(child.out_channels)))
        else:
            with_bn(child, torch)
    return module


def median_time(fn, runs):
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemm_peak(torch, runs):
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median_time(lambda: torch.mm(a, b), runs * 5)
    return 2 * n**3 / t / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="ONNX students (folded: no BatchNormalization nodes)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--bn", action="store_true", help="a BatchNorm2d after every conv, in training mode")
    a = p.parse_args()
    import onnx
    import torch
    from onnx2torch import convert

    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, batch {a.batch}, {a.size} px, BN {'on' if a.bn else 'off'}")
    print(f"GEMM 1024x1024 f32: {gemm_peak(torch, a.runs):.1f} GFLOP/s")
    for path in a.models:
        net = convert(onnx.load(path))
        if a.bn:
            with_bn(net, torch)
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-5)
        x = torch.full((a.batch, 3, a.size, a.size), 0.5)

        def step():
            opt.zero_grad(set_to_none=True)
            out = net(x)
            out.float().mean().backward()
            opt.step()

        def forward_backward():
            net.zero_grad(set_to_none=True)
            net(x).float().mean().backward()

        def forward():
            with torch.no_grad():
                net(x)

        f = median_time(forward, a.runs)
        fb = median_time(forward_backward, a.runs)
        s = median_time(step, a.runs)
        params = sum(t.numel() for t in net.parameters())
        print(
            f"{path}: params {params}, forward {1e3 * f:.0f} ms, forward+backward {1e3 * fb:.0f} ms,"
            f" step (+ Adam) {1e3 * s:.0f} ms per batch of {a.batch} = {s / a.batch * 1e3:.1f} ms/image"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
