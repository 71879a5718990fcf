#!/usr/bin/env python3
"""Renders docs/ablation.jsonl (from scripts/ablation.sh) into the tables of
docs/RESULTS.md (between the BEGIN/END markers) and two SVG plots:
docs/top1-vs-params.svg and docs/top1-vs-macs.svg. The last line of each
variant wins. No plotting library needed: the SVG is written by hand."""
import json, re, sys

ORIGINAL = {"params": 25636712, "macs": 3857973248}
LABELS = {
    "original": "original", "fold": "fold",
    "prune-free": "prune (data-free)", "prune-cal": "prune (calibrated)", "prune-distill": "prune + distill",
    "dw-free": "dw r1 (data-free)", "dw-cal": "dw r1 (calibrated)", "dw-distill": "dw r1 + distill", "dw-distill-lr1e-3": "dw r1 + distill (lr 1e-3)",
    "prune-dw-free": "prune + dw (data-free)", "prune-dw-cal": "prune + dw (calibrated)",
    "prune-dw-distill": "prune + dw + distill", "cresnet": "**`pipeline: cresnet`**",
    "cresnet-v1": "previous recipe (session 2): prune + dw + distill (6 epochs, lr 1e-3)",
    "lr-dw-free": "lowrank + dw, one ratio (data-free)", "lr-dw-cal": "lowrank + dw, one ratio (calibrated, 1,256 images)",
    "lr-dw-distill": "lowrank + dw + distill (session 4 recipe: one ratio for all stages)",
    "split-free": "per-stage lowrank + dw (data-free)", "split-cal": "per-stage lowrank + dw (calibrated, 1,256 images)",
    "split-distill": "**per-stage lowrank + dw + distill** (= `pipeline: cresnet`)",
}

def load(path="docs/ablation.jsonl"):
    rows = {}
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            rows[r["name"]] = r
    return rows

def table(rows):
    out = ["| variant | params | MACs | file | tract 1 thread | tract 2 threads | top-1 | top-5 | Animals-10 | optimize |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        out.append(f"| {LABELS.get(name, name)} | {r['params']/1e6:.2f} M ({100*r['params']/ORIGINAL['params']:.1f} %) "
                   f"| {r['macs']/1e9:.2f} G ({100*r['macs']/ORIGINAL['macs']:.1f} %) | {r['file_mb']:.1f} MB "
                   f"| {r['latency_ms_1t']:.1f} ms | {r['latency_ms_2t']:.1f} ms | {r['top1']:.3f} | {r['top5']:.3f} "
                   f"| {r['animals_top1']:.3f} | {r['optimize_s']:.0f} s |")
    return "\n".join(out)

def svg(rows, key, label, path):
    w, h, m = 640, 400, 60
    xmax = ORIGINAL[key] * 1.05
    px = lambda v: m + (w - 2 * m) * v / xmax
    py = lambda v: h - m - (h - 2 * m) * v
    colors = {"free": "#d62728", "cal": "#ff7f0e", "distill": "#2ca02c"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<line x1="{m}" y1="{h-m}" x2="{w-m}" y2="{h-m}" stroke="black"/><line x1="{m}" y1="{m}" x2="{m}" y2="{h-m}" stroke="black"/>',
             f'<text x="{w/2}" y="{h-15}" text-anchor="middle">{label}</text>',
             f'<text x="15" y="{h/2}" transform="rotate(-90 15 {h/2})" text-anchor="middle">top-1 (744 dev images)</text>']
    for t in range(0, 11, 2):
        parts.append(f'<text x="{m-8}" y="{py(t/10)+4}" text-anchor="end">{t/10:.1f}</text>')
    for t in range(0, 6):
        v = xmax * t / 5
        parts.append(f'<text x="{px(v)}" y="{h-m+15}" text-anchor="middle">{v/1e6:.0f} M</text>' if key == "params" else
                     f'<text x="{px(v)}" y="{h-m+15}" text-anchor="middle">{v/1e9:.1f} G</text>')
    for name, r in rows.items():
        kind = next((k for k in colors if k in name), None)
        color = colors.get(kind, "#1f77b4")
        x, y = px(r[key]), py(r["top1"])
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color}"/>')
        parts.append(f'<text x="{x+7:.1f}" y="{y-6:.1f}">{LABELS.get(name, name).replace("*", "").replace("`", "")}</text>')
    parts.append("</svg>")
    open(path, "w").write("\n".join(parts))

def stage_bars(path_json, path_svg):
    """Per-stage weights before/after (from `stats A B --format json`)."""
    c = json.load(open(path_json))
    before = {s["stage"]: s["params"] for s in c["stages_before"]}
    after = {s["stage"]: s["params"] for s in c["stages_after"]}
    names = list(before) + [k for k in after if k not in before]
    w, h, m, top = 640, 360, 60, max(list(before.values()) + list(after.values()))
    bw = (w - 2 * m) / len(names) / 3
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<line x1="{m}" y1="{h-m}" x2="{w-m}" y2="{h-m}" stroke="black"/>',
             f'<text x="{m}" y="20">params per stage: original (grey) vs compressed (green); {c["after"]["params"]/1e6:.2f} M of {c["before"]["params"]/1e6:.2f} M kept</text>']
    for i, name in enumerate(names):
        x = m + i * 3 * bw
        for j, (v, color) in enumerate([(before.get(name, 0), "#999999"), (after.get(name, 0), "#2ca02c")]):
            bh = (h - 2 * m) * v / top
            parts.append(f'<rect x="{x + j*bw:.1f}" y="{h-m-bh:.1f}" width="{bw:.1f}" height="{bh:.1f}" fill="{color}"/>')
            parts.append(f'<text x="{x + j*bw + bw/2:.1f}" y="{h-m-bh-4:.1f}" text-anchor="middle" font-size="9">{v/1e6:.2f}</text>')
        parts.append(f'<text x="{x + bw:.1f}" y="{h-m+15}" text-anchor="middle">{name}</text>')
    parts.append("</svg>")
    open(path_svg, "w").write("\n".join(parts))

def main():
    rows = load()
    doc = open("docs/RESULTS.md").read()
    doc = re.sub(r"(<!-- BEGIN ablation -->\n).*?(<!-- END ablation -->)", lambda m: m.group(1) + table(rows) + "\n" + m.group(2), doc, flags=re.S)
    open("docs/RESULTS.md", "w").write(doc)
    svg(rows, "params", "params", "docs/top1-vs-params.svg")
    svg(rows, "macs", "MACs", "docs/top1-vs-macs.svg")
    try:
        stage_bars("docs/stages.json", "docs/stages.svg")
    except FileNotFoundError:
        pass

if __name__ == "__main__":
    sys.exit(main())
