//! Filter importance, pluggable: a criterion scores every output filter of a
//! producer layer. `l1` (Li et al. 2017, the default) sums |W| of a filter;
//! `l2` takes its Euclidean norm. The pruning pass normalizes each layer's
//! scores by their mean, so layers of different scale compare, and sums the
//! normalized scores over the layers that write a coupled channel.
//! `reconstruction` is data-driven and chooses channels inside the pass's
//! calibrated refit (`src/refit/obs.rs`); its allocation across groups,
//! and the groups it cannot handle, use `l1` scores.
use super::Importance;
use ndarray::{ArrayD, Axis};

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
