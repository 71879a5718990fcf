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
//! half tiny, and its features feed everything after it. `include` it by
//! name, or `stem: true` (any exporter's names; with `min_resolution` at the
//! stem's output height, e.g. 112 for a 224-px ResNet, the stem alone). On
//! the factorized task student the stem at rank 8, `layout: grouped`, cost
//! nothing in accuracy and 84 M MACs less (docs/RESULTS.md, session 22);
//! `split` writes 8 branches of 64 channels at 112 px, slower in tract.
//! `min_resolution`/`max_resolution` keep only convs whose output height lies
//! in that range (a budget per stage, whatever the names).
//!
//! With `calibration` (see `src/refit/mod.rs`), layers are factorized one at a
//! time in topological order on the compressed model's own activations: the
//! depthwise filters come from the SVD, the pointwise weights and bias from a
//! ridge least-squares fit of the original conv's outputs. `alternate: n`
//! (default 2) then runs n rounds of alternating least squares: the depthwise filters
//! refit with the pointwise weights fixed (the outputs are linear in them;
//! normal matrix (QQᵀ)∘(XᵀX) blockwise, see `alternate_round`), then the
//! pointwise weights and bias refit on the new features; a round is kept
//! only if it lowers the error (skipped above `MAX_ALTERNATE_UNKNOWNS`
//! depthwise weights in one layer). `refit: all` also refits the convs that are
//! not factorized (they see drifted inputs). Measured on ResNet-50 (744
//! evaluation images, README): rank 2 top-1 0.012 data-free, 0.809
//! calibrated, 0.821 with `alternate: 2`; rank 1 0.001 / 0.423 / 0.519.
use super::factorize::{self, Outcome, Selection};
use super::{check_unit, Pass, PassContext, PassReport, Refit};
use crate::error::{Error, Result};
use crate::ir::{Graph, Model, Node, Weight};
use crate::refit::{gram, t_mul, Calibration, Design, Fit, Layer, Rows};
use crate::shape::Shapes;
use ndarray::{Array4, ArrayD};
use petgraph::stable_graph::NodeIndex;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// Options of `dw`; see the module documentation.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DwOptions {
    pub rank: Option<usize>,
    pub energy: Option<f64>,
    pub min_gain: f64,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Only convs whose output is at least / at most this many pixels high.
    pub min_resolution: Option<usize>,
    pub max_resolution: Option<usize>,
    /// Calibrated only: rounds of alternating least squares (depthwise
    /// filters, then pointwise weights) after the first pointwise fit.
    /// Default 2 (ResNet-50 rank 1: top-1 0.423 → 0.519; rank 2 0.809 → 0.821).
    pub alternate: usize,
    /// Calibrated only: `all` also refits every other conv (they see drifted inputs).
    pub refit: Refit,
    /// How a rank r > 1 factorization is written.
    pub layout: DwLayout,
    /// Also factorize the stem (a conv reading a graph input), without naming it.
    pub stem: bool,
}

/// The ONNX form of a rank-r factorization.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DwLayout {
    /// One depthwise conv with channel multiplier r (group C_in, C_in·r outputs), one pointwise conv.
    Grouped,
    /// r depthwise convs (group C_in, C_in outputs) each with its pointwise slice, summed by Adds.
    /// The default: tract runs these with its depthwise kernels (ResNet-50 rank 2, batch 1,
    /// 1 thread: 76.9 ms split vs 93.0 ms grouped; README).
    #[default]
    Split,
}

impl Default for DwOptions {
    fn default() -> Self {
        DwOptions {
            rank: None,
            energy: None,
            min_gain: 0.1,
            include: vec![],
            exclude: vec![],
            min_resolution: None,
            max_resolution: None,
            alternate: 2,
            refit: Refit::Changed,
            layout: DwLayout::Split,
            stem: false,
        }
    }
}

/// The `dw` pass.
pub struct Dw;

impl Pass for Dw {
    const NAME: &'static str = "dw";
    const LOSSY: bool = true;
    type Options = DwOptions;

    fn validate(o: &DwOptions) -> Result<()> {
        check_unit("dw", "energy", o.energy.filter(|&e| e != 1.0))?;
        if o.rank.is_some() && o.energy.is_some() {
            return Err(Error::Config("`dw` takes `rank` or `energy`, not both".into()));
        }
        factorize::check_options("dw", o.rank, o.min_gain, (o.min_resolution, o.max_resolution))
    }

    fn run(model: &mut Model, ctx: &PassContext, options: &DwOptions) -> Result<PassReport> {
        match ctx.calibrated() {
            Some(calibrated) => run_calibrated(model, ctx, calibrated, options),
            None => run_data_free(&mut model.graph, ctx.shapes, options),
        }
    }
}

impl DwOptions {
    fn selection(&self) -> Selection<'_> {
        Selection {
            include: &self.include,
            exclude: &self.exclude,
            min_resolution: self.min_resolution,
            max_resolution: self.max_resolution,
        }
    }
}

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

fn run_data_free(graph: &mut Graph, shapes: &Shapes, opts: &DwOptions) -> Result<PassReport> {
    let mut report = PassReport::default();
    let convs: Vec<NodeIndex> =
        graph.topo_order()?.into_iter().filter(|&ix| graph.node(ix).op() == "Conv" && graph.node(ix).is_standard()).collect();
    for ix in convs {
        let name = graph.node(ix).name().to_string();
        match eligible(graph, shapes, ix, opts) {
            Ok(None) => {}
            Ok(Some(weight)) => match factorize(&weight, opts) {
                Ok(f) => {
                    let what = format!(
                        "rank {} (energy {:.4}), params {} -> {}",
                        f.rank,
                        f.energy,
                        weight.len(),
                        f.depthwise.len() + f.pointwise.len()
                    );
                    replace(graph, ix, f, opts.layout == DwLayout::Split)?;
                    report.change(&name, what);
                }
                Err(reason) => report.decline(&name, reason),
            },
            Err(reason) => report.decline(&name, reason),
        }
    }
    Ok(report)
}

/// With calibration, layer by layer in topological order on the compressed
/// model's own activations: the depthwise filters come from the SVD above,
/// then the pointwise weights and bias are a ridge least-squares fit of the
/// conv's outputs. (Measured on ResNet-50 rank 2: weighting the per-channel
/// SVD by the input patches' covariance gave lower top-1, 0.763 vs 0.804.)
fn run_calibrated(model: &mut Model, ctx: &PassContext, calibrated: (&Calibration, &Model), opts: &DwOptions) -> Result<PassReport> {
    let shapes = ctx.shapes;
    let mut report = PassReport::default();
    let graph = &model.graph;
    let mut layers = Vec::new();
    let mut factorized = std::collections::HashSet::new();
    for ix in graph.topo_order()? {
        if graph.node(ix).op() != "Conv" || !graph.node(ix).is_standard() {
            continue;
        }
        match eligible(graph, shapes, ix, opts) {
            Ok(Some(_)) => {
                factorized.insert(ix);
                layers.push(Layer { node: ix, kept: None });
            }
            Ok(None) if opts.refit == Refit::All => layers.push(Layer { node: ix, kept: None }),
            Ok(None) => {}
            Err(reason) => {
                report.decline(graph.node(ix).name(), reason);
                if opts.refit == Refit::All {
                    layers.push(Layer { node: ix, kept: None });
                }
            }
        }
    }
    let calib = calibrated.0;
    factorize::on_data(model, calibrated, &layers, &mut report, ctx.progress, |g, layer, x, y| {
        let fit = Fit::for_layer(calib, g, layer.node);
        if factorized.contains(&layer.node) {
            return factorize_on_data(g, layer.node, x, y, opts, fit);
        }
        // `refit: all`: a conv refit as it is.
        let (before, after) = crate::refit::solve_layer(g, layer.node, x, y, fit)?;
        Ok(Outcome::Done { name: g.node(layer.node).name().to_string(), what: format!("refit: relative error {before:.4} -> {after:.4}") })
    })?;
    Ok(report)
}

/// Factorizes conv `ix` using its sampled input patches `x` and reference outputs `y`.
fn factorize_on_data(graph: &mut Graph, ix: NodeIndex, x: &[f32], y: &[f32], opts: &DwOptions, fit: Fit) -> Result<Outcome> {
    let name = graph.node(ix).name().to_string();
    let w = graph.constant_f32(graph.node(ix).input(1).unwrap_or("")).cloned().ok_or_else(|| Error::invalid("weight vanished"))?;
    let (c_out, c_in, kh, kw) = (w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]);
    let kk = kh * kw;
    let n = x.len() / (c_in * kk);
    let parts: Vec<ChannelSvd> = (0..c_in).into_par_iter().map(|i| channel_svd(&w, i)).collect();
    let (rank, _) = choose_rank(&parts, c_out.min(kk), opts);
    if let Some(reason) = factorize::too_small(rank, gain(c_out, c_in, kk, rank), opts.min_gain) {
        return Ok(Outcome::Declined { name, reason });
    }
    if parts.iter().any(|s| s.sigma2.iter().any(|v| !v.is_finite())) {
        return Err(Error::Pass { pass: "dw".into(), reason: format!("`{name}`: weight or activations hold NaN or infinity") });
    }
    // Depthwise filters d_ij = row j of V_iᵀ, and the features z = d_ij · p_i.
    let depthwise =
        ndarray::Array4::from_shape_fn((c_in * rank, 1, kh, kw), |(dd, _, a, b)| parts[dd / rank].vt[dd % rank][a * kw + b] as f32);
    let dflat = depthwise.as_slice().expect("standard layout");
    let zd = c_in * rank;
    let z: Vec<f32> = (0..n)
        .into_par_iter()
        .flat_map_iter(|r| {
            let row = &x[r * c_in * kk..(r + 1) * c_in * kk];
            (0..zd).map(move |dd| {
                let i = dd / rank;
                (0..kk).map(|k| dflat[dd * kk + k] * row[i * kk + k]).sum::<f32>()
            })
        })
        .collect();
    let ya = faer::Mat::<f64>::from_fn(n, c_out, |r, c| y[r * c_out + c] as f64);
    let bias = graph.bias_or_zeros(ix, c_out);
    let init = faer::Mat::<f64>::from_fn(zd + 1, c_out, |r, o| if r == zd { bias[o] as f64 } else { parts[r / rank].us[r % rank][o] });
    let before_err = fit.error(&Rows::with_ones(&z, n, zd), &init, &ya);
    let mut sol = fit.solve(&Rows::with_ones(&z, n, zd), &ya).unwrap_or(init);
    let mut after_err = fit.error(&Rows::with_ones(&z, n, zd), &sol, &ya);
    let (mut depthwise, mut z) = (depthwise, z);
    if opts.alternate > 0 && c_in * rank * kk <= MAX_ALTERNATE_UNKNOWNS {
        let patches = PatchStats::new(x, n, c_in * kk);
        for _ in 0..opts.alternate {
            let target =
                if fit.relu { Cow::Owned(crate::refit::relu_target(&Rows::with_ones(&z, n, zd), &sol, &ya)) } else { Cow::Borrowed(&ya) };
            let Some(round) = alternate_round(&patches, &sol, rank, (kh, kw), fit, &ya, &target).filter(|r| r.err < after_err) else {
                break;
            };
            (depthwise, sol, after_err, z) = (round.depthwise, round.sol, round.err, round.z);
        }
    }
    if !after_err.is_finite() || !before_err.is_finite() {
        return Err(Error::Pass { pass: "dw".into(), reason: format!("`{name}`: non-finite values in the calibrated factorization") });
    }
    let pointwise = ndarray::Array4::from_shape_fn((c_out, zd, 1, 1), |(o, dd, _, _)| sol[(dd, o)] as f32);
    let pw = replace(graph, ix, Factorization { rank, energy: f64::NAN, depthwise, pointwise }, opts.layout == DwLayout::Split)?;
    graph.set_bias(pw, (0..c_out).map(|o| sol[(zd, o)] as f32).collect());
    Ok(Outcome::Done {
        name: format!("{name} (rank {rank})"),
        what: format!("factorized on data: relative error {before_err:.4} -> {after_err:.4}"),
    })
}

/// Largest depthwise refit (C_in·r·K² unknowns) `alternate` attempts: its
/// normal matrix is dense, so time grows with the cube and memory with the
/// square (16,384 unknowns: 2 GB, ~1 min per round here). Larger layers
/// (high ranks on wide layers, e.g. `energy: 0.9` on ResNet-50's last
/// stage) keep the SVD filters and the pointwise refit.
const MAX_ALTERNATE_UNKNOWNS: usize = 16_384;

/// The calibration patches of one layer, as the depthwise refit needs them.
struct PatchStats<'a> {
    /// X (N × C_in·K²), the f32 rows as sampled.
    x: Rows<'a>,
    /// XᵀX (C_in·K² square).
    gram: faer::Mat<f64>,
}

impl PatchStats<'_> {
    fn new(x: &[f32], n: usize, d: usize) -> PatchStats<'_> {
        let x = Rows::new(x, n, d);
        let gram = gram(&x);
        PatchStats { x, gram }
    }
}

/// The outcome of one alternating round.
struct Round {
    depthwise: Array4<f32>,
    sol: faer::Mat<f64>,
    err: f64,
    /// The new features Z (N × C_in·r, row-major).
    z: Vec<f32>,
}

/// One round of alternating least squares: the depthwise filters refit
/// with the pointwise weights fixed, then the pointwise weights and bias
/// refit on the new features. The outputs are linear in the depthwise
/// filters d (one K² filter per feature j of channel i(j)):
/// y − b = Qᵀ z, z_j = d_jᵀ p_i(j), so the normal matrix is
/// G[(j,k),(j',k')] = (Q Qᵀ)[j,j'] · (XᵀX)[(i(j),k),(i(j'),k')]
/// and the right side r[(j,k)] = Σ_o Q[j,o] (Xᵀ(T − b))[(i(j),k),o], with
/// T the targets (Y, or its ReLU-aware stand-in).
fn alternate_round(
    p: &PatchStats,
    sol: &faer::Mat<f64>,
    rank: usize,
    (kh, kw): (usize, usize),
    fit: Fit,
    ya: &faer::Mat<f64>,
    target: &faer::Mat<f64>,
) -> Option<Round> {
    use faer::prelude::*;
    let (zd, kk) = (sol.nrows() - 1, kh * kw);
    let n = p.x.nrows();
    let q = sol.subrows(0, zd);
    let m = q * q.transpose();
    let centred = faer::Mat::<f64>::from_fn(n, ya.ncols(), |r, o| target[(r, o)] - sol[(zd, o)]);
    let xr = t_mul(&p.x, centred.as_ref());
    let dim = zd * kk;
    let ch = |j: usize| j / rank;
    let mut g = faer::Mat::<f64>::from_fn(dim, dim, |a, b| {
        let (j, k, j2, k2) = (a / kk, a % kk, b / kk, b % kk);
        m[(j, j2)] * p.gram[(ch(j) * kk + k, ch(j2) * kk + k2)]
    });
    let mut rhs = faer::Mat::<f64>::from_fn(dim, 1, |a, _| {
        let (j, k) = (a / kk, a % kk);
        (0..q.ncols()).map(|o| q[(j, o)] * xr[(ch(j) * kk + k, o)]).sum()
    });
    crate::refit::add_ridge(&mut g, dim, fit.ridge);
    g.llt(faer::Side::Lower).ok()?.solve_in_place(rhs.as_mut());
    let filters: Vec<f64> = (0..dim).map(|a| rhs[(a, 0)]).collect();
    let z: Vec<f32> = (0..n)
        .into_par_iter()
        .flat_map_iter(|r| {
            let (row, filters) = (p.x.row(r), &filters);
            (0..zd).map(move |j| (0..kk).map(|k| filters[j * kk + k] * row[ch(j) * kk + k] as f64).sum::<f64>() as f32)
        })
        .collect();
    let za = Rows::with_ones(&z, n, zd);
    let new_sol = fit.solve(&za, ya)?;
    let err = fit.error(&za, &new_sol, ya);
    let depthwise = Array4::from_shape_fn((zd, 1, kh, kw), |(j, _, a, b)| filters[j * kk + a * kw + b] as f32);
    Some(Round { depthwise, sol: new_sol, err, z })
}

/// SVD of a C_out × K² matrix M through the K² × K² matrix MᵀM = VΣ²Vᵀ:
/// the right singular vectors are its eigenvectors and UΣ = M·V. K² is at
/// most 49, so this is several times faster than a thin SVD of M, and
/// M = (M·V)·Vᵀ stays exact for the full rank (V is orthogonal).
fn svd_of(m: &faer::Mat<f64>) -> ChannelSvd {
    let (rows, cols) = (m.nrows(), m.ncols());
    let k = rows.min(cols);
    let Some((sigma2, v)) = factorize::eigen_desc(&(m.transpose() * m)) else {
        return ChannelSvd { us: vec![vec![f64::NAN; rows]; k], vt: vec![vec![0.0; cols]; k], sigma2: vec![f64::NAN; k] };
    };
    let mv = m * &v;
    ChannelSvd {
        us: (0..k).map(|j| (0..rows).map(|o| mv[(o, j)]).collect()).collect(),
        vt: (0..k).map(|j| (0..cols).map(|p| v[(p, j)]).collect()).collect(),
        sigma2: sigma2[..k].to_vec(),
    }
}

/// The conv's weight if the pass should try it; None to skip silently
/// (1x1 convs, excluded names); Err to decline with a reason.
fn eligible(graph: &Graph, shapes: &Shapes, ix: NodeIndex, opts: &DwOptions) -> std::result::Result<Option<ArrayD<f32>>, String> {
    let Some((w, included)) = opts.selection().weight(graph, shapes, ix)? else { return Ok(None) };
    if w.ndim() != 4 || w.shape()[2] * w.shape()[3] <= 1 {
        return Ok(None);
    }
    if graph.node(ix).attr_int("group").unwrap_or(1) != 1 {
        return Err("grouped conv".into());
    }
    if factorize::skips_stem(graph, ix, included || opts.stem) {
        return Ok(None);
    }
    factorize::shared_weight(graph, ix)?;
    Ok(Some(w.clone()))
}

fn channel_svd(w: &ArrayD<f32>, i: usize) -> ChannelSvd {
    let (c_out, c_in, kk) = (w.shape()[0], w.shape()[1], w.shape()[2] * w.shape()[3]);
    let w = w.as_standard_layout();
    let flat = w.as_slice().expect("standard layout");
    svd_of(&faer::Mat::<f64>::from_fn(c_out, kk, |o, k| flat[(o * c_in + i) * kk + k] as f64))
}

/// The rank for `opts` (default `energy: 0.95`), and the energy it keeps.
fn choose_rank(svds: &[ChannelSvd], max_rank: usize, opts: &DwOptions) -> (usize, f64) {
    let total: f64 = svds.iter().flat_map(|s| &s.sigma2).sum();
    let kept = |r: usize| svds.iter().map(|s| s.sigma2.iter().take(r).sum::<f64>()).sum::<f64>() / total.max(f64::MIN_POSITIVE);
    let rank = match opts.rank {
        Some(r) => r.min(max_rank),
        None => factorize::rank_for_energy(kept, max_rank, opts.energy.unwrap_or(0.95)),
    };
    (rank, if total > 0.0 { kept(rank) } else { 1.0 })
}

/// Share of a layer's weights (= of its MACs) that factorizing at `rank` saves.
fn gain(c_out: usize, c_in: usize, kk: usize, rank: usize) -> f64 {
    factorize::gain(c_out * c_in * kk, c_in * rank * kk + c_out * c_in * rank)
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
    let gain = gain(c_out, c_in, kh * kw, rank);
    if let Some(reason) = factorize::too_small(rank, gain, opts.min_gain) {
        return Err(reason);
    }
    let depthwise = Array4::from_shape_fn((c_in * rank, 1, kh, kw), |(d, _, y, x)| svds[d / rank].vt[d % rank][y * kw + x] as f32);
    let pointwise = Array4::from_shape_fn((c_out, c_in * rank, 1, 1), |(o, d, _, _)| svds[d / rank].us[d % rank][o] as f32);
    Ok(Factorization { rank, energy, depthwise, pointwise })
}

/// Replaces conv `ix` by the depthwise + pointwise pair; returns the
/// pointwise node that carries the bias. With `split` and rank r > 1, the
/// pair becomes r branches (depthwise with one filter per channel, then its
/// pointwise slice) summed by Adds: tract runs only group == C_in == C_out
/// convs with its depthwise kernels, so a channel multiplier r > 1 falls to
/// its generic grouped path (README, issue #6).
fn replace(graph: &mut Graph, ix: NodeIndex, f: Factorization, split: bool) -> Result<NodeIndex> {
    let conv = graph.node(ix).clone();
    let name = conv.name().to_string();
    let parts = if split && f.rank > 1 { split_parts(&f) } else { vec![(f.depthwise, f.pointwise)] };
    let last = parts.len() - 1;
    let mut branch_outputs = Vec::new();
    let mut nodes = Vec::new();
    for (j, (depthwise, pointwise)) in parts.into_iter().enumerate() {
        let tag = if last == 0 { String::new() } else { j.to_string() };
        let (dw_name, pw_name) = (graph.fresh_name(&format!("{name}_dw{tag}")), graph.fresh_name(&format!("{name}_pw{tag}")));
        let mid = graph.fresh_name(&format!("{name}_dw{tag}_out"));
        let (dw_w, pw_w) = (graph.fresh_name(&format!("{name}_dw{tag}.weight")), graph.fresh_name(&format!("{name}_pw{tag}.weight")));
        let out = if last == 0 { conv.outputs()[0].clone() } else { graph.fresh_name(&format!("{name}_pw{tag}_out")) };
        let (kh, kw) = (depthwise.shape()[2], depthwise.shape()[3]);
        // Grouped: C_in·r filters over C_in groups; split: C_in filters over C_in groups.
        let group = depthwise.shape()[0] / if last == 0 { f.rank.max(1) } else { 1 };
        graph.insert_weight(dw_w.clone(), Weight::from_f32(&dw_w, depthwise.into_dyn()))?;
        graph.insert_weight(pw_w.clone(), Weight::from_f32(&pw_w, pointwise.into_dyn()))?;
        let mut dw = conv.clone();
        dw.proto.name = Some(dw_name);
        dw.proto.input = vec![conv.inputs()[0].clone(), dw_w];
        dw.proto.output = vec![mid.clone()];
        dw.set_attr_int("group", group as i64);
        dw.set_attr_ints("kernel_shape", &[kh as i64, kw as i64]);
        let mut pw = Node::new("Conv", &pw_name, &[&mid, &pw_w], &[out.as_str()]);
        if let (Some(b), true) = (conv.input(2), j == last) {
            pw.proto.input.push(b.to_string());
        }
        pw.set_attr_ints("kernel_shape", &[1, 1]);
        nodes.extend([dw, pw]);
        branch_outputs.push(out);
    }
    // The pointwise conv of the last branch carries the bias.
    let bias_node = *graph.replace_node(ix, nodes)?.last().ok_or_else(|| Error::invalid("a factorization without branches"))?;
    add_branches(graph, &name, &branch_outputs, &conv.outputs()[0])?;
    Ok(bias_node)
}

/// The rank-r factorization as r (depthwise [C_in,1,K,K], pointwise [C_out,C_in,1,1]) pairs.
fn split_parts(f: &Factorization) -> Vec<(Array4<f32>, Array4<f32>)> {
    let r = f.rank;
    let c_in = f.depthwise.shape()[0] / r;
    let (c_out, kh, kw) = (f.pointwise.shape()[0], f.depthwise.shape()[2], f.depthwise.shape()[3]);
    (0..r)
        .map(|j| {
            let d = Array4::from_shape_fn((c_in, 1, kh, kw), |(i, _, a, b)| f.depthwise[[i * r + j, 0, a, b]]);
            let p = Array4::from_shape_fn((c_out, c_in, 1, 1), |(o, i, _, _)| f.pointwise[[o, i * r + j, 0, 0]]);
            (d, p)
        })
        .collect()
}

/// Sums the branch outputs into `output` with a chain of Adds.
fn add_branches(graph: &mut Graph, name: &str, branches: &[String], output: &str) -> Result<()> {
    let Some(first) = branches.first() else { return Ok(()) };
    let mut acc = first.clone();
    for (j, b) in branches.iter().enumerate().skip(1) {
        let out = if j == branches.len() - 1 { output.to_string() } else { graph.fresh_name(&format!("{name}_sum{j}")) };
        graph.add_node(Node::new("Add", &graph.fresh_name(&format!("{name}_sum{j}")), &[&acc, b], &[out.as_str()]))?;
        acc = out;
    }
    Ok(())
}
