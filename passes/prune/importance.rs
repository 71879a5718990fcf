//! Filter importance, pluggable: a criterion scores every output filter of a
//! producer layer. `l1` (Li et al. 2017, the default) sums |W| of a filter;
//! `l2` takes its Euclidean norm. The pruning pass normalizes each layer's
//! scores by their mean, so layers of different scale compare, and sums the
//! normalized scores over the layers that write a coupled channel.
//! `reconstruction` is data-driven and chooses channels inside the pass's
//! calibrated refit (`src/refit/obs.rs`); its allocation across groups,
//! and the groups it cannot handle, use `l1` scores.
use super::dependency::{ChannelGraph, Role};
use super::{Importance, PruneOptions};
use crate::ir::{Graph, Weight};
use ndarray::{ArrayD, Axis};
use std::collections::HashMap;

/// A way to score filters.
pub trait Criterion {
    /// One score per slice of `weight` along `axis` (the output channels).
    fn scores(&self, weight: &ArrayD<f32>, axis: usize) -> Vec<f64>;
}

pub struct L1;
pub struct L2;

impl Criterion for L1 {
    fn scores(&self, weight: &ArrayD<f32>, axis: usize) -> Vec<f64> {
        per_slice(weight, axis, |f| f.iter().map(|v| v.abs() as f64).sum())
    }
}

impl Criterion for L2 {
    fn scores(&self, weight: &ArrayD<f32>, axis: usize) -> Vec<f64> {
        per_slice(weight, axis, |f| f.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt())
    }
}

/// `score` of every slice along `axis`; slices along axis 0 of a standard
/// layout array (conv filters) are read as contiguous chunks.
fn per_slice(weight: &ArrayD<f32>, axis: usize, score: impl Fn(&[f32]) -> f64) -> Vec<f64> {
    if let (0, Some(flat)) = (axis, weight.as_slice()) {
        let len = weight.shape().first().copied().unwrap_or(0);
        // An empty weight (a zero-sized dimension) scores 0 per filter.
        return if flat.is_empty() { vec![0.0; len] } else { flat.chunks(flat.len() / len).map(&score).collect() };
    }
    weight.axis_iter(Axis(axis)).map(|f| score(&f.iter().copied().collect::<Vec<f32>>())).collect()
}

pub fn criterion(kind: Importance) -> Box<dyn Criterion> {
    match kind {
        Importance::L1 | Importance::Reconstruction => Box::new(L1),
        Importance::L2 => Box::new(L2),
    }
}

/// Scores divided by their mean (all-zero layers stay zero).
pub fn normalized(scores: Vec<f64>) -> Vec<f64> {
    let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
    if mean > 0.0 {
        scores.into_iter().map(|s| s / mean).collect()
    } else {
        scores
    }
}

/// Producer filter scores per slot (normalized per layer).
pub fn producer_scores(graph: &Graph, cg: &ChannelGraph, opts: &PruneOptions) -> HashMap<usize, f64> {
    let crit = criterion(opts.importance);
    let mut out: HashMap<usize, f64> = HashMap::new();
    for (&ix, &role) in &cg.roles {
        let node = graph.node(ix);
        if role != Role::Dense {
            continue;
        }
        let (Some(y), Some(w)) = (node.output(0), node.input(1).and_then(|n| graph.constant_f32(n))) else { continue };
        let axis = output_axis(node);
        let mut scores = crit.scores(w, axis);
        if let Some(scale) = following_bn_scale(graph, y) {
            scores.iter_mut().zip(scale).for_each(|(s, g)| *s *= g.abs());
        }
        for (c, s) in normalized(scores).into_iter().enumerate() {
            if let Some(slot) = cg.slot(y, c) {
                *out.entry(slot).or_insert(0.0) += s;
            }
        }
    }
    out
}

/// The weight axis holding output channels: 0 for Conv and transposed Gemm.
pub fn output_axis(node: &crate::ir::Node) -> usize {
    match node.op() {
        "Gemm" if node.attr_int("transB").unwrap_or(0) == 1 => 0,
        "Gemm" | "MatMul" => 1,
        _ => 0,
    }
}

/// |γ/√(σ²+ε)| of a BN that alone reads `tensor`.
pub fn following_bn_scale(graph: &Graph, tensor: &str) -> Option<Vec<f64>> {
    let consumers = graph.consumers(tensor);
    let [(bn, 0)] = consumers.as_slice() else { return None };
    let node = graph.node(*bn);
    if node.op() != "BatchNormalization" {
        return None;
    }
    let p = |slot: usize| node.input(slot).and_then(|n| graph.constant(n)).and_then(Weight::to_f64_vec);
    let (g, v) = (p(1)?, p(4)?);
    let eps = node.attr_float("epsilon").unwrap_or(1e-5) as f64;
    Some(crate::ir::batchnorm::scale(&g, &v, eps))
}
