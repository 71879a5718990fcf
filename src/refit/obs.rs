//! Data-driven channel selection (`prune: {importance: reconstruction}`):
//! which input channels of a layer to drop so that, after the optimal ridge
//! refit of the rest, its outputs on calibration data change least. ThiNet
//! and He et al. (2017) ask the same question with greedy search or LASSO;
//! we answer it with the group form of Optimal Brain Surgeon (Hassibi &
//! Stork 1993; blocks as in Frantar & Alistarh 2022), which gives the exact
//! cost of dropping a channel *including* the refit, and updates the refit
//! solution in place.
//!
//! With G = [X 1]ᵀ[X 1] + λI (the normal matrix of `recover`'s ridge
//! problem), H = G⁻¹ and the solution W = H·[X 1]ᵀY, dropping the columns
//! B of one input channel (its kh·kw patch entries) and refitting the rest
//! raises the squared error by
//!
//!   ΔE_B = tr(W_Bᵀ · (H_BB)⁻¹ · W_B)
//!
//! and turns the solution and inverse into
//!
//!   W ← W − H_:B (H_BB)⁻¹ W_B,   H ← H − H_:B (H_BB)⁻¹ H_B:
//!
//! (W_B becomes zero). Channels go one at a time, cheapest first; a step
//! costs O(D²·kh·kw) for D = C_in·kh·kw, so a 3x3 layer with 512 inputs
//! drops 128 channels in a few seconds. The result equals the ridge
//! solution on the kept columns.
use crate::error::Result;
use crate::ir::Graph;
use crate::refit::{current_solution, not_definite, regularized_gram, t_mul, write_solution, Design, Fit, Problem, Rows};
use faer::linalg::matmul::matmul;
use faer::prelude::*;
use faer::{Accum, Mat, Par, Side};
use petgraph::stable_graph::NodeIndex;
use rayon::prelude::*;

/// Refits conv `ix` on patches `x` / targets `y` (as in
/// [`crate::refit::solve_layer`]) while dropping `count` of its input
/// channels, whose weights become zero. Returns the relative error before
/// and after, and the dropped channels (ascending).
pub fn refit_dropping(graph: &mut Graph, ix: NodeIndex, x: &[f32], y: &[f32], count: usize, fit: Fit) -> Result<(f64, f64, Vec<usize>)> {
    let p = Problem::new(graph, ix, x, y)?;
    let block = graph.node(ix).input(1).and_then(|w| graph.constant(w)).map_or(1, |w| w.shape()[2..].iter().product::<usize>());
    let before = fit.error(&p.xa, &current_solution(graph, ix, p.d, p.c_out), &p.ya);
    let sel = drop_channels(&p.xa, &p.ya, block, count, fit.ridge).ok_or_else(|| not_definite(graph, ix))?;
    let solution = if fit.relu { refit_kept(&p.xa, &p.ya, &sel, block, fit).unwrap_or(sel.solution) } else { sel.solution };
    let after = fit.error(&p.xa, &solution, &p.ya);
    write_solution(graph, ix, &solution, p.d, p.c_out);
    Ok((before, after, sel.dropped))
}

/// The ReLU-aware refit on the kept columns (zero rows for the dropped).
fn refit_kept(xa: &Rows, ya: &Mat<f64>, sel: &Selection, block: usize, fit: Fit) -> Option<Mat<f64>> {
    let d = xa.ncols() - 1;
    let mut kept: Vec<usize> = (0..d).filter(|&c| sel.dropped.binary_search(&(c / block)).is_err()).collect();
    let xk = xa.select(&kept);
    let sk = fit.solve(&xk, ya)?;
    kept.push(d);
    let mut out = Mat::<f64>::zeros(xa.ncols(), ya.ncols());
    for (i, &k) in kept.iter().enumerate() {
        for o in 0..ya.ncols() {
            out[(k, o)] = sk[(i, o)];
        }
    }
    Some(out)
}

/// The refit solution ((D+1)×C_out, bias last) after dropping `dropped`.
pub struct Selection {
    pub solution: Mat<f64>,
    pub dropped: Vec<usize>,
}

/// Drops `count` input channels (blocks of `block` columns of `xa`, the
/// last column being the bias ones) from the ridge fit of `ya`.
/// None when the normal matrix is not positive definite.
pub(crate) fn drop_channels(xa: &(impl Design + ?Sized), ya: &Mat<f64>, block: usize, count: usize, ridge: f64) -> Option<Selection> {
    let g = regularized_gram(xa, ridge);
    let llt = g.llt(Side::Lower).ok()?;
    let mut h = Mat::<f64>::identity(g.nrows(), g.ncols());
    llt.solve_in_place(h.as_mut());
    let mut w = t_mul(xa, ya.as_ref());
    llt.solve_in_place(w.as_mut());
    let channels = (xa.ncols() - 1) / block.max(1);
    let mut alive = vec![true; channels];
    let mut dropped = Vec::with_capacity(count);
    for _ in 0..count.min(channels) {
        let (c, _) = (0..channels)
            .into_par_iter()
            .filter(|&c| alive[c])
            .map(|c| (c, drop_cost(&h, &w, c * block, block)))
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))?;
        eliminate(&mut h, &mut w, c * block, block)?;
        alive[c] = false;
        dropped.push(c);
    }
    for &c in &dropped {
        for r in c * block..(c + 1) * block {
            w.row_mut(r).fill(0.0);
        }
    }
    dropped.sort_unstable();
    Some(Selection { solution: w, dropped })
}

/// (H_BB)⁻¹ for the block starting at `at`, or None if singular.
fn block_inverse(h: &Mat<f64>, at: usize, block: usize) -> Option<Mat<f64>> {
    let hbb = h.submatrix(at, at, block, block).to_owned();
    let mut inv = Mat::<f64>::identity(block, block);
    hbb.llt(Side::Lower).ok()?.solve_in_place(inv.as_mut());
    Some(inv)
}

/// ΔE of dropping the block at `at` (infinite when it cannot be dropped).
fn drop_cost(h: &Mat<f64>, w: &Mat<f64>, at: usize, block: usize) -> f64 {
    let Some(inv) = block_inverse(h, at, block) else { return f64::INFINITY };
    let wb = w.subrows(at, block);
    let z = &inv * wb;
    (0..block).map(|r| (0..w.ncols()).map(|c| wb[(r, c)] * z[(r, c)]).sum::<f64>()).sum()
}

/// Removes the block at `at` from the solution and the inverse.
fn eliminate(h: &mut Mat<f64>, w: &mut Mat<f64>, at: usize, block: usize) -> Option<()> {
    let inv = block_inverse(h, at, block)?;
    let cols = h.subcols(at, block).to_owned();
    let t = &cols * &inv;
    let wb = w.subrows(at, block).to_owned();
    matmul(w.as_mut(), Accum::Add, &t, &wb, -1.0, Par::rayon(0));
    matmul(h.as_mut(), Accum::Add, &t, cols.transpose(), -1.0, Par::rayon(0));
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refit::{residual, Fit};

    fn data(n: usize, d: usize, c_out: usize) -> (Mat<f64>, Mat<f64>) {
        let mut rng = crate::rng::Rng::new(7);
        let x = Mat::<f64>::from_fn(n, d + 1, |_, c| if c == d { 1.0 } else { rng.normal() as f64 });
        // Outputs depend on blocks 0 and 2 only (block = 2 columns): blocks 1 and 3 are free to drop.
        let w = Mat::<f64>::from_fn(d + 1, c_out, |r, _| if r / 2 == 0 || r / 2 == 2 { 1.0 + r as f64 * 0.1 } else { 0.0 });
        let y = &x * &w;
        (x, y)
    }

    #[test]
    fn drops_the_blocks_the_outputs_do_not_use() {
        let (x, y) = data(200, 8, 3);
        let sel = drop_channels(&x, &y, 2, 2, 1e-9).unwrap();
        assert_eq!(sel.dropped, vec![1, 3]);
        assert!(residual(&x, &sel.solution, &y) < 1e-9);
    }

    #[test]
    fn solution_equals_the_ridge_fit_on_the_kept_columns() {
        let (x, mut y) = data(300, 8, 3);
        let mut rng = crate::rng::Rng::new(3);
        y.as_mut().col_iter_mut().for_each(|c| c.iter_mut().for_each(|v| *v += rng.normal() as f64 * 0.3));
        let sel = drop_channels(&x, &y, 2, 1, 1e-3).unwrap();
        let kept: Vec<usize> = (0..9).filter(|&c| c == 8 || !sel.dropped.contains(&(c / 2))).collect();
        let xk = Mat::<f64>::from_fn(300, kept.len(), |r, c| x[(r, kept[c])]);
        // Fit::solve scales λ by the trace of the columns it is given, so compare with λ → 0.
        let sel0 = drop_channels(&x, &y, 2, 1, 0.0).unwrap();
        let direct = Fit { ridge: 0.0, relu: false }.solve(&xk, &y).unwrap();
        for (i, &k) in kept.iter().enumerate() {
            for o in 0..3 {
                assert!((sel0.solution[(k, o)] - direct[(i, o)]).abs() < 1e-6, "row {k} output {o}");
            }
        }
        for &c in &sel.dropped {
            assert!((0..3).all(|o| sel.solution[(2 * c, o)] == 0.0 && sel.solution[(2 * c + 1, o)] == 0.0));
        }
    }
}
