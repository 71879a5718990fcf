//! Matrix products in bf16 with f32 sums, for `Precision::Bf16`.
//!
//! Why: on CPUs with AVX512-BF16 one `vdpbf16ps` does 32 multiply-adds
//! (pairs of bf16 products summed into 16 f32 lanes) in the time an f32
//! FMA does 16: `cargo bench --bench pipeline -- --peak` measures 234
//! against 117 GFLOP/s a core on this project's Zen 4 machine. Training
//! and inference in bf16 products with f32 sums is the usual mixed
//! precision (weights, activations, gradients and optimizer state stay f32;
//! only the operands of each product are rounded to bf16, 8 bits of
//! mantissa): a product's relative error is about 2^-8 of the sum of the
//! magnitudes of its terms, where f32 gives 2^-24 per add.
//!
//! Layout: C = A·B + beta·C is blocked as matrixmultiply is (panels of
//! `MR` rows of A and `NR` columns of B, packed, here as bf16 pairs: word
//! q of a lane holds k = 2q in its low half and 2q+1 in its high half, the
//! pair `vdpbf16ps` multiplies and adds). Sums run over k in blocks of `KC`
//! (each block from 0, then added to C), the same order on every call, so
//! results are reproducible.
use super::{Out, Strided};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of A per micro-kernel (12 × 2 registers of sums).
const MR: usize = 12;
/// Columns of B per micro-kernel (two 16-lane registers).
const NR: usize = 32;
/// k per block (256 pairs): a B panel of 32 KB.
const KC: usize = 512;
/// Columns of B packed at a time.
const NC: usize = 512;
/// Columns of a `B::Blocks` operand made and packed at a time: a block of
/// KC × 256 f32 (512 KB) and its packed copy (256 KB) stay in a Zen 4
/// core's 1 MB L2. (In unit tests 40, not a multiple of NR: blocks that end
/// inside a strip and split a conv's output rows.)
#[cfg(not(test))]
const NC_BLOCKS: usize = 256;
#[cfg(test)]
const NC_BLOCKS: usize = 40;

/// Whether this CPU runs the bf16 products.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `x` rounded to bf16 (to nearest, ties to even), as `vcvtne2ps2bf16` does.
pub(super) fn to_bf16(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        return (b >> 16) | 0x40;
    }
    (b + 0x7fff + ((b >> 16) & 1)) >> 16
}

thread_local! {
    /// Packed panels of A and B, and a block of a `B::Blocks` operand, kept
    /// from call to call.
    static PACKED: std::cell::RefCell<(Vec<u32>, Vec<u32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// A panel to pack: `lanes` of `width` (lanes past `live` are zeros), k
/// from `k0` for `kc` (k past the end of an odd block is zero); element
/// (lane l, k) at `data[l·ls + k·ks]`.
#[derive(Clone, Copy)]
struct Panel<'a> {
    data: &'a [f32],
    ls: usize,
    ks: usize,
    live: usize,
    k0: usize,
    kc: usize,
}

impl Panel<'_> {
    fn at(&self, l: usize, k: usize) -> f32 {
        if l < self.live && k < self.k0 + self.kc {
            self.data[l * self.ls + k * self.ks]
        } else {
            0.0
        }
    }

    /// Packs lanes `[s·width, (s+1)·width)` of `strips` strips into
    /// `out[s·pairs·width + q·width + l]` (`width` lanes per pair of k).
    fn pack(&self, width: usize, strips: usize, out: &mut [u32]) {
        let pairs = self.kc.div_ceil(2);
        let out = &mut out[..strips * pairs * width];
        #[cfg(target_arch = "x86_64")]
        if self.live > 0 && self.kc > 0 {
            // SAFETY: `available()` was checked by the caller of `gemm`.
            if self.ls == 1 {
                return unsafe { self.pack_lanes_contiguous(width, strips, out) };
            }
            if self.ks == 1 {
                return unsafe { self.pack_k_contiguous(width * strips, width, out) };
            }
        }
        for q in 0..pairs {
            for l in 0..width * strips {
                let k = self.k0 + 2 * q;
                out[(l / width) * pairs * width + q * width + l % width] = to_bf16(self.at(l, k)) | to_bf16(self.at(l, k + 1)) << 16;
            }
        }
    }

    /// Lanes contiguous (a row of B, a column of a transposed A): two runs
    /// of 16 (k and k+1) become 16 pairs.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_lanes_contiguous(&self, width: usize, strips: usize, out: &mut [u32]) {
        let pairs = self.kc.div_ceil(2);
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        let end = self.k0 + self.kc;
        // Pair after pair of rows, all strips: each row is read in order
        // (strip after strip, a row's strips are adjacent in memory).
        for q in 0..pairs {
            let k = self.k0 + 2 * q;
            let (lo_row, hi_row) = (k * self.ks, (k + 1) * self.ks);
            for s in 0..strips {
                for l in (0..width).step_by(16) {
                    let l0 = s * width + l;
                    let lanes = (width - l).min(16);
                    let live = self.live.saturating_sub(l0).min(lanes);
                    let mask = (1u32 << live).wrapping_sub(1) as u16;
                    let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                    if live > 0 {
                        assert!(l0 + lo_row + live <= self.data.len(), "bf16 pack: operand too short");
                        lo = _mm512_maskz_loadu_ps(mask, self.data.as_ptr().add(l0 + lo_row));
                        if k + 1 < end {
                            assert!(l0 + hi_row + live <= self.data.len(), "bf16 pack: operand too short");
                            hi = _mm512_maskz_loadu_ps(mask, self.data.as_ptr().add(l0 + hi_row));
                        }
                    }
                    let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                    let pairs16 = _mm512_permutexvar_epi16(interleave, both);
                    let at = s * pairs * width + q * width + l;
                    let dst = &mut out[at..at + lanes];
                    let keep = (1u32 << lanes).wrapping_sub(1) as u16;
                    _mm512_mask_storeu_epi32(dst.as_mut_ptr() as *mut i32, keep, pairs16);
                }
            }
        }
    }

    /// k contiguous (a row of A, a column of a transposed B): 32 values of
    /// each of up to 16 lanes become their next 16 pairs, in memory order;
    /// a 16 × 16 transpose in registers turns them into 16 pairs of the
    /// lanes side by side (word by word stores were 40 % of the packing).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_k_contiguous(&self, lanes: usize, width: usize, out: &mut [u32]) {
        let pairs = self.kc.div_ceil(2);
        for s in 0..lanes / width {
            let out = &mut out[s * pairs * width..(s + 1) * pairs * width];
            for l in (0..width).step_by(16) {
                let group = (width - l).min(16);
                let keep = (1u32 << group).wrapping_sub(1) as u16;
                for q0 in (0..pairs).step_by(16) {
                    let n = (self.kc - 2 * q0).min(32);
                    let lo_mask = (1u32 << n.min(16)).wrapping_sub(1) as u16;
                    let hi_mask = (1u32 << n.saturating_sub(16)).wrapping_sub(1) as u16;
                    let mut rows = [_mm512_setzero_si512(); 16];
                    for (r, row) in rows.iter_mut().enumerate().take(group) {
                        let lane = s * width + l + r;
                        if lane >= self.live {
                            continue;
                        }
                        let start = lane * self.ls + self.k0 + 2 * q0;
                        assert!(start + n <= self.data.len(), "bf16 pack: operand too short");
                        let p = self.data.as_ptr().add(start);
                        let (lo, hi) = (_mm512_maskz_loadu_ps(lo_mask, p), _mm512_maskz_loadu_ps(hi_mask, p.add(16)));
                        *row = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                    }
                    let cols = transpose16(rows);
                    for (q, col) in cols.iter().enumerate().take((pairs - q0).min(16)) {
                        let at = (q0 + q) * width + l;
                        let dst = &mut out[at..at + group];
                        _mm512_mask_storeu_epi32(dst.as_mut_ptr() as *mut i32, keep, *col);
                    }
                }
            }
        }
    }
}

/// The 16 × 16 transpose of 32-bit words: `out[c]` holds word c of every
/// row, rows in order (unpacks of 32 and 64 bits, then two rounds of
/// 128-bit lane shuffles).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    let mut v = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        v[i] = _mm512_shuffle_i32x4::<0x88>(u[i], u[i + 4]);
        v[i + 4] = _mm512_shuffle_i32x4::<0xdd>(u[i], u[i + 4]);
        v[i + 8] = _mm512_shuffle_i32x4::<0x88>(u[i + 8], u[i + 12]);
        v[i + 12] = _mm512_shuffle_i32x4::<0xdd>(u[i + 8], u[i + 12]);
    }
    let mut w = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        w[i] = _mm512_shuffle_i32x4::<0x88>(v[i], v[i + 8]);
        w[i + 8] = _mm512_shuffle_i32x4::<0xdd>(v[i], v[i + 8]);
    }
    w
}

/// C (`R` x 16·`H`, row stride `ldc`) = the sum over `pairs` of A's
/// and B's packed panels (panels of MR rows and NR columns, of which the
/// first `R` and 16·`H` are used), plus C if `add`. Why the sizes: thin
/// layers (19–61 output channels in a 1/5 student) spent up to a third of
/// a 12-row panel's products on padding rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline(never)] // one symbol per size under `perf`
unsafe fn kernel<const R: usize, const H: usize>(pairs: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize, add: bool) {
    assert!(R <= MR && 16 * H <= NR, "bf16 kernel: {R} x {H}");
    assert!(a.len() >= pairs * MR && b.len() >= pairs * NR, "bf16 kernel: panel too short");
    let (a, b) = (a.as_ptr(), b.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); H]; R];
    // Raw pointers in the loop: with slices the sums did not all stay in
    // registers (1.3x slower on ResNet-50's forward).
    for q in 0..pairs {
        let bq = b.add(q * NR);
        let mut bh: [__m512bh; H] = [std::mem::zeroed(); H];
        for (h, v) in bh.iter_mut().enumerate() {
            *v = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bq.add(16 * h) as *const _));
        }
        let aq = a.add(q * MR);
        for (i, sums) in acc.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*aq.add(i) as i32));
            for (s, &v) in sums.iter_mut().zip(&bh) {
                *s = _mm512_dpbf16_ps(*s, ai, v);
            }
        }
    }
    for (i, sums) in acc.iter().enumerate() {
        let p = c.add(i * ldc);
        for (h, &s) in sums.iter().enumerate() {
            let v = if add { _mm512_add_ps(_mm512_loadu_ps(p.add(16 * h)), s) } else { s };
            _mm512_storeu_ps(p.add(16 * h), v);
        }
    }
}

/// `kernel` for the first `rows` rows and `cols` columns (rounded up to
/// 16) of the panels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_for(rows: usize, cols: usize, pairs: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize, add: bool) {
    macro_rules! by_rows {
        ($h:literal) => {
            match rows {
                1 => kernel::<1, $h>(pairs, a, b, c, ldc, add),
                2 => kernel::<2, $h>(pairs, a, b, c, ldc, add),
                3 => kernel::<3, $h>(pairs, a, b, c, ldc, add),
                4 => kernel::<4, $h>(pairs, a, b, c, ldc, add),
                5 => kernel::<5, $h>(pairs, a, b, c, ldc, add),
                6 => kernel::<6, $h>(pairs, a, b, c, ldc, add),
                7 => kernel::<7, $h>(pairs, a, b, c, ldc, add),
                8 => kernel::<8, $h>(pairs, a, b, c, ldc, add),
                9 => kernel::<9, $h>(pairs, a, b, c, ldc, add),
                10 => kernel::<10, $h>(pairs, a, b, c, ldc, add),
                11 => kernel::<11, $h>(pairs, a, b, c, ldc, add),
                12 => kernel::<12, $h>(pairs, a, b, c, ldc, add),
                _ => unreachable!("bf16 kernel: {rows} rows of a panel of {MR}"),
            }
        };
    }
    if cols <= 16 {
        by_rows!(1)
    } else {
        by_rows!(2)
    }
}

/// An A operand packed once for all its k blocks: for a matrix many
/// products read unchanged (a frozen teacher's weights), which then skip
/// its packing (a twelfth of a bf16 teacher's forward, measured).
#[derive(Debug)]
pub struct PackedA {
    m: usize,
    k: usize,
    blocks: Vec<Vec<u32>>,
}

impl PackedA {
    /// # Panics
    /// If `available()` does not hold or `a` does not hold an m×k matrix.
    pub(super) fn new(m: usize, k: usize, a: Strided) -> PackedA {
        assert!(available() && a.holds(m, k), "bf16 pack: no AVX512-BF16, or the operand is too short");
        let blocks = (0..k)
            .step_by(KC)
            .map(|k0| {
                let mut out = Vec::new();
                pack_a_block(m, a, k0, (k - k0).min(KC), &mut out);
                out
            })
            .collect();
        PackedA { m, k, blocks }
    }
}

/// The MR-row panels of A for k in [k0, k0 + kc), into `out`.
fn pack_a_block(m: usize, a: Strided, k0: usize, kc: usize, out: &mut Vec<u32>) {
    let (pairs, panels) = (kc.div_ceil(2), m.div_ceil(MR));
    out.resize(panels * pairs * MR, 0);
    for pi in 0..panels {
        let rows = Panel { data: &a.data[pi * MR * a.rs..], ls: a.rs, ks: a.cs, live: (m - pi * MR).min(MR), k0, kc };
        rows.pack(MR, 1, &mut out[pi * pairs * MR..]);
    }
}

/// The A operand of a product: a matrix, or one packed beforehand.
#[derive(Clone, Copy)]
pub(super) enum A<'a> {
    Matrix(Strided<'a>),
    Packed(&'a PackedA),
}

/// A B operand made block by block as the product packs it, never stored
/// whole: an im2col matrix. Why: stored whole (tens of MB for a 3x3 conv at
/// 56×56), it went to memory and came back to be packed; a block made just
/// before its packing is read from the cache.
pub(super) trait Blocks: Sync {
    /// Writes rows `[k0, k0 + kc)` × columns `[j0, j0 + nc)` of the matrix
    /// into `out`, row after row (`nc` values each). Runs inside `gemm` on
    /// this thread's packing buffers: it must not call `gemm` itself.
    fn fill(&self, k0: usize, kc: usize, j0: usize, nc: usize, out: &mut [f32]);
    /// Whether `fill` writes the block transposed instead: column after
    /// column (`kc` values each).
    fn k_contiguous(&self) -> bool {
        false
    }
}

/// The B operand of a product: a matrix, or one made by blocks.
#[derive(Clone, Copy)]
pub(super) enum B<'a> {
    Matrix(Strided<'a>),
    Blocks(&'a dyn Blocks),
}

/// C = A·B + beta·C for an m×n output with row stride `rsc`, with bf16
/// operands and f32 sums.
///
/// # Safety
/// `available()` holds; no other thread touches those m rows of n values
/// of `c` during the call; a packed A is m×k.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm(m: usize, k: usize, n: usize, a: A, b: B, c: Out, rsc: usize, beta: f32) {
    if let A::Packed(p) = a {
        assert!((p.m, p.k) == (m, k), "bf16 gemm: the packed A is {}x{}, not {m}x{k}", p.m, p.k);
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 products need x86_64");
    #[cfg(target_arch = "x86_64")]
    PACKED.with(|packed| {
        let (pa, pb, block) = &mut *packed.borrow_mut();
        if k == 0 {
            // No terms: C = beta·C.
            for i in 0..m {
                c.slice(i * rsc, n).iter_mut().for_each(|v| *v = if beta == 0.0 { 0.0 } else { beta * *v });
            }
            return;
        }
        let mut tile = [0f32; MR * NR];
        for k0 in (0..k).step_by(KC) {
            let kc = (k - k0).min(KC);
            let pairs = kc.div_ceil(2);
            let panels = m.div_ceil(MR);
            let pa: &[u32] = match a {
                A::Matrix(a) => {
                    pack_a_block(m, a, k0, kc, pa);
                    pa
                }
                A::Packed(p) => &p.blocks[k0 / KC],
            };
            // The first block writes C (+ beta·C), the others add to it.
            let first = k0 == 0;
            let nc = if let B::Blocks(_) = b { NC_BLOCKS } else { NC };
            for j0 in (0..n).step_by(nc) {
                let live = (n - j0).min(nc);
                let strips = live.div_ceil(NR);
                pb.resize(strips * pairs * NR, 0);
                match b {
                    B::Matrix(b) => Panel { data: &b.data[j0 * b.cs..], ls: b.cs, ks: b.rs, live, k0, kc }.pack(NR, strips, pb),
                    B::Blocks(blocks) => {
                        block.resize(kc * live, 0.0);
                        blocks.fill(k0, kc, j0, live, block);
                        let (ls, ks) = if blocks.k_contiguous() { (kc, 1) } else { (1, live) };
                        Panel { data: block, ls, ks, live, k0: 0, kc }.pack(NR, strips, pb)
                    }
                }
                for s in 0..strips {
                    // Strips of this block only (`live` columns from j0).
                    let (j, width) = (j0 + s * NR, (live - s * NR).min(NR));
                    for pi in 0..panels {
                        let rows = (m - pi * MR).min(MR);
                        let (ap, bp) = (&pa[pi * pairs * MR..], &pb[s * pairs * NR..]);
                        let off = pi * MR * rsc + j;
                        if width % 16 == 0 && (!first || beta == 0.0 || beta == 1.0) {
                            let out = c.slice(off, (rows - 1) * rsc + width);
                            kernel_for(rows, width, pairs, ap, bp, out.as_mut_ptr(), rsc, !first || beta == 1.0);
                        } else {
                            kernel_for(rows, width, pairs, ap, bp, tile.as_mut_ptr(), NR, false);
                            let out = c.slice(off, (rows - 1) * rsc + width);
                            for r in 0..rows {
                                for (q, t) in tile[r * NR..r * NR + width].iter().enumerate() {
                                    let d = &mut out[r * rsc + q];
                                    *d = if !first {
                                        *d + t
                                    } else if beta == 0.0 {
                                        *t
                                    } else {
                                        t + beta * *d
                                    };
                                }
                            }
                        }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// C = op(A)·op(B) + beta·C in f64, and the sum of |terms| per element.
    #[allow(clippy::too_many_arguments)]
    fn reference(m: usize, k: usize, n: usize, a: &[f32], at: bool, b: &[f32], bt: bool, c: &[f32], beta: f32) -> (Vec<f64>, Vec<f64>) {
        let (mut out, mut mag) = (vec![0.0; m * n], vec![0.0; m * n]);
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut t) = (beta as f64 * c[i * n + j] as f64, (beta as f64 * c[i * n + j] as f64).abs());
                for p in 0..k {
                    let x = if at { a[p * m + i] } else { a[i * k + p] } as f64 * if bt { b[j * k + p] } else { b[p * n + j] } as f64;
                    (s, t) = (s + x, t + x.abs());
                }
                (out[i * n + j], mag[i * n + j]) = (s, t);
            }
        }
        (out, mag)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(m: usize, k: usize, n: usize, a: &[f32], at: bool, b: &[f32], bt: bool, c: &mut [f32], beta: f32) {
        let a = Strided::new(a, if at { (1, m) } else { (k, 1) });
        let b = Strided::new(b, if bt { (1, k) } else { (n, 1) });
        // SAFETY: checked `available()`; `c` is an exclusive borrow.
        unsafe { gemm(m, k, n, A::Matrix(a), B::Matrix(b), Out::new(c), n, beta) }
    }

    /// `c` equals the exact sums `want` to f32 rounding: at most k + 2
    /// roundings of 2^-24 of the terms' magnitude `mag` each.
    fn assert_sums(c: &[f32], want: &[f64], mag: &[f64], k: usize, what: &str) {
        for (ix, ((&got, &want), &mag)) in c.iter().zip(want).zip(mag).enumerate() {
            assert!((got as f64 - want).abs() <= (k as f64 + 2.0) * 6e-8 * mag, "{what}: [{ix}] {got} vs {want}");
        }
    }

    /// Every edge of the blocking (rows around MR, columns around NR and
    /// NC, k odd and around KC), both layouts of each operand (the two
    /// packing paths), beta 0 and 1: with bf16 inputs each product is
    /// exact, so the result is the f64 sum to f32 rounding.
    #[test]
    fn bf16_products_equal_the_sums_on_bf16_inputs() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        let mut rng = Rng::new(5);
        let bf = |v: f32| f32::from_bits(to_bf16(v) << 16);
        for (m, k, n) in [(1, 1, 1), (11, 3, 31), (12, 2, 32), (13, 513, 33), (25, 1030, 7), (5, 512, 545), (24, 17, 1100)] {
            for (at, bt, beta) in [(false, false, 0.0), (true, false, 1.0), (false, true, 1.0), (true, true, 0.0), (false, false, 0.5)] {
                let mut random = |len: usize| (0..len).map(|_| bf(rng.normal())).collect::<Vec<f32>>();
                let (a, b, c0) = (random(m * k), random(k * n), random(m * n));
                let (want, mag) = reference(m, k, n, &a, at, &b, bt, &c0, beta);
                let mut c = c0.clone();
                run(m, k, n, &a, at, &b, bt, &mut c, beta);
                assert_sums(&c, &want, &mag, k, &format!("{m}x{k}x{n} at {at} bt {bt} beta {beta}"));
            }
        }
    }

    /// A dense k×n matrix served by blocks, either layout.
    struct Dense<'a> {
        b: &'a [f32],
        n: usize,
        t: bool,
    }

    impl Blocks for Dense<'_> {
        fn fill(&self, k0: usize, kc: usize, j0: usize, nc: usize, out: &mut [f32]) {
            for k in k0..k0 + kc {
                for j in j0..j0 + nc {
                    let at = if self.t { (j - j0) * kc + (k - k0) } else { (k - k0) * nc + (j - j0) };
                    out[at] = self.b[k * self.n + j];
                }
            }
        }
        fn k_contiguous(&self) -> bool {
            self.t
        }
    }

    /// A B operand made by blocks (40 columns in tests: blocks ending inside
    /// a strip of 32) gives the sums, both layouts, beta 0, 1 and 0.5 (each C
    /// value scaled once), strips of 16 columns stored directly (n = 48).
    #[test]
    fn bf16_products_of_an_operand_made_by_blocks() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        let mut rng = Rng::new(11);
        let bf = |v: f32| f32::from_bits(to_bf16(v) << 16);
        for (m, k, n) in [(13, 515, 100), (12, 7, 48), (5, 30, 40)] {
            for (t, beta) in [(false, 0.0), (true, 1.0), (false, 0.5), (true, 0.5)] {
                let mut random = |len: usize| (0..len).map(|_| bf(rng.normal())).collect::<Vec<f32>>();
                let (a, b, c0) = (random(m * k), random(k * n), random(m * n));
                let (want, mag) = reference(m, k, n, &a, false, &b, false, &c0, beta);
                let mut c = c0.clone();
                let blocks = Dense { b: &b, n, t };
                // SAFETY: checked `available()`; `c` is an exclusive borrow.
                unsafe { gemm(m, k, n, A::Matrix(Strided::new(&a, (k, 1))), B::Blocks(&blocks), Out::new(&mut c), n, beta) };
                assert_sums(&c, &want, &mag, k, &format!("{m}x{k}x{n} by blocks, transposed {t}, beta {beta}"));
            }
        }
    }

    /// Operands with no unit stride take the scalar packing: A's values
    /// every other slot, B's rows and columns both strided.
    #[test]
    fn bf16_products_of_operands_without_a_unit_stride() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        let mut rng = Rng::new(7);
        let bf = |v: f32| f32::from_bits(to_bf16(v) << 16);
        let (m, k, n) = (14, 9, 35);
        let mut random = |len: usize| (0..len).map(|_| bf(rng.normal())).collect::<Vec<f32>>();
        let (a2, b3) = (random(2 * m * k), random(3 * k * n));
        let a: Vec<f32> = a2.iter().step_by(2).copied().collect();
        let b: Vec<f32> = (0..k * n).map(|ix| b3[3 * (ix / n) * n + 3 * (ix % n)]).collect();
        let (want, mag) = reference(m, k, n, &a, false, &b, false, &vec![0.0; m * n], 0.0);
        let mut c = vec![f32::NAN; m * n];
        let (sa, sb) = (Strided::new(&a2, (2 * k, 2)), Strided::new(&b3, (3 * n, 3)));
        // SAFETY: checked `available()`; `c` is an exclusive borrow.
        unsafe { gemm(m, k, n, A::Matrix(sa), B::Matrix(sb), Out::new(&mut c), n, 0.0) };
        assert_sums(&c, &want, &mag, k, "strided operands");
    }

    /// On values that are not bf16 numbers the error stays within the
    /// two roundings of each term: |C - exact| ≤ 2^-8 · Σ|terms|.
    #[test]
    fn bf16_products_err_by_at_most_two_roundings_per_term() {
        if !available() {
            eprintln!("skipped: no AVX512-BF16 on this CPU");
            return;
        }
        let mut rng = Rng::new(9);
        let (m, k, n) = (20, 300, 70);
        let mut random = |len: usize| (0..len).map(|_| rng.normal()).collect::<Vec<f32>>();
        let (a, b) = (random(m * k), random(k * n));
        let (want, mag) = reference(m, k, n, &a, false, &b, false, &vec![0.0; m * n], 0.0);
        let mut c = vec![f32::NAN; m * n];
        run(m, k, n, &a, false, &b, false, &mut c, 0.0);
        let worst = c.iter().zip(&want).zip(&mag).map(|((&g, &w), &t)| (g as f64 - w).abs() / t).fold(0.0, f64::max);
        assert!(worst <= 1.0 / 256.0, "error {worst} of the terms' magnitude");
        // And bf16 is not f32: some element differs from the exact sum by more than f32 would.
        assert!(worst > 1e-5, "error {worst}: the operands were not rounded to bf16");
    }
}
