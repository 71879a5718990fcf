//! Step 5 of `prune`: the data-free compensation of removed channels' constant part.
use super::*;

/// Folds the constant part of removed channels into the consumers' biases.
pub(super) fn compensate(graph: &mut Graph, cg: &ChannelGraph, removed: &[Vec<usize>]) {
    let values = constant_parts(graph, cg);
    let consumers: Vec<NodeIndex> = cg.roles.iter().filter(|(_, &r)| r == Role::Dense).map(|(&ix, _)| ix).collect();
    for ix in consumers {
        let node = graph.node(ix).clone();
        // MatMul has no bias input to fold into (canonicalize makes a weight's MatMul a Gemm).
        if node.op() == "MatMul" {
            continue;
        }
        let Some(&t) = node.input(0).and_then(|x| cg.index.get(x)) else { continue };
        let shift: Vec<(usize, f64)> =
            removed[t].iter().map(|&c| (c, values[cg.base[t] + c])).filter(|(_, v)| v.is_finite() && *v != 0.0).collect();
        if shift.is_empty() {
            continue;
        }
        let Some(w) = node.input(1).and_then(|n| graph.constant_f32(n)) else { continue };
        let out_axis = output_axis(&node);
        let in_axis = 1 - out_axis;
        let mut delta = vec![0.0f64; w.shape()[out_axis]];
        for &(c, v) in &shift {
            let col = w.index_axis(Axis(in_axis), c);
            // After removing `in_axis`, the output axis index shifts down if it came after it.
            let oa = if out_axis > in_axis { out_axis - 1 } else { out_axis };
            for (o, filter) in col.axis_iter(Axis(oa)).enumerate() {
                delta[o] += v * filter.iter().map(|&x| x as f64).sum::<f64>();
            }
        }
        // An existing Gemm bias is scaled by beta; a new one comes without it.
        let beta = if node.op() == "Gemm" && node.input(2).is_some() { node.attr_float("beta").unwrap_or(1.0) as f64 } else { 1.0 };
        add_to_bias(graph, ix, &delta.iter().map(|d| d / beta).collect::<Vec<_>>());
    }
}

/// Adds `delta` to the bias of node `ix`, creating the bias if needed.
pub(super) fn add_to_bias(graph: &mut Graph, ix: NodeIndex, delta: &[f64]) {
    let mut bias = graph.bias_or_zeros(ix, delta.len());
    if bias.len() == delta.len() {
        bias.iter_mut().zip(delta).for_each(|(v, d)| *v += *d as f32);
        graph.set_bias(ix, bias);
    }
}

/// For every slot, the value its channel would hold if its producer's
/// filter were zero: the bias pushed through per-channel ops. NaN where
/// unknown (then nothing is compensated).
pub(super) fn constant_parts(graph: &Graph, cg: &ChannelGraph) -> Vec<f64> {
    let mut v = vec![f64::NAN; cg.slot_count()];
    for ix in graph.topo_order().unwrap_or_default() {
        let Some(&role) = cg.roles.get(&ix) else { continue };
        let node = graph.node(ix);
        let (Some(x), Some(y)) = (node.input(0), node.output(0)) else { continue };
        let Some(&yt) = cg.index.get(y) else { continue };
        let n = cg.channels[yt];
        let at = |name: &str, c: usize, v: &[f64]| cg.slot(name, c).map_or(f64::NAN, |s| v[s]);
        let param = |slot: usize| node.input(slot).and_then(|p| graph.constant(p)).and_then(Weight::to_f64_vec);
        let out: Vec<f64> = match (node.op(), role) {
            (_, Role::Dense) => param(2).filter(|b| b.len() == n).unwrap_or_else(|| vec![0.0; n]),
            ("Conv", Role::Depthwise) => {
                let w = graph
                    .constant_f32(node.input(1).unwrap_or(""))
                    .map(|w| w.axis_iter(Axis(0)).map(|f| f.iter().map(|&x| x as f64).sum()).collect::<Vec<f64>>());
                let b = param(2).unwrap_or_else(|| vec![0.0; n]);
                (0..n).map(|c| w.as_ref().map_or(f64::NAN, |w| at(x, c, &v) * w[c] + b[c])).collect()
            }
            ("BatchNormalization", _) => match (param(1), param(2), param(3), param(4)) {
                (Some(g), Some(b), Some(m), Some(var)) => {
                    let eps = node.attr_float("epsilon").unwrap_or(1e-5) as f64;
                    (0..n).map(|c| crate::ir::batchnorm::apply(at(x, c, &v), g[c], b[c], m[c], var[c], eps)).collect()
                }
                _ => vec![f64::NAN; n],
            },
            ("Relu", _) => (0..n).map(|c| at(x, c, &v).max(0.0)).collect(),
            // A channel that is one constant stays that constant through these.
            ("Identity" | "Dropout" | "MaxPool" | "AveragePool" | "GlobalAveragePool" | "GlobalMaxPool" | "Resize" | "Upsample", _) => {
                (0..n).map(|c| at(x, c, &v)).collect()
            }
            ("Add" | "Sum", _) => {
                (0..n).map(|c| node.inputs().iter().filter(|i| !i.is_empty()).map(|i| operand(graph, cg, i, c, &v)).sum()).collect()
            }
            ("Flatten", _) => {
                let xc = cg.index.get(x).map_or(1, |&t| cg.channels[t]);
                let area = (n / xc.max(1)).max(1);
                (0..n).map(|c| at(x, c / area, &v)).collect()
            }
            _ => vec![f64::NAN; n],
        };
        for (c, val) in out.into_iter().enumerate() {
            v[cg.base[yt] + c] = val;
        }
    }
    v
}

/// Value of operand `name` at channel `c`: a slot's value or a constant's entry.
pub(super) fn operand(graph: &Graph, cg: &ChannelGraph, name: &str, c: usize, v: &[f64]) -> f64 {
    if let Some(s) = cg.slot(name, c) {
        return v[s];
    }
    match graph.constant_f32(name) {
        Some(w) if w.len() == 1 => w.iter().next().copied().unwrap_or(0.0) as f64,
        Some(w) => w.iter().nth(c).copied().map_or(f64::NAN, |x| x as f64),
        None => f64::NAN,
    }
}
