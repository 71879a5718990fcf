//! The kernels of the training engine: f32, NCHW, one image at a time
//! (callers spread the batch over threads). Convolutions are im2col + GEMM
//! (`matrixmultiply`, which picks AVX2/FMA at run time); a 1x1, stride-1,
//! unpadded conv skips im2col and multiplies the input directly, and a
//! depthwise conv (one input channel per group) runs direct loops over its
//! taps: there a GEMM per channel would be 1×(kh·kw)×(ho·wo), all call
//! overhead.

/// C[m×n] = op(A)·op(B) + beta·C, all row-major. `A` is stored m×k (k×m
/// when `at`), `B` k×n (n×k when `bt`).
#[allow(clippy::too_many_arguments)]
pub fn gemm(m: usize, k: usize, n: usize, a: &[f32], at: bool, b: &[f32], bt: bool, c: &mut [f32], beta: f32) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm: operand too short");
    let (rsa, csa) = if at { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if bt { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the lengths were checked above against the strides used.
    unsafe { matrixmultiply::sgemm(m, k, n, 1.0, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), n as isize, 1) }
}

/// Geometry of a 2-d convolution on one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvGeom {
    pub c_in: usize,
    pub c_out: usize,
    pub group: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    /// Top, left (the bottom and right pads only shape the output size).
    pub pad: [usize; 2],
    pub dilation: [usize; 2],
    pub h: usize,
    pub w: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvGeom {
    fn per_group_in(&self) -> usize {
        self.c_in / self.group
    }
    fn per_group_out(&self) -> usize {
        self.c_out / self.group
    }
    /// Rows of a group's im2col matrix.
    fn patch(&self) -> usize {
        self.per_group_in() * self.kh * self.kw
    }
    fn positions(&self) -> usize {
        self.ho * self.wo
    }
    fn is_depthwise(&self) -> bool {
        self.group > 1 && self.per_group_in() == 1
    }
    /// The output columns ox whose input column for tap `kx` lies inside
    /// the image, as a range.
    fn columns(&self, kx: usize) -> std::ops::Range<usize> {
        let (s, offset) = (self.stride[1], kx * self.dilation[1]);
        let first = self.pad[1].saturating_sub(offset).div_ceil(s);
        // ox·s + offset − pad ≤ w − 1
        let last = (self.w + self.pad[1]).checked_sub(offset + 1).map_or(0, |v| v / s + 1);
        first..last.min(self.wo).max(first)
    }
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == [1, 1] && self.pad == [0, 0] && (self.ho, self.wo) == (self.h, self.w)
    }
    pub fn input_len(&self) -> usize {
        self.c_in * self.h * self.w
    }
    pub fn output_len(&self) -> usize {
        self.c_out * self.positions()
    }
    pub fn weight_len(&self) -> usize {
        self.c_out * self.patch()
    }

    /// Input coordinate of output `o` and kernel tap `k` along one axis.
    fn source(&self, axis: usize, o: usize, k: usize) -> Option<usize> {
        let (len, s, p, d) = if axis == 0 {
            (self.h, self.stride[0], self.pad[0], self.dilation[0])
        } else {
            (self.w, self.stride[1], self.pad[1], self.dilation[1])
        };
        (o * s + k * d).checked_sub(p).filter(|&i| i < len)
    }
}

/// The im2col matrix of one group: row (c, ky, kx), column (oy, ox).
fn im2col(g: &ConvGeom, x: &[f32], col: &mut Vec<f32>) {
    let p = g.positions();
    col.clear();
    col.resize(g.patch() * p, 0.0);
    let mut row = 0;
    for c in 0..g.per_group_in() {
        let plane = &x[c * g.h * g.w..][..g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let out = &mut col[row * p..][..p];
                for oy in 0..g.ho {
                    let Some(iy) = g.source(0, oy, ky) else { continue };
                    for ox in 0..g.wo {
                        if let Some(ix) = g.source(1, ox, kx) {
                            out[oy * g.wo + ox] = plane[iy * g.w + ix];
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// Adds an im2col-shaped gradient back onto the input gradient of one group.
fn col2im(g: &ConvGeom, col: &[f32], dx: &mut [f32]) {
    let p = g.positions();
    let mut row = 0;
    for c in 0..g.per_group_in() {
        let plane = &mut dx[c * g.h * g.w..][..g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let src = &col[row * p..][..p];
                for oy in 0..g.ho {
                    let Some(iy) = g.source(0, oy, ky) else { continue };
                    for ox in 0..g.wo {
                        if let Some(ix) = g.source(1, ox, kx) {
                            plane[iy * g.w + ix] += src[oy * g.wo + ox];
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// The GEMM operand of group `gi`: the input itself for a pointwise conv,
/// else its im2col matrix (built in `col`).
fn group_operand<'a>(g: &ConvGeom, x: &'a [f32], gi: usize, col: &'a mut Vec<f32>) -> &'a [f32] {
    let size = g.per_group_in() * g.h * g.w;
    let xg = &x[gi * size..][..size];
    if g.is_pointwise() {
        return xg;
    }
    im2col(g, xg, col);
    col
}

/// Calls `f(group, out channel, tap, input row, output row, columns)` for
/// every in-image pairing of a depthwise conv's taps with its output rows.
fn depthwise_taps(g: &ConvGeom, mut f: impl FnMut(usize, usize, usize, usize, usize, std::ops::Range<usize>)) {
    let og = g.per_group_out();
    for gi in 0..g.group {
        for o in gi * og..(gi + 1) * og {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let cols = g.columns(kx);
                    for oy in 0..g.ho {
                        if let Some(iy) = g.source(0, oy, ky) {
                            f(gi, o, ky * g.kw + kx, iy, oy, cols.clone());
                        }
                    }
                }
            }
        }
    }
}

/// Input column of output column `ox` for tap column `kx` (inside the image).
fn input_column(g: &ConvGeom, ox: usize, kx: usize) -> usize {
    ox * g.stride[1] + kx * g.dilation[1] - g.pad[1]
}

fn depthwise_forward(g: &ConvGeom, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (hw, p, taps) = (g.h * g.w, g.positions(), g.kh * g.kw);
    y[..g.output_len()].fill(0.0);
    depthwise_taps(g, |gi, o, t, iy, oy, cols| {
        let (wv, kx) = (w[o * taps + t], t % g.kw);
        let (row, out) = (&x[gi * hw + iy * g.w..][..g.w], &mut y[o * p + oy * g.wo..][..g.wo]);
        for ox in cols {
            out[ox] += wv * row[input_column(g, ox, kx)];
        }
    });
}

fn depthwise_weight_grad(g: &ConvGeom, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (hw, p, taps) = (g.h * g.w, g.positions(), g.kh * g.kw);
    depthwise_taps(g, |gi, o, t, iy, oy, cols| {
        let kx = t % g.kw;
        let (row, d) = (&x[gi * hw + iy * g.w..][..g.w], &dy[o * p + oy * g.wo..][..g.wo]);
        dw[o * taps + t] += cols.map(|ox| d[ox] * row[input_column(g, ox, kx)]).sum::<f32>();
    });
}

fn depthwise_input_grad(g: &ConvGeom, w: &[f32], dy: &[f32], dx: &mut [f32]) {
    let (hw, p, taps) = (g.h * g.w, g.positions(), g.kh * g.kw);
    depthwise_taps(g, |gi, o, t, iy, oy, cols| {
        let (wv, kx) = (w[o * taps + t], t % g.kw);
        let (row, d) = (&mut dx[gi * hw + iy * g.w..][..g.w], &dy[o * p + oy * g.wo..][..g.wo]);
        for ox in cols {
            row[input_column(g, ox, kx)] += wv * d[ox];
        }
    });
}

/// y = conv(x, w) + b for one image.
pub fn conv_forward(g: &ConvGeom, x: &[f32], w: &[f32], b: Option<&[f32]>, y: &mut [f32], col: &mut Vec<f32>) {
    let (og, p, patch) = (g.per_group_out(), g.positions(), g.patch());
    if g.is_depthwise() {
        depthwise_forward(g, x, w, y);
    } else {
        for gi in 0..g.group {
            let src = group_operand(g, x, gi, col);
            gemm(og, patch, p, &w[gi * og * patch..], false, src, false, &mut y[gi * og * p..], 0.0);
        }
    }
    if let Some(b) = b {
        for (yc, &bc) in y.chunks_mut(p).zip(b) {
            yc.iter_mut().for_each(|v| *v += bc);
        }
    }
}

/// Accumulates dL/dw (and dL/db) of one image into `dw` / `db`.
pub fn conv_weight_grad(g: &ConvGeom, x: &[f32], dy: &[f32], dw: &mut [f32], db: Option<&mut [f32]>, col: &mut Vec<f32>) {
    let (og, p, patch) = (g.per_group_out(), g.positions(), g.patch());
    if g.is_depthwise() {
        depthwise_weight_grad(g, x, dy, dw);
    } else {
        for gi in 0..g.group {
            let src = group_operand(g, x, gi, col);
            gemm(og, p, patch, &dy[gi * og * p..], false, src, true, &mut dw[gi * og * patch..], 1.0);
        }
    }
    if let Some(db) = db {
        for (d, yc) in db.iter_mut().zip(dy.chunks(p)) {
            *d += yc.iter().sum::<f32>();
        }
    }
}

/// dL/dx of one image (overwrites `dx`).
pub fn conv_input_grad(g: &ConvGeom, w: &[f32], dy: &[f32], dx: &mut [f32], col: &mut Vec<f32>) {
    let (cg, og, p, patch) = (g.per_group_in(), g.per_group_out(), g.positions(), g.patch());
    dx.fill(0.0);
    if g.is_depthwise() {
        return depthwise_input_grad(g, w, dy, dx);
    }
    for gi in 0..g.group {
        let dxg = &mut dx[gi * cg * g.h * g.w..][..cg * g.h * g.w];
        let (wg, dyg) = (&w[gi * og * patch..], &dy[gi * og * p..]);
        if g.is_pointwise() {
            gemm(patch, og, p, wg, true, dyg, false, dxg, 0.0);
        } else {
            col.clear();
            col.resize(patch * p, 0.0);
            gemm(patch, og, p, wg, true, dyg, false, col, 0.0);
            col2im(g, col, dxg);
        }
    }
}

/// Geometry of a 2-d max pooling on one image.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolGeom {
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    pub pad: [usize; 2],
    pub h: usize,
    pub w: usize,
    pub ho: usize,
    pub wo: usize,
}

impl PoolGeom {
    pub fn input_len(&self) -> usize {
        self.c * self.h * self.w
    }
    pub fn output_len(&self) -> usize {
        self.c * self.ho * self.wo
    }
}

/// Max pooling of one image; `arg` gets each output's source index in its plane.
pub fn maxpool_forward(g: &PoolGeom, x: &[f32], y: &mut [f32], arg: &mut [u32]) {
    let (hw, ohw) = (g.h * g.w, g.ho * g.wo);
    for c in 0..g.c {
        let plane = &x[c * hw..][..hw];
        for oy in 0..g.ho {
            for ox in 0..g.wo {
                let (mut best, mut at) = (f32::NEG_INFINITY, 0u32);
                for ky in 0..g.kh {
                    let Some(iy) = (oy * g.stride[0] + ky).checked_sub(g.pad[0]).filter(|&i| i < g.h) else { continue };
                    for kx in 0..g.kw {
                        let Some(ix) = (ox * g.stride[1] + kx).checked_sub(g.pad[1]).filter(|&i| i < g.w) else { continue };
                        let v = plane[iy * g.w + ix];
                        if v > best {
                            (best, at) = (v, (iy * g.w + ix) as u32);
                        }
                    }
                }
                let o = c * ohw + oy * g.wo + ox;
                (y[o], arg[o]) = (best, at);
            }
        }
    }
}

/// dL/dx of a max pooling of one image (overwrites `dx`).
pub fn maxpool_backward(g: &PoolGeom, dy: &[f32], arg: &[u32], dx: &mut [f32]) {
    let (hw, ohw) = (g.h * g.w, g.ho * g.wo);
    dx.fill(0.0);
    for c in 0..g.c {
        for o in 0..ohw {
            dx[c * hw + arg[c * ohw + o] as usize] += dy[c * ohw + o];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn geometry(c: usize, multiplier: usize, k: usize, stride: usize, pad: usize, dilation: usize, (h, w): (usize, usize)) -> ConvGeom {
        let out = |len: usize| (len + 2 * pad - dilation * (k - 1) - 1) / stride + 1;
        ConvGeom {
            c_in: c,
            c_out: c * multiplier,
            group: c,
            kh: k,
            kw: k,
            stride: [stride; 2],
            pad: [pad; 2],
            dilation: [dilation; 2],
            h,
            w,
            ho: out(h),
            wo: out(w),
        }
    }

    /// The im2col + GEMM path, one group at a time (what depthwise convs ran before).
    fn by_gemm(g: &ConvGeom, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (og, p, patch, col) = (g.per_group_out(), g.positions(), g.patch(), &mut Vec::new());
        let (mut y, mut dw, mut dx) = (vec![0.0; g.output_len()], vec![0.0; g.weight_len()], vec![0.0; g.input_len()]);
        for gi in 0..g.group {
            let hw = g.h * g.w;
            let src = group_operand(g, x, gi, col).to_vec();
            gemm(og, patch, p, &w[gi * og * patch..], false, &src, false, &mut y[gi * og * p..], 0.0);
            gemm(og, p, patch, &dy[gi * og * p..], false, &src, true, &mut dw[gi * og * patch..], 1.0);
            let mut c = vec![0.0; patch * p];
            gemm(patch, og, p, &w[gi * og * patch..], true, &dy[gi * og * p..], false, &mut c, 0.0);
            col2im(g, &c, &mut dx[gi * hw..][..hw]);
        }
        (y, dw, dx)
    }

    #[test]
    fn depthwise_loops_equal_im2col_and_gemm() {
        let mut rng = Rng::new(3);
        for (c, m, k, s, p, d, hw) in [
            (3, 1, 3, 1, 1, 1, (7, 6)),
            (4, 2, 3, 2, 1, 1, (9, 8)),
            (2, 1, 3, 1, 2, 2, (5, 7)),
            (3, 3, 5, 2, 0, 1, (11, 9)),
            (2, 1, 3, 2, 1, 1, (1, 1)),
        ] {
            let g = geometry(c, m, k, s, p, d, hw);
            let mut random = |n: usize| (0..n).map(|_| rng.normal()).collect::<Vec<f32>>();
            let (x, w, dy) = (random(g.input_len()), random(g.weight_len()), random(g.output_len()));
            let (y0, dw0, dx0) = by_gemm(&g, &x, &w, &dy);
            let col = &mut Vec::new();
            let (mut y, mut dw, mut dx) = (vec![9.0; g.output_len()], vec![0.0; g.weight_len()], vec![9.0; g.input_len()]);
            conv_forward(&g, &x, &w, None, &mut y, col);
            conv_weight_grad(&g, &x, &dy, &mut dw, None, col);
            conv_input_grad(&g, &w, &dy, &mut dx, col);
            for (name, a, b) in [("y", &y, &y0), ("dw", &dw, &dw0), ("dx", &dx, &dx0)] {
                let err = a.iter().zip(b.iter()).map(|(u, v)| (u - v).abs()).fold(0.0f32, f32::max);
                assert!(err < 1e-4, "{g:?}: {name} differs by {err}");
            }
        }
    }
}
