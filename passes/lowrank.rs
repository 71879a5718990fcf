//! Pass `lowrank`: low-rank factorization of 1x1 convolutions and of Gemm
//! (fully connected) layers — the layers `dw` leaves alone. ResNet-50's
//! 1x1 convs and classifier hold 14.2 M of its 25.6 M weights; once `dw`
//! has shrunk the 3x3 convs, they are what stands between the model and
//! the CResNet budget (1/5 of the weights).
//!
//! Before:  X (C_in) → Conv W [C_out, C_in, 1, 1], bias b → Y
//! After:   X → Conv A [r, C_in, 1, 1] (same strides, pads; no bias)
//!            → Conv B [C_out, r, 1, 1], bias b → Y
//! Gemm (alpha = beta = 1, transA = 0; either transB) likewise becomes two
//! Gemms with transB = 1: [r, C_in] with a zero bias, then [C_out, r] with C.
//!
//! Data-free: truncated SVD, W ≈ (U_r Σ_r)·V_rᵀ = B·A, from the eigenvectors
//! of the smaller of WᵀW and WWᵀ; exact at full rank. One r per layer:
//! `rank: r`, `ratio: f` (the largest r keeping at most a share f of the
//! layer's weights, r·(C_in + C_out) ≤ f·C_in·C_out), or `energy: e` (the
//! smallest r whose squared singular values reach a share e), or
//! `target_params: t` (one e for all layers, the largest that keeps the
//! graph within a share t of its weights; see `plan_for_target`). Default:
//! `ratio: 0.5`. Declines when r would not save `min_gain` (default 0.1) of
//! the layer's weights (= its MACs). `include`/`exclude` take name patterns
//! as in `dw`; convs reading a graph input are skipped unless included,
//! and so is a task model's classifier (the layer writing a graph output,
//! at most 100 outputs: a rank below its class count would put the logits
//! on fewer dimensions).
//! `min_resolution`/`max_resolution` as in `dw` (a Gemm's output counts as 1).
//! Running the pass twice factorizes the factors again.
//!
//! `budget: b` (with `ratio`) makes a pipeline meet a promise whatever the
//! layout of the model: the model must keep at most a share b of the
//! weights the pipeline started with once this pass and the lossy passes
//! after it have run (`distill` excluded). The pipeline tries the rest of
//! itself data-free on a copy and lowers the ratio — never raises it —
//! by bisection until the promise holds, and says what it chose; it fails,
//! naming the pass, if not even ratio 0.001 meets it. (torchvision's
//! ResNet-50 puts its strides on the 3x3 convs, so one more 1x1 conv falls
//! in the 28-pixel stage than in the original layout.)
//!
//! With `calibration`, each 1x1 conv is factorized on data, one at a time
//! in topological order on the compressed model's own activations
//! (`src/refit/mod.rs`): reduced-rank regression — the ridge least-squares
//! map M from the sampled inputs X to the original outputs Y, projected on
//! the top-r principal directions V_r of its centred predictions
//! (A = (M V_r)ᵀ), then B and the bias refit on the features Z = X Aᵀ
//! (through the following ReLU when `calibration.through_relu`).
//! `alternate: n` (default 2) rounds then refit A with B fixed in closed
//! form, Aᵀ = (XᵀX + λ)⁻¹ Xᵀ(T − b) B (BᵀB)⁻¹, and B, b again; a round is
//! kept only if it lowers the error. `energy` is then measured on the
//! predictions' spectrum. Gemm layers stay data-free unless `fit_gemm`
//! (a classifier needs calibration images of all its classes); then, with
//! one sample per image and typically fewer images than inputs, a Gemm
//! takes its principal directions from its present weights' predictions
//! on the data instead of the least-squares map, and only B and the bias
//! are refit.
use super::factorize::{self, eigen_desc, Outcome, Selection};
use super::{check_unit, Pass, PassContext, PassReport};
use crate::error::{Error, Result};
use crate::ir::{Graph, Model, Node, Weight};
use crate::refit::{gram, Design, Fit, Rows};
use crate::shape::Shapes;
use faer::prelude::*;
use faer::{Mat, Side};
use ndarray::{Array2, ArrayD, IxDyn};
use petgraph::stable_graph::NodeIndex;
use serde::{Deserialize, Serialize};

/// Options of `lowrank`; see the module documentation.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LowrankOptions {
    pub rank: Option<usize>,
    /// Kept share of each layer's weights (default 0.5 when no other size option is set).
    pub ratio: Option<f64>,
    pub energy: Option<f64>,
    /// Share of the graph's weights kept after the pass: one energy level for all layers, found by bisection.
    pub target_params: Option<f64>,
    /// With `ratio`: share of the pipeline's starting weights the model may
    /// keep after this and the later lossy passes; the ratio is lowered to fit.
    pub budget: Option<f64>,
    pub min_gain: f64,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Only layers whose output is at least / at most this many pixels high
    /// (a Gemm's output counts as 1): budgets per stage, whatever the names.
    pub min_resolution: Option<usize>,
    pub max_resolution: Option<usize>,
    /// Calibrated only: rounds of alternating refits (A with B fixed, then B).
    pub alternate: usize,
    /// Calibrated only: factorize Gemm layers on data too. Off by default:
    /// a classifier's data-aware factorization needs images of all its
    /// classes; on ResNet-50 with the 1,256 calibration images here (1,000
    /// of them photos of few subjects) it scored top-1 0.333 against 0.367
    /// data-free (README "Where to spend the budget").
    pub fit_gemm: bool,
}

impl Default for LowrankOptions {
    fn default() -> Self {
        LowrankOptions {
            rank: None,
            ratio: None,
            energy: None,
            target_params: None,
            budget: None,
            min_gain: 0.1,
            include: vec![],
            exclude: vec![],
            min_resolution: None,
            max_resolution: None,
            alternate: 2,
            fit_gemm: false,
        }
    }
}

/// The `lowrank` pass.
pub struct Lowrank;

impl Pass for Lowrank {
    const NAME: &'static str = "lowrank";
    const LOSSY: bool = true;
    type Options = LowrankOptions;

    fn validate(o: &LowrankOptions) -> Result<()> {
        check_unit("lowrank", "energy", o.energy.filter(|&e| e != 1.0))?;
        check_unit("lowrank", "ratio", o.ratio)?;
        check_unit("lowrank", "target_params", o.target_params)?;
        check_unit("lowrank", "budget", o.budget)?;
        if o.budget.is_some() && o.ratio.is_none() {
            return Err(Error::Config("`lowrank.budget` adjusts `ratio`: give `ratio` too".into()));
        }
        if [o.rank.is_some(), o.ratio.is_some(), o.energy.is_some(), o.target_params.is_some()].iter().filter(|&&b| b).count() > 1 {
            return Err(Error::Config("`lowrank` takes only one of `rank`, `ratio`, `energy`, `target_params`".into()));
        }
        factorize::check_options("lowrank", o.rank, o.min_gain, (o.min_resolution, o.max_resolution))
    }

    fn run(model: &mut Model, ctx: &PassContext, options: &LowrankOptions) -> Result<PassReport> {
        lowrank(model, ctx, options)
    }
}

/// A layer to factorize: its weight as [C_out, C_in] and what kind it is.
struct Candidate {
    w: Array2<f32>,
    gemm: bool,
}

/// A factorization W ≈ B·A.
pub struct LowRank {
    /// [r, C_in]
    pub a: Array2<f32>,
    /// [C_out, r]
    pub b: Array2<f32>,
    /// Share of the squared singular values kept (data-free) or of the
    /// prediction energy (calibrated).
    pub energy: f64,
}

fn lowrank(model: &mut Model, ctx: &PassContext, opts: &LowrankOptions) -> Result<PassReport> {
    let mut report = PassReport::default();
    let graph = &mut model.graph;
    let mut candidates = Vec::new();
    for ix in graph.topo_order()? {
        match candidate(graph, ctx.shapes, ix, opts) {
            Ok(None) => {}
            Ok(Some(c)) => candidates.push((ix, c)),
            Err(reason) => report.decline(graph.node(ix).name(), reason),
        }
    }
    let ranks = match opts.target_params {
        Some(target) => Some(plan_for_target(graph, ctx, &candidates, target, opts, &mut report)?),
        None => None,
    };
    // The options of one layer: its planned rank, if `target_params` planned one.
    let layer_opts = |ix: NodeIndex| match ranks.as_ref().and_then(|r| r.get(&ix)) {
        Some(&rank) => LowrankOptions { rank: Some(rank), ratio: None, energy: None, target_params: None, ..opts.clone() },
        None => opts.clone(),
    };
    let calibrated = ctx.calibrated().is_some();
    let mut on_data = Vec::new();
    // The weights of the convs factorized on data, as `candidate` read them.
    let mut weights = std::collections::HashMap::new();
    for (ix, c) in candidates {
        if calibrated && (!c.gemm || opts.fit_gemm) {
            if c.gemm {
                as_trans_b(graph, ix, &c.w)?;
            }
            on_data.push(crate::refit::Layer { node: ix, kept: None });
            weights.insert(ix, c.w);
            continue;
        }
        let name = graph.node(ix).name().to_string();
        match factorize(&c.w, &layer_opts(ix)) {
            Ok(f) => {
                let what = format!("rank {} (energy {:.4}), params {} -> {}", f.a.nrows(), f.energy, c.w.len(), f.a.len() + f.b.len());
                replace(graph, ix, &f, None)?;
                report.change(&name, what);
            }
            Err(reason) => report.decline(&name, reason),
        }
    }
    if let (Some(calibrated), false) = (ctx.calibrated(), on_data.is_empty()) {
        let calib = calibrated.0;
        factorize::on_data(model, calibrated, &on_data, &mut report, ctx.progress, |g, layer, x, y| {
            factorize_on_data(g, layer.node, &weights[&layer.node], x, y, &layer_opts(layer.node), Fit::for_layer(calib, g, layer.node))
        })?;
    }
    Ok(report)
}

/// `target_params`: one energy level e for every layer (each keeps the
/// smallest rank whose squared singular values reach a share e of its
/// own), the largest e whose ranks keep the graph within `target` of its
/// present weights (bisection). Equal relative loss per layer, rather than
/// an equal share of weights (`ratio`), lets layers with steep spectra
/// shrink more. Ranks come from the weights, also when calibrating.
fn plan_for_target(
    graph: &Graph,
    ctx: &PassContext,
    candidates: &[(NodeIndex, Candidate)],
    target: f64,
    opts: &LowrankOptions,
    report: &mut PassReport,
) -> Result<std::collections::HashMap<NodeIndex, usize>> {
    use rayon::prelude::*;
    let total = crate::stats::from_shapes(graph, ctx.shapes).params as f64;
    let spectra: Vec<Vec<f64>> = candidates.par_iter().map(|(_, c)| spectrum(&c.w)).collect();
    let rank_at = |e: f64, (c, sigma2): (&Candidate, &Vec<f64>)| {
        let (c_out, c_in) = c.w.dim();
        let (rank, _) = choose_rank(sigma2, c_out, c_in, &LowrankOptions { energy: Some(e), ..Default::default() });
        (too_small(c_out, c_in, rank, opts).is_none()).then_some(rank)
    };
    let cost = |e: f64| {
        candidates.iter().zip(&spectra).fold(total, |acc, ((_, c), s)| {
            let (c_out, c_in) = c.w.dim();
            let bias = if c.gemm { 1 } else { 0 };
            acc - match rank_at(e, (c, s)) {
                Some(r) => (c_out * c_in) as f64 - (r * (c_out + c_in + bias)) as f64,
                None => 0.0,
            }
        })
    };
    let budget = target * total;
    if cost(0.0) > budget {
        return Err(Error::Pass {
            pass: "lowrank".into(),
            reason: format!("`target_params` {target} is out of reach: rank 1 everywhere keeps {:.4} of the weights", cost(0.0) / total),
        });
    }
    let (mut lo, mut hi) = (0.0, 1.0);
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if cost(mid) <= budget {
            lo = mid
        } else {
            hi = mid
        }
    }
    report.change("(plan)", format!("energy {lo:.4} per layer keeps {:.4} of the weights (target {target})", cost(lo) / total));
    Ok(candidates.iter().zip(&spectra).filter_map(|((ix, c), s)| rank_at(lo, (c, s)).map(|r| (*ix, r))).collect())
}

/// Squared singular values of W, largest first.
fn spectrum(w: &Array2<f32>) -> Vec<f64> {
    let (c_out, c_in) = w.dim();
    gram_eigen(w).map_or_else(|| vec![f64::NAN; c_in.min(c_out)], |g| g.sigma2)
}

/// W in f64 and the eigendecomposition of its smaller Gram matrix: WᵀW
/// (eigenvectors V) when C_in ≤ C_out, else WWᵀ (eigenvectors U, `wide`).
struct GramEigen {
    m: Mat<f64>,
    wide: bool,
    sigma2: Vec<f64>,
    vecs: Mat<f64>,
}

fn gram_eigen(w: &Array2<f32>) -> Option<GramEigen> {
    let (c_out, c_in) = w.dim();
    let m = Mat::<f64>::from_fn(c_out, c_in, |o, i| w[[o, i]] as f64);
    let wide = c_in > c_out;
    let gram = if wide { &m * m.transpose() } else { m.transpose() * &m };
    let (sigma2, vecs) = eigen_desc(&gram)?;
    Some(GramEigen { m, wide, sigma2, vecs })
}

/// The layer's weight as [C_out, C_in] if the pass should try it; None to
/// skip silently (other ops and kernels, excluded names); Err to decline.
fn candidate(graph: &Graph, shapes: &Shapes, ix: NodeIndex, opts: &LowrankOptions) -> std::result::Result<Option<Candidate>, String> {
    let node = graph.node(ix);
    let op = node.op();
    if !node.is_standard() || !matches!(op, "Conv" | "Gemm") {
        return Ok(None);
    }
    let selection = Selection {
        include: &opts.include,
        exclude: &opts.exclude,
        min_resolution: opts.min_resolution,
        max_resolution: opts.max_resolution,
    };
    let Some((w, included)) = selection.weight(graph, shapes, ix)? else { return Ok(None) };
    let gemm = op == "Gemm";
    let shape = w.shape().to_vec();
    if !gemm && (shape.len() != 4 || shape[2] * shape[3] != 1) {
        return Ok(None);
    }
    if factorize::skips_stem(graph, ix, included) {
        return Ok(None);
    }
    if gemm {
        let one = |a: &str| node.attr_float(a).unwrap_or(1.0) == 1.0;
        if shape.len() != 2 || node.attr_int("transA").unwrap_or(0) != 0 || !one("alpha") || !one("beta") {
            return Err("Gemm with transA, alpha or beta other than the plain form".into());
        }
    } else if node.attr_int("group").unwrap_or(1) != 1 {
        return Err("grouped conv".into());
    }
    factorize::shared_weight(graph, ix)?;
    let transposed = gemm && node.attr_int("transB").unwrap_or(0) == 0;
    few_class_head(graph, ix, if transposed { shape[1] } else { shape[0] }, included)?;
    let (rows, cols) = (shape[0], shape[1]);
    if rows == 0 || cols == 0 {
        return Err("empty weight".into());
    }
    let m = Array2::from_shape_vec((rows, cols), w.iter().copied().collect()).map_err(|e| e.to_string())?;
    Ok(Some(Candidate { w: if transposed { m.t().to_owned() } else { m }, gemm }))
}

/// Declines the classifier of a task model (the layer writing a graph
/// output, with at most `TASK_CLASSES` outputs) unless included by name:
/// it is tiny (2048 × 6 weights in a 6-class ResNet-50), and any rank below
/// its output count puts the logits on fewer dimensions — a ratio that is
/// sane for a 1000-way head cut a 6-way one to rank 1 (issue #17).
fn few_class_head(graph: &Graph, ix: NodeIndex, outputs: usize, included: bool) -> std::result::Result<(), String> {
    let node = graph.node(ix);
    let writes_output = node.outputs().iter().any(|t| graph.meta.output.iter().any(|o| o.name() == t));
    if writes_output && outputs <= crate::config::TASK_CLASSES && !included {
        return Err(format!(
            "the classifier ({outputs} classes) stays whole: a rank below {outputs} would put its logits on fewer dimensions; name it in `include` to factorize it anyway"
        ));
    }
    Ok(())
}

/// The rank the options ask for, given the squared singular values
/// (largest first) of a C_out × C_in layer, and the share of them kept.
fn choose_rank(sigma2: &[f64], c_out: usize, c_in: usize, opts: &LowrankOptions) -> (usize, f64) {
    let max_rank = sigma2.len().max(1);
    let total: f64 = sigma2.iter().sum();
    let kept = |r: usize| if total > 0.0 { sigma2.iter().take(r).sum::<f64>() / total } else { 1.0 };
    let rank = match (opts.rank, opts.energy) {
        (Some(r), _) => r,
        (None, Some(e)) => factorize::rank_for_energy(kept, max_rank, e),
        (None, None) => ((opts.ratio.unwrap_or(0.5) * (c_out * c_in) as f64 / (c_out + c_in) as f64).floor() as usize).max(1),
    };
    let rank = rank.clamp(1, max_rank);
    (rank, kept(rank))
}

/// Share of the layer's weights a rank-r factorization saves.
fn gain(c_out: usize, c_in: usize, rank: usize) -> f64 {
    factorize::gain(c_out * c_in, rank * (c_out + c_in))
}

fn too_small(c_out: usize, c_in: usize, rank: usize, opts: &LowrankOptions) -> Option<String> {
    factorize::too_small(rank, gain(c_out, c_in, rank), opts.min_gain)
}

/// Data-free truncated SVD of W [C_out, C_in].
pub fn factorize(w: &Array2<f32>, opts: &LowrankOptions) -> std::result::Result<LowRank, String> {
    let (c_out, c_in) = w.dim();
    if w.iter().any(|v| !v.is_finite()) {
        return Err("weight holds NaN or infinity".into());
    }
    let GramEigen { m, wide, sigma2, vecs } = gram_eigen(w).ok_or("eigendecomposition failed")?;
    let (rank, energy) = choose_rank(&sigma2, c_out, c_in, opts);
    if let Some(reason) = too_small(c_out, c_in, rank, opts) {
        return Err(reason);
    }
    let v = vecs.subcols(0, rank);
    let (a, b) = if wide {
        // W ≈ U_r (U_rᵀ W)
        (to_array(&(v.transpose() * &m)), to_array(&v.to_owned()))
    } else {
        // W ≈ (W V_r) V_rᵀ
        (to_array(&v.transpose().to_owned()), to_array(&(&m * v)))
    };
    Ok(LowRank { a, b, energy })
}

fn to_array(m: &Mat<f64>) -> Array2<f32> {
    Array2::from_shape_fn((m.nrows(), m.ncols()), |(i, j)| m[(i, j)] as f32)
}

/// Factorizes 1x1 conv `ix` on its sampled inputs `x` (N × C_in) and
/// reference outputs `y` (N × C_out): reduced-rank regression, then
/// alternating refits of B (with the bias) and A.
fn factorize_on_data(
    graph: &mut Graph,
    ix: NodeIndex,
    w: &Array2<f32>,
    x: &[f32],
    y: &[f32],
    opts: &LowrankOptions,
    fit: Fit,
) -> Result<Outcome> {
    let name = graph.node(ix).name().to_string();
    let p = crate::refit::Problem::new(graph, ix, x, y)?;
    let (c_in, c_out) = (p.d, p.c_out);
    let fail = |what: &str| Error::Pass { pass: "lowrank".into(), reason: format!("`{name}`: {what}") };
    // A Gemm gets one sample per image: with fewer images than inputs
    // (ResNet-50: 1,256 against 2,048) the least-squares map would
    // interpolate the calibration outputs, so its principal directions are
    // those of the present weights' predictions, and A is not refit.
    let gemm = graph.node(ix).op() == "Gemm";
    let full = if gemm {
        crate::refit::current_solution(graph, ix, c_in, c_out)
    } else {
        Fit { ridge: fit.ridge, relu: false }
            .solve(&p.xa, &p.ya)
            .ok_or_else(|| fail("the least-squares map is not solvable (normal equations not positive definite, or non-finite values)"))?
    };
    let (rank, energy, a) = principal_map(&p.xa, &full, c_in, c_out, opts).ok_or_else(|| fail("eigendecomposition failed"))?;
    if let Some(reason) = too_small(c_out, c_in, rank, opts) {
        return Ok(Outcome::Declined { name, reason });
    }
    let xs = p.xa.without_ones();
    let before = svd_error(graph, ix, w, &xs, &p.ya, rank, fit).ok_or_else(|| fail("the data-free SVD failed"))?;
    let (mut a, mut sol, mut err) = fit_outer(&xs, a, &p.ya, fit).ok_or_else(|| fail("the pointwise refit is not solvable"))?;
    if opts.alternate > 0 && !gemm {
        let mut g = gram(&xs);
        crate::refit::add_ridge(&mut g, c_in, fit.ridge);
        let llt = g.llt(Side::Lower).map_err(|_| fail("the input Gram matrix is not positive definite"))?;
        for _ in 0..opts.alternate {
            let Some(round) =
                refit_inner(&xs, &llt, &a, &sol, &p.ya, fit).and_then(|a2| fit_outer(&xs, a2, &p.ya, fit)).filter(|r| r.2 < err)
            else {
                break;
            };
            (a, sol, err) = round;
        }
    }
    if !err.is_finite() || !before.is_finite() {
        return Err(fail("non-finite values in the calibrated factorization"));
    }
    let b = Array2::from_shape_fn((c_out, rank), |(o, j)| sol[(j, o)] as f32);
    let bias: Vec<f32> = (0..c_out).map(|o| sol[(rank, o)] as f32).collect();
    replace(graph, ix, &LowRank { a: to_array(&a), b, energy }, Some(bias))?;
    let what = format!(
        "rank {rank} (energy {energy:.4}) on data: relative error {before:.4} -> {err:.4}, params {} -> {}",
        c_in * c_out,
        rank * (c_in + c_out)
    );
    Ok(Outcome::Done { name, what })
}

/// The error of the data-free factorization at `rank` (SVD of the present
/// weight, bias kept): what the calibrated fit is measured against.
fn svd_error(graph: &Graph, ix: NodeIndex, w: &Array2<f32>, xs: &Rows, ya: &Mat<f64>, rank: usize, fit: Fit) -> Option<f64> {
    let (c_out, c_in) = w.dim();
    let f = factorize(w, &LowrankOptions { rank: Some(rank), min_gain: f64::NEG_INFINITY, ..Default::default() }).ok()?;
    let a = Mat::<f64>::from_fn(rank, c_in, |j, i| f.a[[j, i]] as f64);
    let bias = graph.bias_or_zeros(ix, c_out);
    let sol = Mat::<f64>::from_fn(rank + 1, c_out, |j, o| if j == rank { bias[o] as f64 } else { f.b[[o, j]] as f64 });
    let z = features(xs, &a);
    Some(fit.error(&Rows::with_ones(&z, xs.nrows(), rank), &sol, ya))
}

/// Reduced-rank regression: the rank, the energy kept, and A (r × C_in) =
/// (M V_r)ᵀ, V_r the top principal directions of the centred predictions
/// P = [X 1]·M. Their scatter comes from the Gram matrix G of [X 1]
/// without forming P (N × C_out, 0.8 GB for 2,048 outputs at the row cap):
/// PᵀP = Mᵀ G M, and the mean row of P is (G's last row / N)·M, the last
/// column of [X 1] being the ones.
fn principal_map(xa: &Rows, full: &Mat<f64>, c_in: usize, c_out: usize, opts: &LowrankOptions) -> Option<(usize, f64, Mat<f64>)> {
    let g = gram(xa);
    let n = xa.nrows() as f64;
    let mean = g.subrows(c_in, 1) * full * (1.0 / n);
    let scatter = full.transpose() * &g * full - mean.transpose() * &mean * n;
    let (values, vecs) = eigen_desc(&scatter)?;
    let (rank, energy) = choose_rank(&values[..c_out.min(c_in)], c_out, c_in, opts);
    let a = (full.subrows(0, c_in) * vecs.subcols(0, rank)).transpose().to_owned();
    Some((rank, energy, a))
}

/// The features Z = X Aᵀ (N × r, row-major f32), a block of rows at a time.
fn features(xs: &Rows, a: &Mat<f64>) -> Vec<f32> {
    let mut z = Vec::with_capacity(xs.nrows() * a.nrows());
    xs.each_block(a.nrows(), &mut |_, xb| {
        let zb = &(xb * a.transpose());
        z.extend((0..zb.nrows()).flat_map(|r| (0..zb.ncols()).map(move |c| zb[(r, c)] as f32)));
    });
    z
}

/// B and the bias fitted on the features Z = X Aᵀ: (A, [Bᵀ; bᵀ], error).
fn fit_outer(xs: &Rows, a: Mat<f64>, ya: &Mat<f64>, fit: Fit) -> Option<(Mat<f64>, Mat<f64>, f64)> {
    let z = features(xs, &a);
    let za = Rows::with_ones(&z, xs.nrows(), a.nrows());
    let sol = fit.solve(&za, ya)?;
    let err = fit.error(&za, &sol, ya);
    Some((a, sol, err))
}

/// A refit with B and b fixed: Aᵀ = (XᵀX + λ)⁻¹ Xᵀ(T − b) B (BᵀB)⁻¹, with T
/// the targets (or, through a ReLU, their stand-in at the current solution).
fn refit_inner(
    xs: &Rows,
    llt: &faer::linalg::solvers::Llt<f64>,
    a: &Mat<f64>,
    sol: &Mat<f64>,
    ya: &Mat<f64>,
    fit: Fit,
) -> Option<Mat<f64>> {
    let rank = sol.nrows() - 1;
    let bt = sol.subrows(0, rank); // Bᵀ: r × C_out

    // Xᵀ(T − b)B, a block of rows at a time (T − b is N × C_out).
    let mut lhs = Mat::<f64>::zeros(xs.ncols(), rank); // C_in × r
    xs.each_block(ya.ncols(), &mut |first, xb| {
        let yb = ya.subrows(first, xb.nrows());
        let pred = fit.relu.then(|| xb * a.transpose() * bt);
        let centred = Mat::<f64>::from_fn(xb.nrows(), ya.ncols(), |r, c| {
            let (y, bias) = (yb[(r, c)], sol[(rank, c)]);
            let target = pred.as_ref().map_or(y, |p| crate::refit::relu_target_at(y, p[(r, c)] + bias));
            target - bias
        });
        lhs += xb.transpose() * (&centred * bt.transpose());
    });
    llt.solve_in_place(lhs.as_mut());
    // A = (BᵀB)⁻¹ lhsᵀ
    let mut at = lhs.transpose().to_owned();
    (bt * bt.transpose()).llt(Side::Lower).ok()?.solve_in_place(at.as_mut());
    at.norm_l2().is_finite().then_some(at)
}

/// Rewrites Gemm `ix` to read its weight as `w` = [C_out, C_in] with
/// transB = 1 (the same function), the layout the calibrated refit reads.
fn as_trans_b(graph: &mut Graph, ix: NodeIndex, w: &Array2<f32>) -> Result<()> {
    if graph.node(ix).attr_int("transB").unwrap_or(0) == 1 {
        return Ok(());
    }
    let Some(wname) = graph.node(ix).input(1).map(str::to_string) else { return Ok(()) };
    if let Some(weight) = graph.weight_mut(&wname) {
        weight.set_data(crate::ir::Data::F32(w.clone().into_dyn()));
        graph.update_node(ix, |n| n.set_attr_int("transB", 1))?;
    }
    Ok(())
}

/// Replaces layer `ix` by the pair A then B. `bias`, when given, replaces
/// the layer's bias (calibrated); otherwise B keeps the original one.
fn replace(graph: &mut Graph, ix: NodeIndex, f: &LowRank, bias: Option<Vec<f32>>) -> Result<()> {
    let layer = graph.node(ix).clone();
    let name = layer.name().to_string();
    let gemm = layer.op() == "Gemm";
    let rank = f.a.nrows();
    let (a_name, b_name) = (graph.fresh_name(&format!("{name}_lr1")), graph.fresh_name(&format!("{name}_lr2")));
    let (a_w, b_w, mid) = (
        graph.fresh_name(&format!("{name}_lr1.weight")),
        graph.fresh_name(&format!("{name}_lr2.weight")),
        graph.fresh_name(&format!("{name}_lr1_out")),
    );
    let shape = |m: &Array2<f32>| if gemm { vec![m.nrows(), m.ncols()] } else { vec![m.nrows(), m.ncols(), 1, 1] };
    let as_weight =
        |n: &str, m: &Array2<f32>| ArrayD::from_shape_vec(IxDyn(&shape(m)), m.iter().copied().collect()).map(|a| Weight::from_f32(n, a));
    let to_err = |e: ndarray::ShapeError| Error::invalid(format!("lowrank `{name}`: {e}"));
    graph.insert_weight(a_w.clone(), as_weight(&a_w, &f.a).map_err(to_err)?)?;
    graph.insert_weight(b_w.clone(), as_weight(&b_w, &f.b).map_err(to_err)?)?;
    let mut first = layer.clone();
    first.proto.name = Some(a_name);
    first.proto.input = vec![layer.inputs()[0].clone(), a_w];
    first.proto.output = vec![mid.clone()];
    let mut second = if gemm { layer.clone() } else { Node::new("Conv", &b_name, &[], &[]) };
    second.proto.name = Some(b_name);
    second.proto.input = vec![mid, b_w];
    second.proto.output = vec![layer.outputs()[0].clone()];
    if gemm {
        // The first Gemm's C (zeros): optional only from opset 11.
        let c = graph.fresh_name(&format!("{name}_lr1.bias"));
        graph.insert_weight(c.clone(), Weight::from_f32(&c, ArrayD::zeros(IxDyn(&[rank]))))?;
        first.proto.input.push(c);
        first.set_attr_int("transB", 1);
        second.set_attr_int("transB", 1);
    } else {
        second.set_attr_ints("kernel_shape", &[1, 1]);
    }
    if let Some(b) = layer.input(2) {
        second.proto.input.push(b.to_string());
    }
    let added = graph.replace_node(ix, vec![first, second])?;
    if let Some(values) = bias {
        graph.set_bias(added[1], values);
    }
    Ok(())
}
