//! The least-squares solves of the refits: ridge regression of a layer's
//! reference outputs on its input patches, optionally through the ReLU
//! that follows it, and writing the solution back into the layer.
use super::design::{gram, mul, t_mul, Design, Rows};
use super::Calibration;
use crate::error::{Error, Result};
use crate::ir::Graph;
use faer::prelude::*;
use faer::{Mat, Side};
use ndarray::{ArrayD, Dimension, IxDyn};
use petgraph::stable_graph::NodeIndex;

/// How a layer is fitted: ridge strength, and whether its outputs are
/// compared after the ReLU that follows it (`calibration.through_relu`).
#[derive(Debug, Clone, Copy)]
pub struct Fit {
    pub ridge: f64,
    pub relu: bool,
}

/// Rounds of the ReLU-aware refit (each a re-solve with the same factor).
const RELU_ROUNDS: usize = 4;

impl Fit {
    /// The fit for conv `ix`: through the ReLU only if one alone reads its output.
    pub fn for_layer(calib: &Calibration, graph: &Graph, ix: NodeIndex) -> Fit {
        let relu = calib.through_relu
            && graph.node(ix).output(0).is_some_and(|y| matches!(graph.consumers(y)[..], [(c, 0)] if graph.node(c).op() == "Relu"));
        Fit { ridge: calib.ridge, relu }
    }

    /// Ridge solution of [X 1]·S ≈ Y. Through a ReLU, only relu(X·S) must
    /// match relu(Y): entries with Y ≤ 0 need X·S ≤ 0, not X·S = Y. Solved
    /// by majorize-minimize — targets Y' = Y where Y > 0, min(X·S, 0)
    /// elsewhere, re-solved a few times with the same normal matrix.
    pub(crate) fn solve(&self, xa: &(impl Design + ?Sized), ya: &Mat<f64>) -> Option<Mat<f64>> {
        let llt = regularized_gram(xa, self.ridge).llt(Side::Lower).ok()?;
        let mut sol = t_mul(xa, ya.as_ref());
        llt.solve_in_place(sol.as_mut());
        for _ in 0..if self.relu { RELU_ROUNDS } else { 0 } {
            sol = relu_rhs(xa, &sol, ya);
            llt.solve_in_place(sol.as_mut());
        }
        sol.norm_l2().is_finite().then_some(sol)
    }

    /// Relative error, after the ReLU when there is one.
    pub(crate) fn error(&self, xa: &(impl Design + ?Sized), sol: &Mat<f64>, ya: &Mat<f64>) -> f64 {
        if !self.relu {
            return residual(xa, sol, ya);
        }
        let mut num = 0.0;
        xa.each_block(sol.ncols(), &mut |first, b| {
            let pred = b * sol;
            for c in 0..ya.ncols() {
                for r in 0..b.nrows() {
                    let (p, y) = (pred[(r, c)].max(0.0), ya[(first + r, c)].max(0.0));
                    num += (p - y) * (p - y);
                }
            }
        });
        let den: f64 = ya.col_iter().map(|c| c.iter().map(|&y| y.max(0.0) * y.max(0.0)).sum::<f64>()).sum();
        num / den.max(f64::MIN_POSITIVE)
    }
}

/// The majorize-minimize targets of [`Fit::solve`] at solution `sol`.
pub(crate) fn relu_target(xa: &(impl Design + ?Sized), sol: &Mat<f64>, ya: &Mat<f64>) -> Mat<f64> {
    let pred = mul(xa, sol.as_ref());
    Mat::<f64>::from_fn(ya.nrows(), ya.ncols(), |r, c| relu_target_at(ya[(r, c)], pred[(r, c)]))
}

/// One entry of [`relu_target`]: the target `y` where it is positive, else
/// the prediction `pred` if that is negative, else 0.
pub(crate) fn relu_target_at(y: f64, pred: f64) -> f64 {
    if y > 0.0 {
        y
    } else {
        pred.min(0.0)
    }
}

/// [X 1]ᵀ T for the targets T of [`relu_target`], a block of rows at a
/// time (T is never held whole).
fn relu_rhs(xa: &(impl Design + ?Sized), sol: &Mat<f64>, ya: &Mat<f64>) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(xa.ncols(), ya.ncols());
    xa.each_block(ya.ncols(), &mut |first, b| {
        let mut t = b * sol;
        for c in 0..ya.ncols() {
            for r in 0..b.nrows() {
                t[(r, c)] = relu_target_at(ya[(first + r, c)], t[(r, c)]);
            }
        }
        out += b.transpose() * &t;
    });
    out
}

/// One layer's least-squares problem: [X 1] (N×(D+1)) and Y (N×C_out).
pub(crate) struct Problem<'a> {
    pub xa: Rows<'a>,
    pub ya: Mat<f64>,
    pub d: usize,
    pub c_out: usize,
}

impl Problem<'_> {
    pub fn new<'x>(graph: &Graph, ix: NodeIndex, x: &'x [f32], y: &[f32]) -> Result<Problem<'x>> {
        let node = graph.node(ix);
        let wshape = node
            .input(1)
            .and_then(|w| graph.constant(w))
            .map(|w| w.shape())
            .ok_or_else(|| Error::Pass { pass: "refit".into(), reason: format!("layer `{}` has no constant weight", node.name()) })?;
        let (c_out, d) = (wshape[0], wshape[1..].iter().product::<usize>());
        let n = x.len() / d.max(1);
        if n == 0 || y.len() != n * c_out {
            return Err(Error::Pass {
                pass: "refit".into(),
                reason: format!("layer `{}`: {} samples of {d} inputs but {} targets for {c_out} channels", node.name(), n, y.len()),
            });
        }
        Ok(Problem { xa: Rows::with_ones(x, n, d), ya: Mat::<f64>::from_fn(n, c_out, |r, c| y[r * c_out + c] as f64), d, c_out })
    }
}

/// Solves one layer's ridge problem and writes W and b back.
pub fn solve_layer(graph: &mut Graph, ix: NodeIndex, x: &[f32], y: &[f32], fit: Fit) -> Result<(f64, f64)> {
    let p = Problem::new(graph, ix, x, y)?;
    let before = fit.error(&p.xa, &current_solution(graph, ix, p.d, p.c_out), &p.ya);
    let sol = fit.solve(&p.xa, &p.ya).ok_or_else(|| not_definite(graph, ix))?;
    let after = fit.error(&p.xa, &sol, &p.ya);
    if after.partial_cmp(&before) != Some(std::cmp::Ordering::Less) {
        return Ok((before, before));
    }
    write_solution(graph, ix, &sol, p.d, p.c_out);
    Ok((before, after))
}

pub(crate) fn not_definite(graph: &Graph, ix: NodeIndex) -> Error {
    Error::Pass {
        pass: "refit".into(),
        reason: format!("layer `{}`: the normal equations are not positive definite", graph.node(ix).name()),
    }
}

/// [X 1] as an N×(D+1) f64 matrix, X given row-major.
pub(crate) fn with_ones(x: &[f32], n: usize, d: usize) -> Mat<f64> {
    Mat::<f64>::from_fn(n, d + 1, |r, c| if c == d { 1.0 } else { x[r * d + c] as f64 })
}

/// [X 1]ᵀ[X 1] + λ·I on the weight rows (λ = `ridge`·tr(XᵀX)/D), with a
/// tiny jitter on the bias row: the normal matrix of [`Fit::solve`].
pub(crate) fn regularized_gram(xa: &(impl Design + ?Sized), ridge: f64) -> Mat<f64> {
    let d = xa.ncols() - 1;
    let mut g = gram(xa);
    let mean_diagonal = add_ridge(&mut g, d, ridge);
    g[(d, d)] += 1e-9 * (1.0 + mean_diagonal);
    g
}

/// Adds λ = `ridge`·tr/d to the first d diagonal entries of `g`; returns tr/d.
pub(crate) fn add_ridge(g: &mut Mat<f64>, d: usize, ridge: f64) -> f64 {
    let mean_diagonal = (0..d).map(|i| g[(i, i)]).sum::<f64>() / d.max(1) as f64;
    let lambda = ridge * mean_diagonal + 1e-12;
    (0..d).for_each(|i| g[(i, i)] += lambda);
    mean_diagonal
}

/// The layer's present weights as a (D+1)×C_out matrix.
pub(crate) fn current_solution(graph: &Graph, ix: NodeIndex, d: usize, c_out: usize) -> Mat<f64> {
    let node = graph.node(ix);
    let w = graph.constant_f32(node.input(1).unwrap_or("")).expect("refittable").as_standard_layout().into_owned();
    let flat = w.as_slice().expect("standard layout");
    let b = graph.bias_or_zeros(ix, c_out);
    Mat::<f64>::from_fn(d + 1, c_out, |r, c| if r == d { b[c] as f64 } else { flat[c * d + r] as f64 })
}

/// ‖X·S − Y‖² / ‖Y‖².
pub(crate) fn residual(x: &(impl Design + ?Sized), s: &Mat<f64>, y: &Mat<f64>) -> f64 {
    let mut num = 0.0;
    x.each_block(s.ncols(), &mut |first, b| num += (b * s - y.subrows(first, b.nrows())).squared_norm_l2());
    num / y.squared_norm_l2().max(f64::MIN_POSITIVE)
}

pub(crate) fn write_solution(graph: &mut Graph, ix: NodeIndex, sol: &Mat<f64>, d: usize, c_out: usize) {
    let node = graph.node(ix).clone();
    let wname = node.input(1).expect("refittable").to_string();
    let shape = graph.weights()[&wname].shape();
    let w = ArrayD::from_shape_fn(IxDyn(&shape), |i| {
        let idx = i.slice();
        let r = idx[1..].iter().zip(&shape[1..]).fold(0, |acc, (&v, &s)| acc * s + v);
        sol[(r, idx[0])] as f32
    });
    if let Some(old) = graph.weight_mut(&wname) {
        old.set_data(crate::ir::Data::F32(w));
    }
    graph.set_bias(ix, (0..c_out).map(|c| sol[(d, c)] as f32).collect());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Targets relu-shaped in X: Y = max(X·w, 0) - 0.5·max(-X·w, 0)... the
    /// negative side is what a ReLU hides.
    #[test]
    fn the_relu_aware_fit_matches_post_relu_outputs_better() {
        let mut rng = Rng::new(11);
        let (n, d) = (400, 6);
        let x = Mat::<f64>::from_fn(n, d + 1, |_, c| if c == d { 1.0 } else { rng.normal() as f64 });
        let w: Vec<f64> = (0..d).map(|i| 1.0 - 0.3 * i as f64).collect();
        let y = Mat::<f64>::from_fn(n, 1, |r, _| {
            let v: f64 = (0..d).map(|c| x[(r, c)] * w[c]).sum();
            if v > 0.0 {
                v
            } else {
                -3.0 * v * v
            }
        });
        let (plain, relu) = (Fit { ridge: 1e-6, relu: false }, Fit { ridge: 1e-6, relu: true });
        let s_plain = plain.solve(&x, &y).unwrap();
        let s_relu = relu.solve(&x, &y).unwrap();
        let (e_plain, e_relu) = (relu.error(&x, &s_plain, &y), relu.error(&x, &s_relu, &y));
        assert!(e_relu < 0.5 * e_plain, "post-ReLU error: relu-aware {e_relu}, plain {e_plain}");
        // Without a ReLU, the plain fit is the least-squares optimum.
        assert!(plain.error(&x, &s_plain, &y) <= plain.error(&x, &s_relu, &y));
    }
}
