//! Pass `retarget`: makes a task model from an ImageNet-style classifier
//! and labelled photos — the final classifier is replaced by one for the
//! folder's classes, fitted on the pooled features.
//!
//! Before:  … → features F [N, D] → Gemm (1000 outputs) → logits
//! After:   … → features F [N, D] → Gemm (K outputs, line k of `classes` = output k) → logits
//!
//! Applies to a model whose graph output is computed by a Gemm (possibly
//! through Softmax/Identity) reading a 2-d feature tensor; declines
//! otherwise, with the reason. `data` is `DIR/<class>/<image>`, folder
//! names mapped to outputs through `classes` (line k = output k, first word
//! = folder name), at most `images` photos per class (class-balanced), each
//! preprocessed as `preprocess` says and run once through the backbone
//! (tract, all cores). Without `data` and `classes` the pass takes every
//! photo of a labelled `calibration:` folder (`classes` given there) with
//! its preprocessing — that is how a task recipe refits the head of a
//! pruned backbone (linear probe, then fine-tuning: Kumar et al. 2022,
//! "LP-FT"); with neither, it declines (the head stays).
//!
//! The classifier is a multinomial logistic regression on the features,
//! standardized (mean 0, variance 1 per feature; folded back into the Gemm):
//! minimize (1/n) Σ_i CE(softmax(W x_i + b), y_i) + (λ/2)‖W‖², by L-BFGS
//! (10 pairs, backtracking Armijo line search, until the gradient's norm
//! falls below 1e-5 or 500 iterations). λ is chosen by stratified k-fold
//! cross-validation (`folds`, default 5) on the training photos only, over
//! the grid `lambdas` (largest λ on ties: the simpler model), then the
//! classifier is refit on all of them. The report gives the CV accuracy of
//! every λ and the training accuracy.
use super::{Pass, PassContext, PassReport};
use crate::data::{labelled, DataSource, Preprocess, Preprocessing, Sample};
use crate::error::{Error, Result};
use crate::ir::{Graph, Model, Weight};
use crate::runner::Runner;
use ndarray::{Array1, Array2, Axis};
use petgraph::stable_graph::NodeIndex;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetargetOptions {
    /// Labelled photos, `DIR/<class>/<image>`.
    pub data: PathBuf,
    /// Class list: line k = output k; its first word names the class folder.
    pub classes: PathBuf,
    pub preprocess: Preprocess,
    /// At most this many photos per class (the first by path).
    pub images: Option<usize>,
    pub folds: usize,
    /// Candidate L2 strengths on standardized features.
    pub lambdas: Vec<f64>,
}

impl Default for RetargetOptions {
    fn default() -> Self {
        RetargetOptions {
            data: PathBuf::new(),
            classes: PathBuf::new(),
            preprocess: Preprocess::Caffe,
            images: None,
            folds: 5,
            lambdas: vec![1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0],
        }
    }
}

/// The `retarget` pass.
pub struct Retarget;

impl Pass for Retarget {
    const NAME: &'static str = "retarget";
    type Options = RetargetOptions;

    fn validate(o: &RetargetOptions) -> Result<()> {
        if o.data.as_os_str().is_empty() != o.classes.as_os_str().is_empty() {
            return Err(Error::Config("`retarget` needs both `data` (DIR/<class>/<image>) and `classes` (a class list), or neither (then a labelled `calibration:`)".into()));
        }
        if o.folds < 2 {
            return Err(Error::Config(format!("`retarget.folds` is {}, but must be at least 2", o.folds)));
        }
        if o.lambdas.is_empty() || o.lambdas.iter().any(|&l| !(l > 0.0 && l.is_finite())) {
            return Err(Error::Config("`retarget.lambdas` must be a non-empty list of positive numbers".into()));
        }
        Ok(())
    }

    fn resolve_paths(o: &mut RetargetOptions, dir: &Path) {
        for p in [&mut o.data, &mut o.classes] {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = dir.join(&*p);
            }
        }
        o.preprocess.resolve(dir);
    }

    fn run(model: &mut Model, ctx: &PassContext, o: &RetargetOptions) -> Result<PassReport> {
        let mut report = PassReport::default();
        let (gemm, features) = match head(&model.graph, ctx) {
            Ok(found) => found,
            Err(reason) => {
                report.decline("(graph)", reason);
                return Ok(report);
            }
        };
        // A shipped recipe must also run data-free: then the head stays as it is.
        let Some(Source { data, classes, pre, from_calibration }) = source(o, ctx)? else {
            report.decline(
                "(classifier)",
                "no labelled photos: give `retarget: {data: DIR, classes: FILE}` or a `calibration:` with `classes`",
            );
            return Ok(report);
        };
        let names = class_names(&classes)?;
        // From the calibration (a recipe's head refit), the head keeps its
        // outputs: the teacher and the user's labels are in that order.
        let outputs = crate::config::class_count(&model.graph, ctx.shapes);
        if from_calibration && outputs.is_some_and(|k| k != names.len()) {
            return Err(Error::Pass {
                pass: "retarget".into(),
                reason: format!(
                    "the calibration's class list {} has {} classes, but the model has {} outputs: give the list the model was trained on",
                    classes.display(),
                    names.len(),
                    outputs.unwrap_or(0)
                ),
            });
        }
        let samples = balanced(labelled(&data, Some(&classes), names.len())?, o.images);
        let (x, y) = extract(model, &features, &samples, &pre)?;
        let counts = (0..names.len()).map(|k| y.iter().filter(|&&l| l == k).count()).collect::<Vec<_>>();
        if let Some(k) = counts.iter().position(|&c| c < o.folds) {
            return Err(Error::Data(format!(
                "class `{}` has {} photos in {}: fewer than the {} folds",
                names[k],
                counts[k],
                data.display(),
                o.folds
            )));
        }
        let std = Standardizer::fit(&x);
        let xs = std.apply(&x);
        let mut lambdas = o.lambdas.clone();
        lambdas.sort_by(f64::total_cmp);
        let mut best = (f64::NEG_INFINITY, lambdas[0]);
        for &lambda in &lambdas {
            let acc = cross_validate(&xs, &y, names.len(), lambda, o.folds);
            report.change("(classifier)", format!("λ {lambda:e}: {}-fold CV accuracy {acc:.4}", o.folds));
            if acc >= best.0 {
                best = (acc, lambda);
            }
        }
        let fit = Logistic::fit(&xs, &y, names.len(), best.1, None);
        let train_acc = fit.accuracy(&xs, &y);
        let (w, b) = std.fold(&fit);
        write_head(&mut model.graph, gemm, w, b)?;
        let name = model.graph.node(gemm).name().to_string();
        report.change(
            &name,
            format!(
                "classifier for {} classes fitted on {} photos ({} features): λ {:e}, CV accuracy {:.4}, training accuracy {train_acc:.4}",
                names.len(),
                y.len(),
                x.ncols(),
                best.1,
                best.0
            ),
        );
        Ok(report)
    }
}

/// The Gemm computing the graph's output and its (2-d) input tensor.
fn head(graph: &Graph, ctx: &PassContext) -> std::result::Result<(NodeIndex, String), String> {
    let out = graph.meta.output.first().ok_or("the graph has no output")?.name().to_string();
    let mut tensor = out;
    loop {
        let (ix, _) = graph.producer(&tensor).ok_or_else(|| format!("no node computes `{tensor}`"))?;
        let node = graph.node(ix);
        match node.op() {
            "Softmax" | "Identity" | "LogSoftmax" => tensor = node.input(0).ok_or("a head op without input")?.to_string(),
            "Gemm" => {
                let x = node.input(0).ok_or("Gemm without input")?;
                let plain = node.attr_int("transA").unwrap_or(0) == 0;
                let shape = ctx.shapes.get(x).and_then(|t| t.shape.clone());
                return match shape {
                    Some(s) if s.len() == 2 && plain => Ok((ix, x.to_string())),
                    _ => Err(format!("the classifier `{}` does not read a 2-d feature tensor", node.name())),
                };
            }
            other => return Err(format!("the graph output comes from {other} `{}`, not from a Gemm classifier", node.name())),
        }
    }
}

/// The labelled photos to fit on.
struct Source {
    data: PathBuf,
    classes: PathBuf,
    pre: Preprocessing,
    /// Taken from the labelled calibration folder (a recipe's head refit).
    from_calibration: bool,
}

/// The options' labelled folder, else the labelled calibration folder, else none.
fn source(o: &RetargetOptions, ctx: &PassContext) -> Result<Option<Source>> {
    if !o.data.as_os_str().is_empty() {
        let pre = Preprocessing::from_choice(&o.preprocess)?;
        return Ok(Some(Source { data: o.data.clone(), classes: o.classes.clone(), pre, from_calibration: false }));
    }
    let calibration = ctx.calibration.and_then(|c| c.labelled.as_ref().map(|l| (l, &c.preprocessing)));
    Ok(match calibration {
        Some((DataSource { dir, classes: Some(classes), .. }, pre)) => {
            Some(Source { data: dir.clone(), classes: classes.clone(), pre: pre.clone(), from_calibration: true })
        }
        _ => None,
    })
}

fn class_names(path: &Path) -> Result<Vec<String>> {
    let ids = crate::data::read_classes(path)?;
    // Labels are line numbers (blank lines leave gaps): one output per line up to the last.
    let mut names = vec![String::new(); ids.values().max().map_or(0, |&k| k + 1)];
    for (id, k) in ids {
        if let Some(slot) = names.get_mut(k) {
            *slot = id;
        }
    }
    Ok(names)
}

/// At most `per_class` samples of each class, the classes in turn.
pub fn balanced(samples: Vec<Sample>, per_class: Option<usize>) -> Vec<Sample> {
    let cap = per_class.unwrap_or(usize::MAX);
    let mut taken = std::collections::HashMap::new();
    crate::data::balanced(samples)
        .into_iter()
        .filter(|s| {
            let n = taken.entry(s.label).or_insert(0usize);
            *n += 1;
            *n <= cap
        })
        .collect()
}

/// The feature vector of every sample (one tract run per photo, on all cores).
fn extract(model: &Model, features: &str, samples: &[Sample], pre: &Preprocessing) -> Result<(Array2<f64>, Vec<usize>)> {
    let shape = [1, 3, pre.crop as usize, pre.crop as usize];
    let runner = Runner::truncated_at(model, &shape, &[features.to_string()])?;
    let rows: Vec<Vec<f32>> = samples
        .par_iter()
        .map(|s| {
            let x = pre.load(&s.path)?.insert_axis(Axis(0)).into_dyn();
            Ok(runner.run(x)?.remove(0).iter().copied().collect())
        })
        .collect::<Result<_>>()?;
    let d = rows.first().map_or(0, Vec::len);
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().map(|&v| v as f64)).collect();
    let x = Array2::from_shape_vec((rows.len(), d), flat).map_err(|e| Error::Data(format!("features: {e}")))?;
    Ok((x, samples.iter().map(|s| s.label).collect()))
}

/// Per-feature mean and standard deviation.
struct Standardizer {
    mean: Array1<f64>,
    scale: Array1<f64>,
}

impl Standardizer {
    fn fit(x: &Array2<f64>) -> Standardizer {
        let mean = x.mean_axis(Axis(0)).expect("rows");
        let var = x.var_axis(Axis(0), 0.0);
        // A constant feature keeps scale 1 (it carries nothing; its weight is 0).
        let scale = var.mapv(|v| if v > 1e-12 { v.sqrt() } else { 1.0 });
        Standardizer { mean, scale }
    }
    fn apply(&self, x: &Array2<f64>) -> Array2<f64> {
        (x - &self.mean) / &self.scale
    }
    /// The classifier on raw features: W' = W / σ, b' = b − W' μ.
    fn fold(&self, fit: &Logistic) -> (Array2<f64>, Array1<f64>) {
        let w = &fit.w / &self.scale;
        let b = &fit.b - &w.dot(&self.mean);
        (w, b)
    }
}

/// A multinomial logistic regression: logits = W x + b, W [K, D].
struct Logistic {
    w: Array2<f64>,
    b: Array1<f64>,
}

impl Logistic {
    fn logits(&self, x: &Array2<f64>) -> Array2<f64> {
        x.dot(&self.w.t()) + &self.b
    }

    fn accuracy(&self, x: &Array2<f64>, y: &[usize]) -> f64 {
        let z = self.logits(x);
        let hits = z.rows().into_iter().zip(y).filter(|(row, &l)| argmax(row.iter().copied()) == l).count();
        hits as f64 / y.len().max(1) as f64
    }

    /// Minimizes mean cross-entropy + λ/2 ‖W‖² by L-BFGS from `start` (or zeros).
    fn fit(x: &Array2<f64>, y: &[usize], k: usize, lambda: f64, start: Option<&Logistic>) -> Logistic {
        let d = x.ncols();
        let mut theta: Vec<f64> = match start {
            Some(s) => s.w.iter().chain(s.b.iter()).copied().collect(),
            None => vec![0.0; k * d + k],
        };
        let objective = |t: &[f64]| objective(x, y, k, lambda, t);
        lbfgs(&mut theta, objective, 500, 1e-5);
        let w = Array2::from_shape_vec((k, d), theta[..k * d].to_vec()).expect("k*d values");
        Logistic { w, b: Array1::from_vec(theta[k * d..].to_vec()) }
    }
}

fn argmax(values: impl Iterator<Item = f64>) -> usize {
    values.enumerate().fold((0, f64::NEG_INFINITY), |best, (i, v)| if v > best.1 { (i, v) } else { best }).0
}

/// Loss and gradient of the regularized mean cross-entropy at θ = (W, b).
fn objective(x: &Array2<f64>, y: &[usize], k: usize, lambda: f64, theta: &[f64]) -> (f64, Vec<f64>) {
    let (n, d) = x.dim();
    let w = ndarray::ArrayView2::from_shape((k, d), &theta[..k * d]).expect("k*d values");
    let b = ndarray::ArrayView1::from(&theta[k * d..]);
    let mut p = x.dot(&w.t()) + b;
    let mut loss = 0.0;
    for (mut row, &label) in p.rows_mut().into_iter().zip(y) {
        let m = row.fold(f64::NEG_INFINITY, |a, &v| a.max(v));
        let z = row[label] - m;
        row.mapv_inplace(|v| (v - m).exp());
        let sum = row.sum();
        loss += sum.ln() - z;
        row /= sum;
        row[label] -= 1.0;
    }
    let g = p.t().dot(x) / n as f64 + &(&w * lambda);
    let gb = p.sum_axis(Axis(0)) / n as f64;
    let reg = 0.5 * lambda * w.iter().map(|v| v * v).sum::<f64>();
    (loss / n as f64 + reg, g.iter().chain(gb.iter()).copied().collect())
}

/// Mean accuracy over `folds` stratified folds (fold of a sample = its rank within its class mod `folds`).
fn cross_validate(x: &Array2<f64>, y: &[usize], k: usize, lambda: f64, folds: usize) -> f64 {
    let mut seen = vec![0usize; k];
    let fold_of: Vec<usize> = y
        .iter()
        .map(|&l| {
            seen[l] += 1;
            (seen[l] - 1) % folds
        })
        .collect();
    let scores: Vec<f64> = (0..folds)
        .into_par_iter()
        .map(|f| {
            let (train, test): (Vec<usize>, Vec<usize>) = (0..y.len()).partition(|&i| fold_of[i] != f);
            let pick = |idx: &[usize]| (x.select(Axis(0), idx), idx.iter().map(|&i| y[i]).collect::<Vec<_>>());
            let ((xt, yt), (xv, yv)) = (pick(&train), pick(&test));
            Logistic::fit(&xt, &yt, k, lambda, None).accuracy(&xv, &yv)
        })
        .collect();
    scores.iter().sum::<f64>() / folds as f64
}

/// Limited-memory BFGS (Nocedal & Wright, alg. 7.4/7.5) with a backtracking
/// Armijo line search; stops when ‖∇‖∞ < `tol` or after `max_iter` steps.
fn lbfgs(theta: &mut [f64], f: impl Fn(&[f64]) -> (f64, Vec<f64>), max_iter: usize, tol: f64) {
    const M: usize = 10;
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let (mut fx, mut g) = f(theta);
    let mut pairs: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> = Default::default();
    for _ in 0..max_iter {
        if g.iter().fold(0.0f64, |m, v| m.max(v.abs())) < tol {
            break;
        }
        // Two-loop recursion: direction = −H ∇.
        let mut q = g.clone();
        let mut alphas = Vec::with_capacity(pairs.len());
        for (s, yv, rho) in pairs.iter().rev() {
            let a = rho * dot(s, &q);
            q.iter_mut().zip(yv).for_each(|(qi, yi)| *qi -= a * yi);
            alphas.push(a);
        }
        if let Some((s, yv, _)) = pairs.back() {
            let gamma = dot(s, yv) / dot(yv, yv);
            q.iter_mut().for_each(|v| *v *= gamma);
        }
        for ((s, yv, rho), a) in pairs.iter().zip(alphas.into_iter().rev()) {
            let beta = rho * dot(yv, &q);
            q.iter_mut().zip(s).for_each(|(qi, si)| *qi += (a - beta) * si);
        }
        let dir: Vec<f64> = q.iter().map(|v| -v).collect();
        let slope = dot(&g, &dir);
        if slope >= 0.0 {
            pairs.clear();
            continue;
        }
        let mut step = 1.0;
        let (next, f_next, g_next) = loop {
            let cand: Vec<f64> = theta.iter().zip(&dir).map(|(t, d)| t + step * d).collect();
            let (fc, gc) = f(&cand);
            if fc <= fx + 1e-4 * step * slope {
                break (cand, fc, gc);
            }
            step *= 0.5;
            if step < 1e-10 {
                // No descent left along this direction: stay where we are.
                return;
            }
        };
        let s: Vec<f64> = next.iter().zip(theta.iter()).map(|(a, b)| a - b).collect();
        let yv: Vec<f64> = g_next.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &yv);
        if sy > 1e-12 {
            if pairs.len() == M {
                pairs.pop_front();
            }
            pairs.push_back((s, yv, 1.0 / sy));
        }
        theta.copy_from_slice(&next);
        let converged = (fx - f_next).abs() < 1e-12 * fx.abs().max(1.0);
        (fx, g) = (f_next, g_next);
        if converged {
            break;
        }
    }
}

/// Rewrites Gemm `ix` as logits = x Wᵀ + b (transB = 1, alpha = beta = 1).
fn write_head(graph: &mut Graph, ix: NodeIndex, w: Array2<f64>, b: Array1<f64>) -> Result<()> {
    let name = graph.node(ix).name().to_string();
    let w_name = graph.fresh_name(&format!("{name}.retargeted_weight"));
    let b_name = graph.fresh_name(&format!("{name}.retargeted_bias"));
    graph.insert_weight(w_name.clone(), Weight::from_f32(&w_name, w.mapv(|v| v as f32).into_dyn()))?;
    graph.insert_weight(b_name.clone(), Weight::from_f32(&b_name, b.mapv(|v| v as f32).into_dyn()))?;
    graph.update_node(ix, |n| {
        n.proto.input.truncate(1);
        n.proto.input.push(w_name.clone());
        n.proto.input.push(b_name.clone());
        n.proto.attribute.retain(|a| !matches!(a.name(), "alpha" | "beta" | "transA" | "transB"));
        n.set_attr_int("transB", 1);
    })
}
