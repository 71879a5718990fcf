//! What the factorizing passes (`dw`, `lowrank`) share: which layers they
//! may touch ([`Selection`]), their common option checks, the rank and
//! gain arithmetic, the eigendecomposition behind their SVDs, and the
//! calibrated driver that factorizes layers one at a time on data.
use super::PassReport;
use crate::error::{Error, Result};
use crate::ir::{Graph, Model};
use crate::refit::{Calibration, Layer};
use crate::shape::Shapes;
use faer::{Mat, Side};
use ndarray::ArrayD;
use petgraph::stable_graph::NodeIndex;

/// Simple glob: `*` matches any run of characters.
pub fn matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            name.strip_prefix(head).is_some_and(|rest| (0..=rest.len()).any(|i| rest.is_char_boundary(i) && matches(tail, &rest[i..])))
        }
    }
}

/// Which layers a factorizing pass may touch: name patterns and a range
/// of output heights (the options `dw` and `lowrank` share).
pub struct Selection<'a> {
    pub include: &'a [String],
    pub exclude: &'a [String],
    pub min_resolution: Option<usize>,
    pub max_resolution: Option<usize>,
}

impl Selection<'_> {
    /// None if node `ix` is not selected, else whether `include` names it
    /// (which also admits a layer a pass skips by default, such as the stem).
    pub fn pick(&self, graph: &Graph, shapes: &Shapes, ix: NodeIndex) -> Option<bool> {
        let name = graph.node(ix).name();
        let included = self.include.iter().any(|p| matches(p, name));
        let skipped = (!self.include.is_empty() && !included) || self.exclude.iter().any(|p| matches(p, name));
        (!skipped && self.in_resolution(graph, shapes, ix)).then_some(included)
    }

    /// Whether the output height (1 for a 2-d output such as a Gemm's) lies
    /// within the range; with a bound set, an unknown shape does not.
    fn in_resolution(&self, graph: &Graph, shapes: &Shapes, ix: NodeIndex) -> bool {
        let y = graph.node(ix).output(0).unwrap_or("");
        height_within(shapes, y, self.min_resolution, self.max_resolution)
    }

    /// The selected layer's f32 weight and whether `include` names it;
    /// None to skip silently, Err to decline with the reason.
    pub fn weight<'g>(
        &self,
        graph: &'g Graph,
        shapes: &Shapes,
        ix: NodeIndex,
    ) -> std::result::Result<Option<(&'g ArrayD<f32>, bool)>, String> {
        let Some(included) = self.pick(graph, shapes, ix) else { return Ok(None) };
        let wname = graph.node(ix).input(1).ok_or("no weight")?;
        let w = graph.constant(wname).ok_or("weight is not a constant initializer")?;
        Ok(Some((w.as_f32().ok_or("weight is not f32")?, included)))
    }
}

/// Whether tensor `name`'s height (1 for a tensor of fewer than 3 dims,
/// such as a Gemm's output) lies within [min, max]; with a bound set, an
/// unknown shape does not. Shared by `dw`, `lowrank` and `prune`.
pub fn height_within(shapes: &Shapes, name: &str, min: Option<usize>, max: Option<usize>) -> bool {
    if min.is_none() && max.is_none() {
        return true;
    }
    let shape = shapes.get(name).and_then(|t| t.shape.as_ref());
    let height = shape.map(|s| if s.len() >= 3 { s[2] } else { 1 });
    height.is_some_and(|h| min.is_none_or(|m| h >= m) && max.is_none_or(|m| h <= m))
}

/// Whether a layer reading a graph input is skipped: the stem, unless included by name.
pub fn skips_stem(graph: &Graph, ix: NodeIndex, included: bool) -> bool {
    graph.node(ix).input(0).is_some_and(|x| graph.is_graph_input(x)) && !included
}

/// Why a layer's weight may not be rewritten in place, if it is shared.
pub fn shared_weight(graph: &Graph, ix: NodeIndex) -> std::result::Result<(), String> {
    let wname = graph.node(ix).input(1).unwrap_or("");
    if graph.consumers(wname).len() != 1 {
        return Err("weight shared with another node".into());
    }
    Ok(())
}

/// The checks `dw` and `lowrank` share: a rank of at least 1, a
/// `min_gain` below 1, a resolution range that can match a layer.
pub fn check_options(pass: &str, rank: Option<usize>, min_gain: f64, resolution: (Option<usize>, Option<usize>)) -> Result<()> {
    if let (Some(min), Some(max)) = resolution {
        if min > max {
            return Err(Error::Config(format!(
                "`{pass}.min_resolution` is {min}, above `{pass}.max_resolution` ({max}): no layer can match"
            )));
        }
    }
    if rank == Some(0) {
        return Err(Error::Config(format!("`{pass}.rank` must be at least 1")));
    }
    if min_gain.is_nan() || min_gain >= 1.0 {
        return Err(Error::Config(format!("`{pass}.min_gain` is {min_gain}, but must be below 1 (negative allows growth)")));
    }
    Ok(())
}

/// Share of a layer's weights (= of its MACs) that a factorization saves.
pub fn gain(params_before: usize, params_after: usize) -> f64 {
    1.0 - params_after as f64 / params_before as f64
}

/// The decline reason when `gain` at `rank` is below `min_gain`.
pub fn too_small(rank: usize, gain: f64, min_gain: f64) -> Option<String> {
    (gain < min_gain).then(|| format!("rank {rank} saves {:.1} % of the layer, less than min_gain {:.1} %", 100.0 * gain, 100.0 * min_gain))
}

/// The smallest rank up to `max_rank` whose kept energy reaches `energy`.
pub fn rank_for_energy(kept: impl Fn(usize) -> f64, max_rank: usize, energy: f64) -> usize {
    (1..=max_rank).find(|&r| kept(r) >= energy - 1e-12).unwrap_or(max_rank)
}

/// Eigenvalues (largest first, negatives clipped to 0) and eigenvectors
/// (as columns, same order) of a symmetric matrix.
pub fn eigen_desc(g: &Mat<f64>) -> Option<(Vec<f64>, Mat<f64>)> {
    let eig = g.self_adjoint_eigen(Side::Lower).ok()?;
    let n = g.nrows();
    let (u, s) = (eig.U(), eig.S().column_vector());
    let values = (0..n).rev().map(|j| s[j].max(0.0)).collect();
    Some((values, Mat::<f64>::from_fn(n, n, |i, j| u[(i, n - 1 - j)])))
}

/// What the calibrated factorization did to one layer.
pub enum Outcome {
    Done { name: String, what: String },
    Declined { name: String, reason: String },
}

/// Factorizes (or refits) `layers` of `model` one at a time in topological
/// order on the compressed model's own activations against `reference`
/// ([`crate::refit::refit_with`]); each layer's [`Outcome`] goes to `report`.
pub fn on_data(
    model: &mut Model,
    (calib, reference): (&Calibration, &Model),
    layers: &[Layer],
    report: &mut PassReport,
    progress: &dyn crate::progress::Progress,
    solver: impl FnMut(&mut Graph, &Layer, &[f32], &[f32]) -> Result<Outcome>,
) -> Result<()> {
    for outcome in crate::refit::refit_with(reference, model, layers, calib, progress, solver)? {
        match outcome {
            Outcome::Done { name, what } => report.change(&name, what),
            Outcome::Declined { name, reason } => report.decline(&name, reason),
        }
    }
    Ok(())
}
