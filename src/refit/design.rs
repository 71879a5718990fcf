//! The design matrices of the least-squares solves, read a block of rows at
//! a time. A refit layer's sampled input patches stay in the f32 rows the
//! calibration gathered ([`Rows`]); the f64 products the solves need
//! (XᵀX, XᵀY, X·S) are formed block by block, so a layer costs its rows
//! once and not again as an f64 copy (issue #18: a 3x3 conv with 512
//! inputs has 4,608 values per row, and its 49,152 rows were 0.9 GB in f32
//! plus 1.8 GB in f64).
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef};
use std::borrow::Cow;

/// A matrix the solves read in consecutive blocks of rows.
pub(crate) trait Design: Sync {
    fn nrows(&self) -> usize;
    fn ncols(&self) -> usize;
    /// Calls `f(first_row, block)` on consecutive blocks of rows, in order;
    /// `width`: the widest matrix `f` forms per row of the block (its
    /// products have as many rows), which bounds the block's height too.
    fn each_block(&self, width: usize, f: &mut dyn FnMut(usize, MatRef<'_, f64>));
}

impl Design for Mat<f64> {
    fn nrows(&self) -> usize {
        Mat::nrows(self)
    }

    fn ncols(&self) -> usize {
        Mat::ncols(self)
    }

    fn each_block(&self, _width: usize, f: &mut dyn FnMut(usize, MatRef<'_, f64>)) {
        f(0, self.as_ref());
    }
}

/// f64 values converted per block (64 MB).
const BLOCK_VALUES: usize = 1 << 23;

/// N rows of D f32 values (row-major), optionally followed by a column of
/// ones (the bias column of `[X 1]`).
#[derive(Clone)]
pub(crate) struct Rows<'a> {
    x: Cow<'a, [f32]>,
    n: usize,
    d: usize,
    ones: bool,
    /// f64 values per block ([`BLOCK_VALUES`]; tests use small blocks).
    block_values: usize,
}

impl<'a> Rows<'a> {
    /// `[X 1]` for the N × D matrix X given row-major in `x`.
    pub fn with_ones(x: &'a [f32], n: usize, d: usize) -> Rows<'a> {
        debug_assert_eq!(x.len(), n * d);
        Rows { x: Cow::Borrowed(x), n, d, ones: true, block_values: BLOCK_VALUES }
    }

    /// X, for the N × D matrix X given row-major in `x`.
    pub fn new(x: &'a [f32], n: usize, d: usize) -> Rows<'a> {
        Rows { ones: false, ..Rows::with_ones(x, n, d) }
    }

    /// X alone, without the ones column.
    pub fn without_ones(&self) -> Rows<'_> {
        Rows { x: Cow::Borrowed(&self.x), ones: false, ..*self }
    }

    /// The columns `cols` of X (ascending, each below D), the ones column kept if present.
    pub fn select(&self, cols: &[usize]) -> Rows<'static> {
        let x: Vec<f32> = (0..self.n).flat_map(|r| cols.iter().map(move |&c| self.x[r * self.d + c])).collect();
        Rows { x: Cow::Owned(x), d: cols.len(), ..*self }
    }

    /// Row r of X.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.x[r * self.d..(r + 1) * self.d]
    }
}

impl Design for Rows<'_> {
    fn nrows(&self) -> usize {
        self.n
    }

    fn ncols(&self) -> usize {
        self.d + usize::from(self.ones)
    }

    fn each_block(&self, width: usize, f: &mut dyn FnMut(usize, MatRef<'_, f64>)) {
        let cols = Design::ncols(self);
        let step = (self.block_values / cols.max(width).max(1)).clamp(1, self.n.max(1));
        let mut block = Mat::<f64>::zeros(step, cols);
        for first in (0..self.n).step_by(step) {
            let len = step.min(self.n - first);
            // Tiles of 64 columns: the reads run along rows, and the
            // column-major writes stay within a few cache lines per column.
            for c0 in (0..self.d).step_by(64) {
                let c1 = (c0 + 64).min(self.d);
                for r in 0..len {
                    for (c, &v) in (c0..c1).zip(&self.row(first + r)[c0..c1]) {
                        block[(r, c)] = v as f64;
                    }
                }
            }
            if self.ones {
                block.col_mut(self.d).fill(1.0);
            }
            f(first, block.as_ref().subrows(0, len));
        }
    }
}

/// XᵀX.
pub(crate) fn gram(x: &(impl Design + ?Sized)) -> Mat<f64> {
    let mut g = Mat::<f64>::zeros(x.ncols(), x.ncols());
    x.each_block(x.ncols(), &mut |_, b| matmul(g.as_mut(), Accum::Add, b.transpose(), b, 1.0, faer::get_global_parallelism()));
    g
}

/// XᵀY.
pub(crate) fn t_mul(x: &(impl Design + ?Sized), y: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(x.ncols(), y.ncols());
    x.each_block(y.ncols(), &mut |first, b| {
        let ys = y.subrows(first, b.nrows());
        matmul(out.as_mut(), Accum::Add, b.transpose(), ys, 1.0, faer::get_global_parallelism())
    });
    out
}

/// X·S.
pub(crate) fn mul(x: &(impl Design + ?Sized), s: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(x.nrows(), s.ncols());
    x.each_block(s.ncols(), &mut |first, b| {
        let rows = out.as_mut().subrows_mut(first, b.nrows());
        matmul(rows, Accum::Replace, b, s, 1.0, faer::get_global_parallelism())
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of rows give the products of the whole f64 matrix.
    #[test]
    fn block_products_match_the_f64_matrix() {
        let (n, d) = (1000, 7);
        let x: Vec<f32> = (0..n * d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        // Blocks of 8 rows: the products are summed over 125 of them.
        let rows = Rows { block_values: 8 * (d + 1), ..Rows::with_ones(&x, n, d) };
        let full = Mat::<f64>::from_fn(n, d + 1, |r, c| if c == d { 1.0 } else { x[r * d + c] as f64 });
        let y = Mat::<f64>::from_fn(n, 3, |r, c| (r * 3 + c) as f64 % 13.0 - 6.0);
        let s = Mat::<f64>::from_fn(d + 1, 3, |r, c| r as f64 - c as f64 * 0.5);
        let close = |a: &Mat<f64>, b: &Mat<f64>| (a - b).norm_l2() <= 1e-9 * b.norm_l2();
        assert!(close(&gram(&rows), &(full.transpose() * &full)));
        assert!(close(&t_mul(&rows, y.as_ref()), &(full.transpose() * &y)));
        assert!(close(&mul(&rows, s.as_ref()), &(&full * &s)));
        let picked = rows.select(&[1, 4]);
        assert_eq!((picked.nrows(), picked.ncols()), (n, 3));
        assert_eq!(picked.row(2), [x[2 * d + 1], x[2 * d + 4]]);
        assert_eq!(rows.without_ones().ncols(), d);
    }
}
