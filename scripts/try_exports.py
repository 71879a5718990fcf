#!/usr/bin/env python3
"""Tries the tool as a new user would on full-size exports the tests never
see (torchvision architectures at 224 px, random weights; classic and
dynamo exporters, with and without `optimize`, external data). For each:
load (`stats`), round trip (`--passes none`, byte-identical), fold (exact in
tract: `check --random`), `fold,prune` and `--pipeline cresnet` (weights
kept, declines). Run by hand; needs torch/torchvision/onnx (see
scripts/export_corpus.py) and a release build:

    cargo build --release && /tmp/venv/bin/python scripts/try_exports.py [WORKDIR]
"""
import json
import os
import subprocess
import sys
import tempfile

import onnx
import torch
import torchvision

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BIN = os.path.join(ROOT, "target", "release", "cresnet-opt")
CASES = [
    ("resnet101", "classic", {}),
    ("resnext50_32x4d", "dynamo", {}),
    ("wide_resnet50_2", "classic", {}),
    ("efficientnet_b0", "dynamo", {}),
    ("mobilenet_v3_small", "classic", {}),
    ("resnet34", "dynamo", {"optimize": False}),
    ("resnet50", "dynamo", {"external": True}),
    ("regnet_y_400mf", "classic", {}),
]


def export(name, exporter, opts, path):
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    names = dict(input_names=["input"], output_names=["logits"])
    if exporter == "classic":
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **names)
    else:
        prog = torch.onnx.export(model, (x,), dynamo=True, optimize=opts.get("optimize", True),
                                 dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},), **names)
        prog.save(path, external_data=opts.get("external", False))
    if opts.get("external") and not any(f.endswith(".data") for f in os.listdir(os.path.dirname(path))):
        m = onnx.load(path)
        onnx.save(m, path, save_as_external_data=True, location=os.path.basename(path) + ".data")


def run(*args):
    p = subprocess.run([BIN, *args], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def declines(report):
    out = []
    for p in report["passes"]:
        inner = [d for d in p["declined"] if d["reason"] not in ("graph input", "graph output")]
        if inner:
            out.append(f"{p['pass']}: {len(inner)} declined, first `{inner[0]['node']}`: {inner[0]['reason'][:90]}")
    return out


def main():
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="cresnet-try-")
    rows = []
    for name, exporter, opts in CASES:
        d = os.path.join(work, f"{name}-{exporter}")
        os.makedirs(d, exist_ok=True)
        src = os.path.join(d, "model.onnx")
        if not os.path.exists(src):
            export(name, exporter, opts, src)
        row = {"model": name, "exporter": exporter + ("" if opts.get("optimize", True) else " optimize=False")
               + (" external data" if opts.get("external") else "")}
        code, out, err = run("stats", src, "--format", "json")
        row["loads"] = code == 0
        if code != 0:
            row["error"] = err.strip().splitlines()[-1]
            rows.append(row)
            continue
        row["params"] = json.loads(out)["params"]
        code, _, err = run(src, "-o", os.path.join(d, "none.onnx"), "--passes", "none")
        same = code == 0 and not opts.get("external") and open(src, "rb").read() == open(os.path.join(d, "none.onnx"), "rb").read()
        row["round trip"] = "identical" if same else ("ok (data inlined)" if code == 0 else err.strip()[-120:])
        folded = os.path.join(d, "fold.onnx")
        code, _, err = run(src, "-o", folded, "--passes", "fold", "-q")
        code, out, err = run("check", folded, "--reference", src, "--random", "2", "--format", "json", "--quiet")
        row["fold max rel diff"] = json.loads(out)["max_rel_diff"] if code == 0 else err.strip()[-120:]
        for label, args in (("fold,prune", ["--passes", "fold,prune"]), ("cresnet", ["--pipeline", "cresnet"])):
            rep = os.path.join(d, f"{label}.json")
            code, _, err = run(src, "-o", os.path.join(d, f"{label}.onnx"), *args, "-q", "--report", rep)
            if code != 0:
                row[label] = "error: " + err.strip().splitlines()[-1][:150]
                continue
            r = json.load(open(rep))
            row[label] = f"{100.0 * r['params_after'] / r['params_before']:.2f} % of the weights"
            row[label + " declines"] = declines(r)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
