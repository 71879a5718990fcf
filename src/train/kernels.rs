//! The kernels of the training engine: f32, and every 4-d tensor of a batch
//! stored channel-major, `[C][N][H·W]` (the planes of one channel, image
//! after image). Why: a conv over the whole batch is then one matrix
//! product per group, `Y[C_out, N·P] = W · X[C_in·k·k, N·P]`, which packs
//! the weights once per batch and thread (per image before: 16 times a
//! batch, and late layers' 49-column products ran at 60 % of the GEMM's
//! speed), and a BN's channel is one contiguous run. Convolutions are
//! im2col + GEMM (`matrixmultiply`, which picks AVX2 or AVX-512 at run time;
//! with `Precision::Bf16`, bf16 operands and f32 sums in `kernels/bf16.rs`,
//! where the forward's and the weight gradient's im2col matrix is made block
//! by block as the product packs it, `Im2colBlocks`, not stored whole); a
//! 1x1, stride-1, unpadded conv multiplies the input in place, and a
//! depthwise conv (one input channel per group) runs direct loops over its
//! taps: there a GEMM per channel would be 1×(kh·kw)×(ho·wo), all call
//! overhead. Its forward (column stride 1), input gradient (strides 1, one
//! output per group) and 3x3 weight gradient (strides 1) read zero-bordered
//! planes and sum in registers (AVX2 when the CPU has it), bit-identical to
//! the tap loops for finite values.
//!
//! Threads: the images of a batch are split into one fixed range per
//! thread, and weight gradients are summed per range, then in range order,
//! so results are reproducible for a fixed thread count.
use rayon::prelude::*;
use std::ops::Range;

mod bf16;
pub use bf16::{available as bf16_available, PackedA};

/// The arithmetic of the matrix products (convs and fully connected
/// layers); everything else is f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 operands and sums (`matrixmultiply`).
    #[default]
    F32,
    /// bf16 operands, f32 sums (AVX512-BF16; see `kernels/bf16.rs`).
    Bf16,
}

/// C[m×n] = op(A)·op(B) + beta·C, all row-major. `A` is stored m×k (k×m
/// when `at`), `B` k×n (n×k when `bt`).
#[allow(clippy::too_many_arguments)]
pub fn gemm(m: usize, k: usize, n: usize, a: &[f32], at: bool, b: &[f32], bt: bool, c: &mut [f32], beta: f32, precision: Precision) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm: operand too short");
    let a = Strided::new(a, if at { (1, m) } else { (k, 1) });
    let b = Strided::new(b, if bt { (1, k) } else { (n, 1) });
    // SAFETY: `c` is an exclusive borrow.
    unsafe { gemm_into(m, k, n, a, b, Out::new(c), n, beta, precision) }
}

/// A read-only matrix in a slice: element (i, j) at `i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> Strided<'a> {
    fn new(data: &'a [f32], (rs, cs): (usize, usize)) -> Self {
        Strided { data, rs, cs }
    }
    /// The same matrix with rows and columns swapped.
    fn t(self) -> Self {
        Strided { data: self.data, rs: self.cs, cs: self.rs }
    }
    /// Whether an r×c matrix at this view stays inside the slice.
    fn holds(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// An output tensor that threads write in disjoint parts: its start and
/// length (every access is checked against it).
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: every user writes a part no other thread touches (see callers).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn new(v: &mut [f32]) -> Out {
        Out { ptr: v.as_mut_ptr(), len: v.len() }
    }
    /// The tensor from `offset` on.
    fn at(self, offset: usize) -> Out {
        assert!(offset <= self.len, "kernel output offset out of range");
        // SAFETY: in bounds, checked above.
        Out { ptr: unsafe { self.ptr.add(offset) }, len: self.len - offset }
    }
    /// # Safety
    /// No other thread reads or writes these values while the slice lives.
    unsafe fn slice<'a>(self, offset: usize, len: usize) -> &'a mut [f32] {
        assert!(offset + len <= self.len, "kernel output slice out of range");
        std::slice::from_raw_parts_mut(self.ptr.add(offset), len)
    }
}

/// C = A·B + beta·C for an m×n output with row stride `rsc`.
///
/// # Safety
/// No other thread touches those m rows of n values of `c` during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(m: usize, k: usize, n: usize, a: Strided, b: Strided, c: Out, rsc: usize, beta: f32, precision: Precision) {
    assert!(a.holds(m, k) && b.holds(k, n), "gemm: operand too short");
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * rsc + n <= c.len && n <= rsc, "gemm: output too short");
    if precision == Precision::Bf16 {
        assert!(bf16::available(), "bf16 products on a CPU without AVX512-BF16");
        return bf16::gemm(m, k, n, bf16::A::Matrix(a), bf16::B::Matrix(b), c, rsc, beta);
    }
    let (a_ptr, b_ptr) = (a.data.as_ptr(), b.data.as_ptr());
    matrixmultiply::sgemm(
        m,
        k,
        n,
        1.0,
        a_ptr,
        a.rs as isize,
        a.cs as isize,
        b_ptr,
        b.rs as isize,
        b.cs as isize,
        beta,
        c.ptr,
        rsc as isize,
        1,
    )
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
    fn plane(&self) -> usize {
        self.h * self.w
    }
    fn taps(&self) -> usize {
        self.kh * self.kw
    }
    pub fn is_depthwise(&self) -> bool {
        self.group > 1 && self.per_group_in() == 1
    }
    /// The output columns ox whose input column for tap `kx` lies inside
    /// the image, as a range.
    fn columns(&self, kx: usize) -> Range<usize> {
        let (s, offset) = (self.stride[1], kx * self.dilation[1]);
        let first = self.pad[1].saturating_sub(offset).div_ceil(s);
        // ox·s + offset − pad ≤ w − 1
        let last = (self.w + self.pad[1]).checked_sub(offset + 1).map_or(0, |v| v / s + 1);
        first..last.min(self.wo).max(first)
    }
    /// Rows and columns of a plane inside its zero border: the top and left
    /// pads, the image, and below and right of it as far as any tap reads.
    fn padded_size(&self) -> (usize, usize) {
        let reach = |out: usize, s: usize, k: usize, d: usize| if out == 0 { 0 } else { (out - 1) * s + (k - 1) * d + 1 };
        let rows = reach(self.ho, self.stride[0], self.kh, self.dilation[0]).max(self.pad[0] + self.h);
        (rows, reach(self.wo, self.stride[1], self.kw, self.dilation[1]).max(self.pad[1] + self.w))
    }
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == [1, 1] && self.pad == [0, 0] && (self.ho, self.wo) == (self.h, self.w)
    }
    pub fn input_len(&self) -> usize {
        self.c_in * self.plane()
    }
    pub fn output_len(&self) -> usize {
        self.c_out * self.positions()
    }
    pub fn weight_len(&self) -> usize {
        self.c_out * self.patch()
    }

    /// Input row of output row `oy` for tap row `ky`, if inside the image.
    fn source_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride[0] + ky * self.dilation[0]).checked_sub(self.pad[0]).filter(|&i| i < self.h)
    }

    /// Calls `f(tap row, tap column, input row, output row, columns)` for
    /// every in-image pairing of a tap with an output row: the output
    /// columns `columns` read input columns `columns.start·s + kx·d − pad`
    /// onwards, every `s`-th.
    fn rows(&self, mut f: impl FnMut(usize, usize, usize, usize, Range<usize>)) {
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                let cols = self.columns(kx);
                if cols.is_empty() {
                    continue;
                }
                for oy in 0..self.ho {
                    if let Some(iy) = self.source_row(oy, ky) {
                        f(ky, kx, iy, oy, cols.clone());
                    }
                }
            }
        }
    }

    /// Offset in an input row of output column `ox`'s tap column `kx`.
    fn input_column(&self, ox: usize, kx: usize) -> usize {
        ox * self.stride[1] + kx * self.dilation[1] - self.pad[1]
    }

    /// How many images' im2col matrices fit in `COL_VALUES` (at least one).
    fn images_per_col(&self) -> usize {
        (COL_VALUES / (self.patch() * self.positions()).max(1)).max(1)
    }
}

/// The im2col buffer of a thread holds at most this many values (16 MB)
/// unless one image needs more: large enough for long products, small
/// enough to stay near the caches. (Tiny in unit tests, so that they run
/// the batch in several pieces.)
#[cfg(not(test))]
const COL_VALUES: usize = 1 << 22;
#[cfg(test)]
const COL_VALUES: usize = 300;

/// `out[j] (op)= row[start + j·s]` for the `out.len()` columns of one row.
fn row_op(out: &mut [f32], row: &[f32], start: usize, s: usize, op: impl Fn(&mut f32, f32)) {
    if s == 1 {
        out.iter_mut().zip(&row[start..]).for_each(|(o, &v)| op(o, v));
    } else {
        out.iter_mut().zip(row[start..].iter().step_by(s)).for_each(|(o, &v)| op(o, v));
    }
}

/// The images of a batch split into `parts` ranges of near-equal size.
fn image_ranges(n: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    (0..parts).map(|t| t * n / parts..(t + 1) * n / parts).collect()
}

/// One range per thread of the pool this runs on.
fn thread_ranges(n: usize) -> Vec<Range<usize>> {
    image_ranges(n, rayon::current_num_threads())
}

thread_local! {
    /// Buffers a thread keeps between kernel calls (`Scratch`).
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An im2col buffer kept by its thread from call to call. Why: allocated
/// and freed on every conv (tens of MB each for ResNet-50's 3x3 convs),
/// it came back from the system as fresh pages, faulted in and zeroed
/// (a bf16 teacher in this engine had ~2 M faults an epoch more than the
/// f32 run).
struct Scratch(Vec<f32>);

impl Scratch {
    fn take() -> Scratch {
        Scratch(SCRATCH.with(|s| s.borrow_mut().pop()).unwrap_or_default())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        // A thread that is shutting down drops it instead.
        let _ = SCRATCH.try_with(|s| s.borrow_mut().push(v));
    }
}

impl std::ops::Deref for Scratch {
    type Target = Vec<f32>;
    fn deref(&self) -> &Vec<f32> {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut Vec<f32> {
        &mut self.0
    }
}

/// Sub-ranges of `r` of at most `per` images.
fn pieces(r: Range<usize>, per: usize) -> impl Iterator<Item = Range<usize>> {
    r.clone().step_by(per).map(move |s| s..(s + per).min(r.end))
}

/// The im2col matrix of group `gi` for images `imgs` of a batch of `n`:
/// row (c, ky, kx), column (image, oy, ox).
fn im2col(g: &ConvGeom, x: &[f32], n: usize, gi: usize, imgs: Range<usize>, col: &mut Vec<f32>) {
    let (p, hw, width) = (g.positions(), g.plane(), imgs.len() * g.positions());
    col.clear();
    col.resize(g.patch() * width, 0.0);
    for c in 0..g.per_group_in() {
        let channel = gi * g.per_group_in() + c;
        for (j, img) in imgs.clone().enumerate() {
            let plane = &x[(channel * n + img) * hw..][..hw];
            g.rows(|ky, kx, iy, oy, cols| {
                let row = (c * g.kh + ky) * g.kw + kx;
                let out = &mut col[row * width + j * p + oy * g.wo..][..g.wo];
                let start = g.input_column(cols.start, kx);
                row_op(&mut out[cols], &plane[iy * g.w..][..g.w], start, g.stride[1], |o, v| *o = v);
            });
        }
    }
}

/// Adds an im2col-shaped gradient (images `imgs`) back onto the input
/// gradient's planes of group `gi`.
///
/// # Safety
/// No other thread touches the planes of images `imgs` in `dx`.
unsafe fn col2im(g: &ConvGeom, col: &[f32], n: usize, gi: usize, imgs: Range<usize>, dx: Out) {
    let (p, hw, width) = (g.positions(), g.plane(), imgs.len() * g.positions());
    for c in 0..g.per_group_in() {
        let channel = gi * g.per_group_in() + c;
        for (j, img) in imgs.clone().enumerate() {
            let plane = dx.slice((channel * n + img) * hw, hw);
            g.rows(|ky, kx, iy, oy, cols| {
                let row = (c * g.kh + ky) * g.kw + kx;
                let src = &col[row * width + j * p + oy * g.wo..][..g.wo];
                let start = g.input_column(cols.start, kx);
                let dst = &mut plane[iy * g.w..][..g.w];
                if g.stride[1] == 1 {
                    dst[start..][..cols.len()].iter_mut().zip(&src[cols]).for_each(|(d, &v)| *d += v);
                } else {
                    dst[start..].iter_mut().step_by(g.stride[1]).zip(&src[cols]).for_each(|(d, &v)| *d += v);
                }
            });
        }
    }
}

/// The im2col matrix of group `gi` for images `imgs` (`im2col`'s), made
/// by blocks for a bf16 product; transposed (`t`) for a weight gradient's.
struct Im2colBlocks<'a> {
    g: &'a ConvGeom,
    x: &'a [f32],
    n: usize,
    gi: usize,
    imgs: Range<usize>,
    t: bool,
}

impl bf16::Blocks for Im2colBlocks<'_> {
    fn fill(&self, k0: usize, kc: usize, j0: usize, nc: usize, out: &mut [f32]) {
        if self.t {
            self.rows_into(j0..j0 + nc, k0..k0 + kc, out)
        } else {
            self.rows_into(k0..k0 + kc, j0..j0 + nc, out)
        }
    }
    fn k_contiguous(&self) -> bool {
        self.t
    }
}

impl Im2colBlocks<'_> {
    /// Rows `rows` × columns `cols` of the im2col matrix into `out`, row
    /// after row.
    fn rows_into(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        let (g, p, hw) = (self.g, self.g.positions(), self.g.plane());
        let (j0, nc) = (cols.start, cols.len());
        for (row, dst) in rows.clone().zip(out[..rows.len() * nc].chunks_exact_mut(nc)) {
            let (c, ky, kx) = (row / g.taps(), row % g.taps() / g.kw, row % g.kw);
            let channel = self.gi * g.per_group_in() + c;
            let inside = g.columns(kx);
            // Output row by output row: (image, oy, ox) from column j.
            let mut j = j0;
            while j < j0 + nc {
                let (img, oy, ox) = (j / p, j % p / g.wo, j % g.wo);
                let len = (g.wo - ox).min(j0 + nc - j);
                let seg = &mut dst[j - j0..][..len];
                j += len;
                let Some(iy) = g.source_row(oy, ky) else {
                    seg.fill(0.0);
                    continue;
                };
                let plane = &self.x[(channel * self.n + self.imgs.start + img) * hw..][..hw];
                let (lo, hi) = (inside.start.clamp(ox, ox + len), inside.end.clamp(ox, ox + len));
                let (lo, hi) = (lo - ox, hi.max(lo) - ox);
                seg[..lo].fill(0.0);
                seg[hi..].fill(0.0);
                if hi > lo {
                    let start = g.input_column(ox + lo, kx);
                    row_op(&mut seg[lo..hi], &plane[iy * g.w..][..g.w], start, g.stride[1], |o, v| *o = v);
                }
            }
        }
    }
}

/// The GEMM operand (patch × images·P) of group `gi` for images `imgs`:
/// the input itself for a pointwise conv, else its im2col matrix (in `col`).
fn operand<'a>(g: &ConvGeom, x: &'a [f32], n: usize, gi: usize, imgs: &Range<usize>, col: &'a mut Vec<f32>) -> Strided<'a> {
    if g.is_pointwise() {
        let hw = g.plane();
        return Strided::new(&x[(gi * g.per_group_in() * n + imgs.start) * hw..], (n * hw, 1));
    }
    im2col(g, x, n, gi, imgs.clone(), col);
    Strided::new(col, (imgs.len() * g.positions(), 1))
}

/// The image pieces a thread works through: pointwise convs need no
/// buffer, so all of its images at once.
fn per_piece(g: &ConvGeom) -> usize {
    if g.is_pointwise() {
        usize::MAX / 2
    } else {
        g.images_per_col()
    }
}

/// The weights of each group of a conv, packed for bf16 products
/// (`conv_forward`'s `packed`): for weights that will not change.
///
/// # Panics
/// Without AVX512-BF16 (see `bf16_available`).
pub fn pack_conv_weights(g: &ConvGeom, w: &[f32]) -> Vec<PackedA> {
    let (og, patch) = (g.per_group_out(), g.patch());
    (0..g.group).map(|gi| PackedA::new(og, patch, Strided::new(&w[gi * og * patch..], (patch, 1)))).collect()
}

/// y = conv(x, w) + b over a batch of `n` images (channel-major); with
/// `packed` (`pack_conv_weights` of `w`), bf16 products on those.
#[allow(clippy::too_many_arguments)]
pub fn conv_forward(
    g: &ConvGeom,
    n: usize,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    y: &mut [f32],
    precision: Precision,
    packed: Option<&[PackedA]>,
) {
    let (og, p, patch) = (g.per_group_out(), g.positions(), g.patch());
    let bf16 = precision == Precision::Bf16 || packed.is_some();
    if g.is_depthwise() {
        depthwise_forward(g, n, x, w, y);
    } else if bf16 && !g.is_pointwise() {
        conv_forward_bf16_blocks(g, n, x, w, y, packed);
    } else {
        let out = Out::new(y);
        thread_ranges(n).into_par_iter().for_each_init(Scratch::take, |col, r| {
            for gi in 0..g.group {
                for imgs in pieces(r.clone(), per_piece(g)) {
                    let src = operand(g, x, n, gi, &imgs, col);
                    let wg = Strided::new(&w[gi * og * patch..], (patch, 1));
                    let (cols, to) = (imgs.len() * p, out.at((gi * og * n + imgs.start) * p));
                    // SAFETY: this thread alone writes the columns of images `r`;
                    // a packed A is checked against og×patch.
                    unsafe {
                        match packed {
                            Some(packed) => bf16::gemm(og, patch, cols, bf16::A::Packed(&packed[gi]), bf16::B::Matrix(src), to, n * p, 0.0),
                            None => gemm_into(og, patch, cols, wg, src, to, n * p, 0.0, precision),
                        }
                    };
                }
            }
        });
    }
    if let Some(b) = b {
        y.par_chunks_mut(n * p).zip(b).for_each(|(yc, &bc)| yc.iter_mut().for_each(|v| *v += bc));
    }
}

/// `conv_forward` of a non-pointwise conv in bf16: the im2col matrix
/// made by blocks inside the product (`Im2colBlocks`), each thread's images
/// in one product.
fn conv_forward_bf16_blocks(g: &ConvGeom, n: usize, x: &[f32], w: &[f32], y: &mut [f32], packed: Option<&[PackedA]>) {
    assert!(bf16::available(), "bf16 products on a CPU without AVX512-BF16");
    let (og, p, patch) = (g.per_group_out(), g.positions(), g.patch());
    let out = Out::new(y);
    thread_ranges(n).into_par_iter().for_each(|imgs| {
        for gi in 0..g.group {
            let a = match packed {
                Some(packed) => bf16::A::Packed(&packed[gi]),
                None => bf16::A::Matrix(Strided::new(&w[gi * og * patch..], (patch, 1))),
            };
            let cols = imgs.len() * p;
            let to = out.at((gi * og * n + imgs.start) * p);
            let src = Im2colBlocks { g, x, n, gi, imgs: imgs.clone(), t: false };
            // SAFETY: AVX512-BF16 checked above; this thread alone writes the
            // columns of images `imgs`; a packed A is checked against og×patch.
            unsafe { bf16::gemm(og, patch, cols, a, bf16::B::Blocks(&src), to, n * p, 0.0) };
        }
    });
}

/// Adds each channel's sum of a channel-major `dy` into `db` (a bias's
/// gradient).
pub fn add_channel_sums(dy: &[f32], db: &mut [f32]) {
    let run = dy.len() / db.len().max(1);
    db.par_iter_mut().zip(dy.par_chunks(run.max(1))).for_each(|(d, yc)| *d += yc.iter().sum::<f32>());
}

/// Adds dL/dw of a batch of `n` images into `dw`.
pub fn conv_weight_grad(g: &ConvGeom, n: usize, x: &[f32], dy: &[f32], dw: &mut [f32], precision: Precision) {
    let (og, p, patch) = (g.per_group_out(), g.positions(), g.patch());
    if g.is_depthwise() {
        return depthwise_weight_grad(g, n, x, dy, dw);
    }
    let partial: Vec<Vec<f32>> = thread_ranges(n)
        .into_par_iter()
        .map(|r| {
            let (mut part, mut col) = (vec![0.0; g.weight_len()], Scratch::take());
            for gi in 0..g.group {
                if precision == Precision::Bf16 && !g.is_pointwise() {
                    // The im2col matrix by blocks, as in `conv_forward_bf16_blocks`.
                    assert!(bf16::available(), "bf16 products on a CPU without AVX512-BF16");
                    let dyg = Strided::new(&dy[(gi * og * n + r.start) * p..], (n * p, 1));
                    let src = Im2colBlocks { g, x, n, gi, imgs: r.clone(), t: true };
                    let to = Out::new(&mut part[gi * og * patch..]);
                    // SAFETY: AVX512-BF16 checked above; `part` is this thread's own buffer.
                    unsafe { bf16::gemm(og, r.len() * p, patch, bf16::A::Matrix(dyg), bf16::B::Blocks(&src), to, patch, 0.0) };
                    continue;
                }
                for imgs in pieces(r.clone(), per_piece(g)) {
                    let src = operand(g, x, n, gi, &imgs, &mut col);
                    let dyg = Strided::new(&dy[(gi * og * n + imgs.start) * p..], (n * p, 1));
                    // SAFETY: `part` is this thread's own buffer.
                    unsafe {
                        gemm_into(og, imgs.len() * p, patch, dyg, src.t(), Out::new(&mut part[gi * og * patch..]), patch, 1.0, precision)
                    };
                }
            }
            part
        })
        .collect();
    for part in partial {
        dw.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
    }
}

/// dL/dx of a batch of `n` images (overwrites `dx`).
pub fn conv_input_grad(g: &ConvGeom, n: usize, w: &[f32], dy: &[f32], dx: &mut [f32], precision: Precision) {
    let (cg, og, p, patch, hw) = (g.per_group_in(), g.per_group_out(), g.positions(), g.patch(), g.plane());
    if g.is_depthwise() {
        return depthwise_input_grad(g, n, w, dy, dx);
    }
    if !g.is_pointwise() {
        dx.par_iter_mut().for_each(|v| *v = 0.0);
    }
    let out = Out::new(dx);
    thread_ranges(n).into_par_iter().for_each_init(Scratch::take, |col: &mut Scratch, r| {
        for gi in 0..g.group {
            let wg = Strided::new(&w[gi * og * patch..], (patch, 1)).t();
            for imgs in pieces(r.clone(), per_piece(g)) {
                let dyg = Strided::new(&dy[(gi * og * n + imgs.start) * p..], (n * p, 1));
                let width = imgs.len() * p;
                // SAFETY: this thread alone touches the planes of images `r`.
                unsafe {
                    if g.is_pointwise() {
                        gemm_into(cg, og, width, wg, dyg, out.at((gi * cg * n + imgs.start) * hw), n * hw, 0.0, precision);
                    } else {
                        col.clear();
                        col.resize(patch * width, 0.0);
                        gemm_into(patch, og, width, wg, dyg, Out::new(col), width, 0.0, precision);
                        col2im(g, col, n, gi, imgs, out);
                    }
                }
            }
        }
    });
}

/// y += the depthwise conv of one input plane `x` with one output
/// channel's taps `wk`, tap after tap over whole rows.
fn depthwise_plane(g: &ConvGeom, x: &[f32], wk: &[f32], y: &mut [f32]) {
    g.rows(|ky, kx, iy, oy, cols| {
        let wv = wk[ky * g.kw + kx];
        let start = g.input_column(cols.start, kx);
        row_op(&mut y[oy * g.wo..][cols], &x[iy * g.w..][..g.w], start, g.stride[1], |o, v| *o += wv * v);
    });
}

/// Values summed in registers by the depthwise kernels: one AVX register
/// (two SSE ones).
const LANES: usize = 8;

/// Whether this CPU has AVX2 (the depthwise kernels are then compiled for it).
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The taps of one depthwise channel on a zero-bordered plane: output
/// (oy, ox) sums `wk[ky·kw + kx] · src[oy·stride + rows[ky]][ox + cols[kx]]`
/// over (ky, kx) in order.
struct Correlation<'a> {
    wk: &'a [f32],
    rows: Vec<usize>,
    cols: Vec<usize>,
    stride: usize,
}

impl Correlation<'_> {
    /// The forward conv of `g` on a plane bordered by `pad_plane`.
    fn forward<'a>(g: &ConvGeom, wk: &'a [f32]) -> Correlation<'a> {
        let rows = (0..g.kh).map(|ky| ky * g.dilation[0]).collect();
        Correlation { wk, rows, cols: (0..g.kw).map(|kx| kx * g.dilation[1]).collect(), stride: g.stride[0] }
    }
    /// dL/dx of `g` (strides 1) from dL/dy bordered by `pad_grad`: the taps
    /// mirrored, in the same (ky, kx) order.
    fn input_grad<'a>(g: &ConvGeom, wk: &'a [f32]) -> Correlation<'a> {
        let rows = (0..g.kh).map(|ky| (g.kh - 1 - ky) * g.dilation[0]).collect();
        Correlation { wk, rows, cols: (0..g.kw).map(|kx| (g.kw - 1 - kx) * g.dilation[1]).collect(), stride: 1 }
    }

    /// out (rows of `out_w`) from `src` (rows of `src_w`), overwritten.
    /// The sums are those of the tap-by-tap loops (`depthwise_plane`,
    /// the input gradient's) bit for bit, finite weights given: the same
    /// order, a multiply and an add per tap (never fused), and a border tap
    /// adds ±0 to a sum that is never −0.
    fn run(&self, src: &[f32], src_w: usize, out: &mut [f32], out_w: usize) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 (checked above).
            return unsafe { self.run_avx2(src, src_w, out, out_w) };
        }
        self.run_body(src, src_w, out, out_w)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(&self, src: &[f32], src_w: usize, out: &mut [f32], out_w: usize) {
        self.run_body(src, src_w, out, out_w)
    }

    #[inline(always)]
    fn run_body(&self, src: &[f32], src_w: usize, out: &mut [f32], out_w: usize) {
        if out_w == 0 {
            return;
        }
        // Four registers of sums at a time (their adds do not wait on each
        // other), then one, then half of one (most of a 7-wide plane), then
        // single columns.
        let (wide, narrow) = (out_w / (4 * LANES) * (4 * LANES), out_w / LANES * LANES);
        let half = narrow + (out_w - narrow) / (LANES / 2) * (LANES / 2);
        for (oy, orow) in out.chunks_exact_mut(out_w).enumerate() {
            let row = |ky: usize| &src[(oy * self.stride + self.rows[ky]) * src_w..][..src_w];
            for ox in (0..wide).step_by(4 * LANES) {
                orow[ox..][..4 * LANES].copy_from_slice(&self.sums::<{ 4 * LANES }>(row, ox));
            }
            for ox in (wide..narrow).step_by(LANES) {
                orow[ox..][..LANES].copy_from_slice(&self.sums::<LANES>(row, ox));
            }
            for ox in (narrow..half).step_by(LANES / 2) {
                orow[ox..][..LANES / 2].copy_from_slice(&self.sums::<{ LANES / 2 }>(row, ox));
            }
            for (ox, o) in orow.iter_mut().enumerate().skip(half) {
                *o = self.sums::<1>(row, ox)[0];
            }
        }
    }

    /// For the 3x3 taps, Σ over images and output rows of dy[oy][ox + l] ·
    /// plane[oy·stride + rows[ky]][ox + l + cols[kx]], for W columns from
    /// `ox`, summed in image-then-row order.
    #[inline(always)]
    fn tap_products<const W: usize>(&self, planes: &GradPlanes, ox: usize) -> [[f32; W]; TAPS3] {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 (checked above).
            return unsafe { self.tap_products_avx2::<W>(planes, ox) };
        }
        self.tap_products_body::<W>(planes, ox)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn tap_products_avx2<const W: usize>(&self, planes: &GradPlanes, ox: usize) -> [[f32; W]; TAPS3] {
        self.tap_products_body::<W>(planes, ox)
    }

    #[inline(always)]
    fn tap_products_body<const W: usize>(&self, planes: &GradPlanes, ox: usize) -> [[f32; W]; TAPS3] {
        let GradPlanes { xs, plane_len, pw, dys, p, wo, n, ho } = *planes;
        let mut acc = [[0.0f32; W]; TAPS3];
        // Fixed-size offsets: the tap loops unroll and the sums stay in registers.
        let rows: [usize; 3] = std::array::from_fn(|ky| self.rows[ky]);
        let cols: [usize; 3] = std::array::from_fn(|kx| self.cols[kx]);
        for img in 0..n {
            let (plane, dyp) = (&xs[img * plane_len..][..plane_len], &dys[img * p..][..p]);
            for oy in 0..ho {
                let d = &dyp[oy * wo + ox..][..W];
                for ky in 0..3 {
                    let row = &plane[(oy * self.stride + rows[ky]) * pw..][..pw];
                    for kx in 0..3 {
                        let src = &row[ox + cols[kx]..][..W];
                        for l in 0..W {
                            acc[ky * 3 + kx][l] += d[l] * src[l];
                        }
                    }
                }
            }
        }
        acc
    }

    /// The sums of W outputs from column `ox` on, tap row `ky` being `row(ky)`.
    #[inline(always)]
    fn sums<'s, const W: usize>(&self, row: impl Fn(usize) -> &'s [f32], ox: usize) -> [f32; W] {
        let mut acc = [0.0f32; W];
        let kw = self.cols.len();
        for (ky, wrow) in self.wk.chunks_exact(kw).enumerate() {
            let r = row(ky);
            for (&wv, &col) in wrow.iter().zip(&self.cols) {
                for (a, &v) in acc.iter_mut().zip(&r[ox + col..][..W]) {
                    *a += wv * v;
                }
            }
        }
        acc
    }
}

/// `plane` (h×w) inside a border of zeros (`ConvGeom::padded_size`).
fn pad_plane(g: &ConvGeom, plane: &[f32], padded: &mut Vec<f32>) {
    let (ph, pw) = g.padded_size();
    padded.clear();
    padded.resize(ph * pw, 0.0);
    pad_plane_into(g, plane, padded);
}

/// `pad_plane` into `padded`, zeros of the bordered plane's size.
fn pad_plane_into(g: &ConvGeom, plane: &[f32], padded: &mut [f32]) {
    let pw = g.padded_size().1;
    for (iy, row) in plane.chunks_exact(g.w.max(1)).enumerate() {
        padded[(iy + g.pad[0]) * pw + g.pad[1]..][..g.w].copy_from_slice(row);
    }
}

/// Columns of the bordered output gradient `pad_grad` makes.
fn grad_width(g: &ConvGeom) -> usize {
    g.w + (g.kw - 1) * g.dilation[1]
}

/// The output gradient of one plane (ho×wo, strides 1) inside a border of
/// zeros such that dx[iy][ix] reads tap (ky, kx) at row iy + (kh−1−ky)·d,
/// column ix + (kw−1−kx)·d: dy[oy][ox] sits at (oy + (kh−1)·d − pad, ox +
/// (kw−1)·d − pad); rows and columns that land outside are never read.
fn pad_grad(g: &ConvGeom, dy: &[f32], padded: &mut Vec<f32>) {
    let (ph, pw) = (g.h + (g.kh - 1) * g.dilation[0], grad_width(g));
    padded.clear();
    padded.resize(ph * pw, 0.0);
    let (top, left) = ((g.kh - 1) * g.dilation[0], (g.kw - 1) * g.dilation[1]);
    for (oy, row) in dy.chunks_exact(g.wo.max(1)).enumerate().take(g.ho) {
        let Some(r) = (oy + top).checked_sub(g.pad[0]).filter(|&r| r < ph) else { continue };
        // Columns ox with 0 ≤ ox + left − pad < pw.
        let skip = g.pad[1].saturating_sub(left);
        let first = (left + skip) - g.pad[1];
        let len = row.len().saturating_sub(skip).min(pw.saturating_sub(first));
        padded[r * pw + first..][..len].copy_from_slice(&row[skip..][..len]);
    }
}

fn depthwise_forward(g: &ConvGeom, n: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (og, p, hw, taps) = (g.per_group_out(), g.positions(), g.plane(), g.taps());
    // A column stride of 1 reads padded planes (contiguous taps for runs of outputs).
    let padded = g.stride[1] == 1;
    let pw = g.padded_size().1;
    y.par_chunks_mut(og * n * p).enumerate().for_each_init(Vec::new, |buf, (gi, yg)| {
        if !padded {
            yg.fill(0.0);
        }
        for (o, yo) in yg.chunks_mut(n * p).enumerate() {
            let wk = &w[(gi * og + o) * taps..][..taps];
            let correlation = Correlation::forward(g, wk);
            for (img, yp) in yo.chunks_mut(p).enumerate() {
                let xp = &x[(gi * n + img) * hw..][..hw];
                if padded {
                    pad_plane(g, xp, buf);
                    correlation.run(buf, pw, yp, g.wo);
                } else {
                    depthwise_plane(g, xp, wk, yp);
                }
            }
        }
    });
}

fn depthwise_weight_grad(g: &ConvGeom, n: usize, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (og, p, hw, taps) = (g.per_group_out(), g.positions(), g.plane(), g.taps());
    if og == 1 && g.stride == [1, 1] && (g.kh, g.kw) == (3, 3) {
        return dw.par_chunks_mut(taps).enumerate().for_each_init(Vec::new, |planes: &mut Vec<f32>, (gi, dwg)| {
            let xs = &x[gi * n * hw..][..n * hw];
            depthwise_weight_grad_3x3(g, xs, &dy[gi * n * p..][..n * p], planes, dwg);
        });
    }
    dw.par_chunks_mut(og * taps).enumerate().for_each_init(Vec::new, |acc: &mut Vec<f32>, (gi, dwg)| {
        for (o, dwo) in dwg.chunks_mut(taps).enumerate() {
            let dys = &dy[(gi * og + o) * n * p..][..n * p];
            depthwise_weight_grad_loops(g, &x[gi * n * hw..][..n * hw], dys, acc, dwo);
        }
    });
}

/// dw += dL/dw of one depthwise output channel over the planes `xs` and
/// their output gradients `dys`, tap after tap over whole rows: products
/// summed per tap and output column, reduced at the end (elementwise adds
/// vectorize, a running f32 sum does not).
fn depthwise_weight_grad_loops(g: &ConvGeom, xs: &[f32], dys: &[f32], acc: &mut Vec<f32>, dw: &mut [f32]) {
    let (p, hw, wo) = (g.positions(), g.plane(), g.wo);
    acc.clear();
    acc.resize(g.taps() * wo, 0.0);
    for (xp, dyp) in xs.chunks_exact(hw.max(1)).zip(dys.chunks_exact(p.max(1))) {
        g.rows(|ky, kx, iy, oy, cols| {
            let start = g.input_column(cols.start, kx);
            let (row, d) = (&xp[iy * g.w..][..g.w], &dy_row(dyp, g, oy)[cols.clone()]);
            let a = &mut acc[(ky * g.kw + kx) * wo..][cols];
            if g.stride[1] == 1 {
                a.iter_mut().zip(d).zip(&row[start..]).for_each(|((a, &d), &v)| *a += d * v);
            } else {
                a.iter_mut().zip(d).zip(row[start..].iter().step_by(g.stride[1])).for_each(|((a, &d), &v)| *a += d * v);
            }
        });
    }
    for (t, w) in dw.iter_mut().enumerate() {
        *w += acc[t * wo..][..wo].iter().sum::<f32>();
    }
}

/// One depthwise channel's weight-gradient operands: `n` zero-bordered
/// input planes (`plane_len` values, rows of `pw`) and their output
/// gradients (`p` values, `ho` rows of `wo`).
#[derive(Clone, Copy)]
struct GradPlanes<'a> {
    xs: &'a [f32],
    plane_len: usize,
    pw: usize,
    dys: &'a [f32],
    p: usize,
    wo: usize,
    n: usize,
    ho: usize,
}

/// Taps of a 3x3 kernel: the depthwise weight gradient's fast path keeps
/// one register of sums per tap.
const TAPS3: usize = 9;

/// dw += dL/dw of one 3x3 depthwise channel (strides 1) over the `n`
/// planes `xs` and their output gradients `dys`. The sums per tap and
/// output column are those of the general loop in the same order (image,
/// then row; the zero border adds ±0 to sums that are never −0), each run
/// of LANES columns held in registers over all images and rows; the
/// columns then summed in order, as there. (The border is x's, so a
/// non-finite dy on a border tap gives NaN where the loop skipped it.)
fn depthwise_weight_grad_3x3(g: &ConvGeom, xs: &[f32], dys: &[f32], planes: &mut Vec<f32>, dw: &mut [f32]) {
    let ((ph, pw), (hw, p)) = (g.padded_size(), (g.plane(), g.positions()));
    let n = xs.len() / hw.max(1);
    planes.clear();
    planes.resize(n * ph * pw, 0.0);
    for (plane, padded) in xs.chunks_exact(hw.max(1)).zip(planes.chunks_exact_mut((ph * pw).max(1))) {
        pad_plane_into(g, plane, padded);
    }
    let mut per_column = vec![0.0f32; TAPS3 * g.wo];
    // Only its tap offsets are used: the products are dy·x, not weights.
    let sums = Correlation::forward(g, &[0.0; TAPS3]);
    let operands = GradPlanes { xs: planes, plane_len: ph * pw, pw, dys, p, wo: g.wo, n, ho: g.ho };
    let narrow = g.wo / LANES * LANES;
    for ox in (0..narrow).step_by(LANES) {
        let acc = sums.tap_products::<LANES>(&operands, ox);
        for (t, a) in acc.iter().enumerate() {
            per_column[t * g.wo + ox..][..LANES].copy_from_slice(a);
        }
    }
    let half = narrow + (g.wo - narrow) / (LANES / 2) * (LANES / 2);
    for ox in (narrow..half).step_by(LANES / 2) {
        let acc = sums.tap_products::<{ LANES / 2 }>(&operands, ox);
        for (t, a) in acc.iter().enumerate() {
            per_column[t * g.wo + ox..][..LANES / 2].copy_from_slice(a);
        }
    }
    for ox in half..g.wo {
        let acc = sums.tap_products::<1>(&operands, ox);
        for (t, a) in acc.iter().enumerate() {
            per_column[t * g.wo + ox] = a[0];
        }
    }
    for (t, w) in dw.iter_mut().enumerate() {
        *w += per_column[t * g.wo..][..g.wo].iter().sum::<f32>();
    }
}

fn dy_row<'a>(dyp: &'a [f32], g: &ConvGeom, oy: usize) -> &'a [f32] {
    &dyp[oy * g.wo..][..g.wo]
}

fn depthwise_input_grad(g: &ConvGeom, n: usize, w: &[f32], dy: &[f32], dx: &mut [f32]) {
    let (og, p, hw, taps) = (g.per_group_out(), g.positions(), g.plane(), g.taps());
    if og == 1 && g.stride == [1, 1] {
        // A correlation of the bordered dL/dy with the mirrored taps.
        return dx.par_chunks_mut(n * hw).enumerate().for_each_init(Vec::new, |buf, (gi, dxg)| {
            let mirrored = Correlation::input_grad(g, &w[gi * taps..][..taps]);
            for (img, dxp) in dxg.chunks_mut(hw).enumerate() {
                pad_grad(g, &dy[(gi * n + img) * p..][..p], buf);
                mirrored.run(buf, grad_width(g), dxp, g.w);
            }
        });
    }
    dx.par_chunks_mut(n * hw).enumerate().for_each(|(gi, dxg)| {
        dxg.fill(0.0);
        for (img, dxp) in dxg.chunks_mut(hw).enumerate() {
            for o in 0..og {
                let wk = &w[(gi * og + o) * taps..][..taps];
                depthwise_plane_input_grad(g, &dy[((gi * og + o) * n + img) * p..][..p], wk, dxp);
            }
        }
    });
}

/// dx += dL/dx of one plane from one output channel's `dyp` and taps `wk`,
/// tap after tap over whole rows.
fn depthwise_plane_input_grad(g: &ConvGeom, dyp: &[f32], wk: &[f32], dxp: &mut [f32]) {
    g.rows(|ky, kx, iy, oy, cols| {
        let (wv, start) = (wk[ky * g.kw + kx], g.input_column(cols.start, kx));
        let (dst, d) = (&mut dxp[iy * g.w..][..g.w], &dy_row(dyp, g, oy)[cols]);
        if g.stride[1] == 1 {
            dst[start..].iter_mut().zip(d).for_each(|(t, &v)| *t += wv * v);
        } else {
            dst[start..].iter_mut().step_by(g.stride[1]).zip(d).for_each(|(t, &v)| *t += wv * v);
        }
    });
}

/// Geometry of a 2-d max pooling on one image (`c` planes).
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
    /// The input rows output row `oy` reads (inside the image).
    fn tap_rows(&self, oy: usize) -> Range<usize> {
        let top = oy * self.stride[0];
        top.max(self.pad[0]) - self.pad[0]..(top + self.kh).min(self.h + self.pad[0]).saturating_sub(self.pad[0])
    }
    /// The output columns whose taps all fall inside the input row.
    fn inner_columns(&self) -> Range<usize> {
        let s = self.stride[1];
        let first = self.pad[1].div_ceil(s);
        let end = if self.w + self.pad[1] >= self.kw { (self.w + self.pad[1] - self.kw) / s + 1 } else { 0 };
        let end = end.min(self.wo);
        first.min(end)..end
    }
}

/// Max pooling of `g.c` planes (any planes: the layout does not matter);
/// `arg` gets each output's source index in its plane (the first maximum
/// in tap order).
pub fn maxpool_forward(g: &PoolGeom, x: &[f32], y: &mut [f32], arg: &mut [u32]) {
    let (hw, ohw, s) = (g.h * g.w, g.ho * g.wo, g.stride[1]);
    let inner = g.inner_columns();
    // An input row split by column phase (column j at phase j % s, place
    // j / s), so that each tap reads a contiguous run for every output.
    let per_phase = g.w.div_ceil(s);
    let mut phases = vec![0.0f32; s * per_phase];
    for c in 0..g.c {
        let plane = &x[c * hw..][..hw];
        for oy in 0..g.ho {
            let taps = g.tap_rows(oy);
            let (yrow, arow) = (&mut y[c * ohw + oy * g.wo..][..g.wo], &mut arg[c * ohw + oy * g.wo..][..g.wo]);
            // Columns whose taps all fall inside the row: tap after tap over
            // the whole run (a select per value, which vectorizes).
            let (best, at) = (&mut yrow[inner.clone()], &mut arow[inner.clone()]);
            best.fill(f32::NEG_INFINITY);
            at.fill(0);
            for iy in taps.clone().filter(|_| !inner.is_empty()) {
                let row = &plane[iy * g.w..][..g.w];
                for r in 0..s {
                    row.iter().skip(r).step_by(s).zip(&mut phases[r * per_phase..]).for_each(|(&v, p)| *p = v);
                }
                for kx in 0..g.kw {
                    let first = inner.start * s + kx - g.pad[1];
                    let src = &phases[(first % s) * per_phase + first / s..][..inner.len()];
                    let base = (iy * g.w + first) as u32;
                    for (i, ((b, a), &v)) in best.iter_mut().zip(at.iter_mut()).zip(src).enumerate() {
                        // All ones where v is larger: bit selects, no branch.
                        let more = 0u32.wrapping_sub((v > *b) as u32);
                        *b = f32::from_bits(b.to_bits() & !more | v.to_bits() & more);
                        *a = *a & !more | (base + (i * s) as u32) & more;
                    }
                }
            }
            for ox in (0..g.wo).filter(|ox| !inner.contains(ox)) {
                let cols = (0..g.kw).filter_map(|kx| (ox * s + kx).checked_sub(g.pad[1]).filter(|&i| i < g.w));
                let (lo, hi) = cols.fold((usize::MAX, 0), |(lo, hi), i| (lo.min(i), hi.max(i + 1)));
                let (lo, len) = if hi > lo { (lo, hi - lo) } else { (0, 0) };
                (yrow[ox], arow[ox]) = max_over(taps.clone().map(|iy| (iy * g.w + lo, len)), plane);
            }
        }
    }
}

/// The maximum over runs `(start, len)` of `plane`, and where it is (the
/// first one); a select rather than a branch, which mispredicts on images.
fn max_over(runs: impl Iterator<Item = (usize, usize)>, plane: &[f32]) -> (f32, u32) {
    let (mut best, mut at) = (f32::NEG_INFINITY, 0u32);
    for (start, len) in runs {
        for (i, &v) in plane[start..][..len].iter().enumerate() {
            let more = v > best;
            best = if more { v } else { best };
            at = if more { (start + i) as u32 } else { at };
        }
    }
    (best, at)
}

/// dL/dx of a max pooling of `g.c` planes (overwrites `dx`).
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

    #[allow(clippy::too_many_arguments)]
    fn geometry(
        c_in: usize,
        c_out: usize,
        group: usize,
        k: usize,
        stride: usize,
        pad: usize,
        dilation: usize,
        (h, w): (usize, usize),
    ) -> ConvGeom {
        let out = |len: usize| (len + 2 * pad - dilation * (k - 1) - 1) / stride + 1;
        ConvGeom {
            c_in,
            c_out,
            group,
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

    /// Direct loops over an image-major batch: y, dL/dw and dL/dx for the
    /// output gradient `dy`.
    fn reference(g: &ConvGeom, n: usize, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (cg, og, p) = (g.per_group_in(), g.per_group_out(), g.positions());
        let (mut y, mut dw, mut dx) = (vec![0.0; n * g.output_len()], vec![0.0; g.weight_len()], vec![0.0; n * g.input_len()]);
        for img in 0..n {
            for o in 0..g.c_out {
                let gi = o / og;
                for (oy, ox, c, ky, kx) in (0..g.ho).flat_map(|oy| {
                    (0..g.wo).flat_map(move |ox| {
                        (0..cg).flat_map(move |c| (0..g.kh).flat_map(move |ky| (0..g.kw).map(move |kx| (oy, ox, c, ky, kx))))
                    })
                }) {
                    let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pad[0] as isize;
                    let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.pad[1] as isize;
                    if iy < 0 || ix < 0 || iy as usize >= g.h || ix as usize >= g.w {
                        continue;
                    }
                    let xi = ((img * g.c_in + gi * cg + c) * g.h + iy as usize) * g.w + ix as usize;
                    let wi = ((o * cg + c) * g.kh + ky) * g.kw + kx;
                    let yi = (img * g.c_out + o) * p + oy * g.wo + ox;
                    y[yi] += w[wi] * x[xi];
                    dw[wi] += dy[yi] * x[xi];
                    dx[xi] += dy[yi] * w[wi];
                }
            }
        }
        (y, dw, dx)
    }

    /// [A][B][HW] to [B][A][HW].
    fn swap(v: &[f32], a: usize, b: usize, hw: usize) -> Vec<f32> {
        (0..b).flat_map(|j| (0..a).flat_map(move |i| (0..hw).map(move |q| v[(i * b + j) * hw + q]))).collect()
    }

    #[test]
    fn batch_kernels_equal_direct_loops() {
        let mut rng = Rng::new(3);
        for (c_in, c_out, group, k, s, p, d, hw, n) in [
            (3, 4, 1, 3, 1, 1, 1, (7, 6), 3),
            (4, 6, 2, 3, 2, 1, 1, (9, 8), 2),
            (4, 5, 1, 1, 1, 0, 1, (5, 4), 3),
            (4, 6, 2, 1, 1, 0, 1, (5, 4), 2),
            (3, 4, 1, 1, 2, 0, 1, (7, 7), 2),
            (3, 3, 3, 3, 1, 1, 1, (7, 6), 3),
            (4, 8, 4, 3, 2, 1, 1, (9, 8), 2),
            (2, 2, 2, 3, 1, 2, 2, (5, 7), 1),
            (3, 9, 3, 5, 2, 0, 1, (11, 9), 2),
            (2, 2, 2, 3, 2, 1, 1, (1, 1), 3),
            (2, 3, 1, 3, 2, 1, 2, (6, 5), 4),
        ] {
            check_against_direct_loops(&geometry(c_in, c_out, group, k, s, p, d, hw), n, &mut rng, Precision::F32);
            if bf16_available() {
                check_against_direct_loops(&geometry(c_in, c_out, group, k, s, p, d, hw), n, &mut rng, Precision::Bf16);
            }
        }
        // bf16: im2col matrices of more rows than a k block (540 > 512), made
        // by blocks that start past row 0.
        if bf16_available() {
            check_against_direct_loops(&geometry(60, 5, 1, 3, 1, 1, 1, (6, 5)), 3, &mut rng, Precision::Bf16);
            check_against_direct_loops(&geometry(60, 5, 1, 3, 2, 1, 1, (7, 6)), 3, &mut rng, Precision::Bf16);
            // A weight gradient summed over more positions than a k block:
            // 576 in one image (a thread's range may hold a single image).
            check_against_direct_loops(&geometry(3, 4, 1, 3, 1, 1, 1, (24, 24)), 3, &mut rng, Precision::Bf16);
        }
        // Non-square depthwise kernels (they must not take the 3x3 paths), a
        // row stride of 2 with a column stride of 1, and pads past the kernel.
        let base = geometry(2, 2, 2, 3, 1, 1, 1, (9, 11));
        let wide = |kh: usize, kw: usize, pad: [usize; 2]| ConvGeom {
            kh,
            kw,
            pad,
            ho: 9 + 2 * pad[0] + 1 - kh,
            wo: 11 + 2 * pad[1] + 1 - kw,
            ..base.clone()
        };
        for g in [wide(1, 9, [0, 4]), wide(9, 1, [4, 0]), wide(1, 3, [0, 1]), wide(3, 3, [4, 4])] {
            check_against_direct_loops(&g, 3, &mut rng, Precision::F32);
        }
        check_against_direct_loops(&ConvGeom { stride: [2, 1], ho: 5, ..base }, 2, &mut rng, Precision::F32);
    }

    /// conv forward, weight and input gradients of `g` on random values
    /// against `reference`, to 1e-4. With bf16 products the values are
    /// bf16 numbers, so that each product is exact and only the order of
    /// the f32 sums differs: any packing or indexing error shows.
    fn check_against_direct_loops(g: &ConvGeom, n: usize, rng: &mut Rng, precision: Precision) {
        let bf = |v: f32| if precision == Precision::Bf16 { f32::from_bits(bf16::to_bf16(v) << 16) } else { v };
        let mut random = |len: usize| (0..len).map(|_| bf(rng.normal())).collect::<Vec<f32>>();
        let (x, w, dy) = (random(n * g.input_len()), random(g.weight_len()), random(n * g.output_len()));
        let (y0, dw0, dx0) = reference(g, n, &x, &w, &dy);
        let (xc, dyc) = (swap(&x, n, g.c_in, g.plane()), swap(&dy, n, g.c_out, g.positions()));
        let (mut y, mut dw, mut dx) = (vec![9.0; y0.len()], vec![0.0; dw0.len()], vec![9.0; dx0.len()]);
        conv_forward(g, n, &xc, &w, None, &mut y, precision, None);
        if precision == Precision::Bf16 && !g.is_depthwise() {
            // Weights packed beforehand give the same bits.
            let mut again = vec![9.0; y.len()];
            conv_forward(g, n, &xc, &w, None, &mut again, precision, Some(&pack_conv_weights(g, &w)));
            assert!(again.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()), "{g:?}: packed weights changed y");
        }
        conv_weight_grad(g, n, &xc, &dyc, &mut dw, precision);
        conv_input_grad(g, n, &w, &dyc, &mut dx, precision);
        let (y, dx) = (swap(&y, g.c_out, n, g.positions()), swap(&dx, g.c_in, n, g.plane()));
        for (name, a, b) in [("y", &y, &y0), ("dw", &dw, &dw0), ("dx", &dx, &dx0)] {
            let err = a.iter().zip(b.iter()).map(|(u, v)| (u - v).abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-4, "{g:?} batch {n} {precision:?}: {name} differs by {err}");
        }
    }

    /// Max pooling by direct loops with bounds checks on every tap.
    fn reference_maxpool(g: &PoolGeom, x: &[f32]) -> (Vec<f32>, Vec<u32>) {
        let (mut y, mut arg) = (vec![f32::NEG_INFINITY; g.output_len()], vec![0u32; g.output_len()]);
        for c in 0..g.c {
            for (oy, ox, ky, kx) in (0..g.ho)
                .flat_map(|oy| (0..g.wo).flat_map(move |ox| (0..g.kh).flat_map(move |ky| (0..g.kw).map(move |kx| (oy, ox, ky, kx)))))
            {
                let (iy, ix) = ((oy * g.stride[0] + ky) as isize - g.pad[0] as isize, (ox * g.stride[1] + kx) as isize - g.pad[1] as isize);
                if iy < 0 || ix < 0 || iy as usize >= g.h || ix as usize >= g.w {
                    continue;
                }
                let (at, o) = (iy as usize * g.w + ix as usize, (c * g.ho + oy) * g.wo + ox);
                if x[c * g.h * g.w + at] > y[o] {
                    (y[o], arg[o]) = (x[c * g.h * g.w + at], at as u32);
                }
            }
        }
        (y, arg)
    }

    #[test]
    fn maxpool_equals_direct_loops_with_ties_and_borders() {
        let mut rng = Rng::new(5);
        for (c, (h, w), k, s, p) in [
            (2, (112, 112), 3, 2, 1),
            (3, (7, 6), 3, 1, 1),
            (2, (5, 5), 2, 2, 0),
            (1, (2, 3), 3, 2, 1),
            (2, (9, 4), 3, 3, 2),
            (1, (1, 1), 3, 1, 1),
            (1, (1, 1), 1, 3, 0),
            (2, (2, 2), 2, 4, 0),
        ] {
            let out = |len: usize| (len + 2 * p - k) / s + 1;
            let g = PoolGeom { c, kh: k, kw: k, stride: [s; 2], pad: [p; 2], h, w, ho: out(h), wo: out(w) };
            // Rounded values tie often (the first maximum must win), negatives check the padding.
            let x: Vec<f32> = (0..g.input_len()).map(|_| (rng.normal() * 2.0).round()).collect();
            let (mut y, mut arg) = (vec![9.0; g.output_len()], vec![7u32; g.output_len()]);
            maxpool_forward(&g, &x, &mut y, &mut arg);
            assert_eq!((y, arg), reference_maxpool(&g, &x), "{g:?}");
        }
    }

    #[test]
    fn depthwise_fast_paths_equal_the_tap_loop_bit_for_bit() {
        let mut rng = Rng::new(7);
        for (k, p, d, hw) in [
            (3, 1, 1, (56, 56)),
            (3, 1, 1, (7, 7)),
            (5, 2, 1, (13, 11)),
            (3, 2, 2, (12, 19)),
            (3, 0, 1, (3, 2)),
            (3, 1, 1, (1, 1)),
            (3, 1, 1, (2, 30)),
            (2, 0, 1, (6, 37)),
            (3, 3, 1, (5, 9)),
        ] {
            let mut g = geometry(2, 2, 2, k, 1, p, d, hw);
            if k == 2 {
                // Pads after the image only (ho, wo one more than without them).
                (g.pad, g.ho, g.wo) = ([0, 0], hw.0, hw.1);
            }
            let mut random = |len: usize| (0..len).map(|_| rng.normal()).collect::<Vec<f32>>();
            let (x, wk) = (random(g.plane()), random(g.taps()));
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let (mut tap_loop, mut fast, mut padded) = (vec![0.0; g.positions()], vec![9.0; g.positions()], Vec::new());
            depthwise_plane(&g, &x, &wk, &mut tap_loop);
            pad_plane(&g, &x, &mut padded);
            Correlation::forward(&g, &wk).run(&padded, g.padded_size().1, &mut fast, g.wo);
            assert_eq!(bits(&fast), bits(&tap_loop), "forward {g:?}");
            // The input gradient, tap loop against correlation.
            let dy = random(g.positions());
            let (mut dx_loop, mut dx_fast) = (vec![0.0; g.plane()], vec![9.0; g.plane()]);
            depthwise_plane_input_grad(&g, &dy, &wk, &mut dx_loop);
            pad_grad(&g, &dy, &mut padded);
            Correlation::input_grad(&g, &wk).run(&padded, grad_width(&g), &mut dx_fast, g.w);
            assert_eq!(bits(&dx_fast), bits(&dx_loop), "input gradient {g:?}");
            // The weight gradient over three images (3x3 only), from a nonzero start.
            if k == 3 {
                let (xs, dys) = (random(3 * g.plane()), random(3 * g.positions()));
                let (mut dw_loop, mut dw_fast, mut acc) = (vec![0.5; 9], vec![0.5; 9], Vec::new());
                depthwise_weight_grad_loops(&g, &xs, &dys, &mut acc, &mut dw_loop);
                depthwise_weight_grad_3x3(&g, &xs, &dys, &mut acc, &mut dw_fast);
                assert_eq!(bits(&dw_fast), bits(&dw_loop), "weight gradient {g:?}");
            }
        }
    }
}
