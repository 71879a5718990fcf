//! Pass `dw`: depthwise factorization of KxK convolutions (Network
//! Decoupling, Guo et al. 2018; the second half of CResNet).
//!
//! Before:  X (C_in) → Conv W [C_out, C_in, K, K], bias b → Y
//! After:   X → Conv D [C_in·r, 1, K, K], group C_in (same strides, pads,
//!          dilations, auto_pad; no bias) → Conv P [C_out, C_in·r, 1, 1], bias b → Y
//!
//! Weights by SVD per input channel i: W[:, i] reshaped to C_out × K² is
//! U Σ Vᵀ; the depthwise filters of channel i are the first r rows of Vᵀ
//! (K×K each), the pointwise column i·r + j is σ_j·U[:, j]. Exact when
//! r = min(C_out, K²). One r per layer (ONNX depthwise convs have one
//! channel multiplier): `rank: r`, or `energy: e` = the smallest r whose
//! kept squared singular values (summed over all input channels) reach a
//! share e of the total. Without options: `energy: 0.95`.
//!
//! Applies to group-1 Convs with a K>1 kernel and a constant f32 weight used
//! only by this conv. Declines when factorizing would not shrink the layer
//! by `min_gain` (default 0.1) of its params (= of its MACs): it pays only
//! while r < K²·C_out/(K² + C_out). `include`/`exclude` take node-name
//! patterns (`*` matches any run of characters); by default the stem — a
//! conv reading a graph input, ResNet's 7x7 on RGB — is left alone: it
//! holds 0.04 % of the weights, its 3 input channels make the depthwise
//! half tiny, and its features feed everything after it. `include` it by name.
use super::{PassContext, PassReport};
use crate::config::DwOptions;
use crate::error::Result;
use crate::ir::{Graph, Node, Weight};
use ndarray::{Array4, ArrayD};
use petgraph::stable_graph::NodeIndex;
use rayon::prelude::*;

/// One input channel's SVD: U·Σ (C_out × k) and Vᵀ rows (k × K²).
struct ChannelSvd {
    us: Vec<Vec<f64>>,
    vt: Vec<Vec<f64>>,
    sigma2: Vec<f64>,
}

/// A planned factorization of one conv.
pub struct Factorization {
    pub rank: usize,
    pub energy: f64,
    pub depthwise: Array4<f32>,
    pub pointwise: Array4<f32>,
}

pub fn run(graph: &mut Graph, ctx: &PassContext, opts: &DwOptions) -> Result<PassReport> {
    let mut report = PassReport::default();
    let mut pointwise = Vec::new();
    let convs: Vec<NodeIndex> = graph.topo_order()?.into_iter().filter(|&ix| graph.node(ix).op() == "Conv" && graph.node(ix).is_standard()).collect();
    for ix in convs {
        let name = graph.node(ix).name().to_string();
        match eligible(graph, ix, opts) {
            Ok(None) => {}
            Ok(Some(weight)) => match factorize(&weight, opts) {
                Ok(f) => {
                    let what = format!("rank {} (energy {:.4}), params {} -> {}", f.rank, f.energy, weight.len(), f.depthwise.len() + f.pointwise.len());
                    pointwise.push(replace(graph, ix, f)?);
                    report.change(&name, what);
                }
                Err(reason) => report.decline(&name, reason),
            },
            Err(reason) => report.decline(&name, reason),
        }
    }
    // The pointwise half carries the conv's output name: refit it to the
    // conv's outputs (and, with refit_next, the convs after it to theirs).
    let mut nodes = pointwise.clone();
    if opts.refit_next {
        nodes.extend(pointwise.iter().flat_map(|&pw| next_convs(graph, pw)));
    }
    let order = graph.topo_order()?;
    nodes.sort_by_key(|n| order.iter().position(|o| o == n));
    nodes.dedup();
    let layers = nodes.into_iter().map(|node| crate::recover::Layer { node, kept: None }).collect();
    ctx.recover(graph, layers, &mut report)?;
    Ok(report)
}

/// Group-1 convs reading `ix`'s output directly or through one Relu.
fn next_convs(graph: &Graph, ix: NodeIndex) -> Vec<NodeIndex> {
    let Some(out) = graph.node(ix).output(0) else { return vec![] };
    let mut readers = graph.consumers(out);
    if let [(relu, 0)] = readers.as_slice() {
        if graph.node(*relu).op() == "Relu" {
            readers = graph.node(*relu).output(0).map(|o| graph.consumers(o)).unwrap_or_default();
        }
    }
    readers.into_iter().map(|(n, _)| n).filter(|&n| graph.node(n).op() == "Conv" && graph.node(n).attr_int("group").unwrap_or(1) == 1).collect()
}

/// Simple glob: `*` matches any run of characters.
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => name.strip_prefix(head).is_some_and(|rest| (0..=rest.len()).any(|i| rest.is_char_boundary(i) && matches(tail, &rest[i..]))),
    }
}

/// The conv's weight if the pass should try it; None to skip silently
/// (1x1 convs, excluded names); Err to decline with a reason.
fn eligible(graph: &Graph, ix: NodeIndex, opts: &DwOptions) -> std::result::Result<Option<ArrayD<f32>>, String> {
    let node = graph.node(ix);
    let name = node.name();
    let included = opts.include.iter().any(|p| matches(p, name));
    if (!opts.include.is_empty() && !included) || opts.exclude.iter().any(|p| matches(p, name)) {
        return Ok(None);
    }
    let wname = node.input(1).ok_or("no weight")?;
    let w = graph.constant(wname).ok_or("weight is not a constant initializer")?;
    let w = w.as_f32().ok_or("weight is not f32")?;
    if w.ndim() != 4 || w.shape()[2] * w.shape()[3] <= 1 {
        return Ok(None);
    }
    if node.attr_int("group").unwrap_or(1) != 1 {
        return Err("grouped conv".into());
    }
    if node.input(0).is_some_and(|x| graph.is_graph_input(x)) && !included {
        return Ok(None);
    }
    if graph.consumers(wname).len() != 1 {
        return Err("weight shared with another node".into());
    }
    Ok(Some(w.clone()))
}

fn channel_svd(w: &ArrayD<f32>, i: usize) -> ChannelSvd {
    let (c_out, kk) = (w.shape()[0], w.shape()[2] * w.shape()[3]);
    let m = faer::Mat::<f64>::from_fn(c_out, kk, |o, k| w[[o, i, k / w.shape()[3], k % w.shape()[3]]] as f64);
    let k = c_out.min(kk);
    match m.thin_svd() {
        Ok(svd) => {
            let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
            ChannelSvd {
                us: (0..k).map(|j| (0..c_out).map(|o| u[(o, j)] * s[j]).collect()).collect(),
                vt: (0..k).map(|j| (0..kk).map(|p| v[(p, j)]).collect()).collect(),
                sigma2: (0..k).map(|j| s[j] * s[j]).collect(),
            }
        }
        // faer reports non-convergence only for NaN/inf input.
        Err(_) => ChannelSvd { us: vec![vec![f64::NAN; c_out]; k], vt: vec![vec![0.0; kk]; k], sigma2: vec![f64::NAN; k] },
    }
}

/// The rank for `opts`, and the energy it keeps.
fn choose_rank(svds: &[ChannelSvd], max_rank: usize, opts: &DwOptions) -> (usize, f64) {
    let total: f64 = svds.iter().flat_map(|s| &s.sigma2).sum();
    let kept = |r: usize| svds.iter().map(|s| s.sigma2.iter().take(r).sum::<f64>()).sum::<f64>() / total.max(f64::MIN_POSITIVE);
    let rank = match (opts.rank, opts.energy) {
        (Some(r), _) => r.min(max_rank),
        (None, energy) => {
            let e = energy.unwrap_or(0.95);
            (1..=max_rank).find(|&r| kept(r) >= e - 1e-12).unwrap_or(max_rank)
        }
    };
    (rank, if total > 0.0 { kept(rank) } else { 1.0 })
}

/// SVD factorization of a [C_out, C_in, K, K] weight.
pub fn factorize(w: &ArrayD<f32>, opts: &DwOptions) -> std::result::Result<Factorization, String> {
    let (c_out, c_in, kh, kw) = (w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]);
    let svds: Vec<ChannelSvd> = (0..c_in).into_par_iter().map(|i| channel_svd(w, i)).collect();
    if svds.iter().any(|s| s.sigma2.iter().any(|v| !v.is_finite())) {
        return Err("weight holds NaN or infinity".into());
    }
    let max_rank = c_out.min(kh * kw);
    let (rank, energy) = choose_rank(&svds, max_rank, opts);
    let after = c_in * rank * kh * kw + c_out * c_in * rank;
    let gain = 1.0 - after as f64 / (c_out * c_in * kh * kw) as f64;
    if gain < opts.min_gain {
        return Err(format!("rank {rank} saves {:.1} % of the layer, less than min_gain {:.1} %", 100.0 * gain, 100.0 * opts.min_gain));
    }
    let depthwise = Array4::from_shape_fn((c_in * rank, 1, kh, kw), |(d, _, y, x)| svds[d / rank].vt[d % rank][y * kw + x] as f32);
    let pointwise = Array4::from_shape_fn((c_out, c_in * rank, 1, 1), |(o, d, _, _)| svds[d / rank].us[d % rank][o] as f32);
    Ok(Factorization { rank, energy, depthwise, pointwise })
}

/// Replaces conv `ix` by the depthwise + pointwise pair; returns the pointwise node.
fn replace(graph: &mut Graph, ix: NodeIndex, f: Factorization) -> Result<NodeIndex> {
    let conv = graph.node(ix).clone();
    let name = conv.name().to_string();
    let (dw_name, pw_name) = (graph.fresh_name(&format!("{name}_dw")), graph.fresh_name(&format!("{name}_pw")));
    let mid = graph.fresh_name(&format!("{name}_dw_out"));
    let (dw_w, pw_w) = (graph.fresh_name(&format!("{name}_dw.weight")), graph.fresh_name(&format!("{name}_pw.weight")));
    let c_in = f.depthwise.shape()[0] / f.rank;
    let (kh, kw) = (f.depthwise.shape()[2], f.depthwise.shape()[3]);
    graph.weights.insert(dw_w.clone(), Weight::from_f32(&dw_w, f.depthwise.into_dyn()));
    graph.weights.insert(pw_w.clone(), Weight::from_f32(&pw_w, f.pointwise.into_dyn()));
    let mut dw = conv.clone();
    dw.proto.name = Some(dw_name);
    dw.proto.input = vec![conv.inputs()[0].clone(), dw_w];
    dw.proto.output = vec![mid.clone()];
    dw.set_attr_int("group", c_in as i64);
    dw.set_attr_ints("kernel_shape", &[kh as i64, kw as i64]);
    let mut pw = Node::new("Conv", &pw_name, &[&mid, &pw_w], &[conv.outputs()[0].as_str()]);
    if let Some(b) = conv.input(2) {
        pw.proto.input.push(b.to_string());
    }
    pw.set_attr_ints("kernel_shape", &[1, 1]);
    graph.remove_node(ix)?;
    graph.net.add_node(dw);
    let pw = graph.net.add_node(pw);
    graph.relink()?;
    Ok(pw)
}
