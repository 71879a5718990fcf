//! The passes, one module each, and the pipeline that runs them.
//!
//! A pass is a type implementing [`Pass`]: its name, its typed options
//! (deserialized with unknown keys rejected, checked by `validate`) and
//! `run`, which rewrites the [`Model`] and returns a [`PassReport`] of what
//! it changed and what it declined. The [`registry!`] list at the bottom of
//! this file is the only place that names every pass: parsing, defaults,
//! `--passes`, validation and dispatch all come from it. The pipeline
//! validates the graph after every pass and names the pass in any error.
//!
//! Before the listed passes the pipeline runs `canonicalize` (exact; only
//! reported when it changed something) unless the list starts with it, and
//! leading `retarget` passes run before the model is kept as the teacher of
//! `distill` and the reference of calibrated refits. A `lowrank` with a
//! `budget` has its ratio fitted to the rest of the pipeline first
//! ([`fit_budget`]).
//!
//! Adding a pass: write `passes/NAME.rs` (spec in `//!`, options, `impl
//! Pass`) and add one line `Variant => NAME::Type` to the registry.
//! The pipelines shipped in the binary are the YAML files in
//! `passes/pipelines/`, listed in [`PIPELINES`].
mod factorize;

use crate::error::{Error, Result};
use crate::ir::Model;
use crate::refit::settings::RefitReference;
use crate::shape::{InputShapes, Shapes};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One graph pass. Implemented by a unit type per pass module.
pub trait Pass {
    /// Its name in pipeline files and `--passes`.
    const NAME: &'static str;
    /// Whether it loses information: with calibration images, the pipeline
    /// gives it a reference model to refit against.
    const LOSSY: bool = false;
    /// Whether it changes the weight count data-free, so that a `budget`
    /// fitted before it must try it: the lossy passes, and exact ones that
    /// add weights (`subsample`'s taps).
    const SIZES: bool = Self::LOSSY;
    /// Its options (a pipeline file's `{NAME: {…}}`; `Default` for `--passes`).
    type Options: Default + Clone + PartialEq + std::fmt::Debug + Serialize + DeserializeOwned;

    /// Checks option values (ranges, keys that exclude each other).
    fn validate(_options: &Self::Options) -> Result<()> {
        Ok(())
    }

    /// Makes the options' relative paths relative to the pipeline file's folder.
    fn resolve_paths(_options: &mut Self::Options, _dir: &Path) {}

    /// Whether the pipeline must keep the model as loaded for this pass.
    fn needs_original(_options: &Self::Options) -> bool {
        false
    }

    fn run(model: &mut Model, ctx: &PassContext, options: &Self::Options) -> Result<PassReport>;
}

/// Builds [`PassSpec`] (one variant per pass, holding its options) and the
/// functions that dispatch on it, from one line per pass.
macro_rules! registry {
    ($($variant:ident => $module:ident :: $pass:ident),* $(,)?) => {
        $(pub mod $module;)*

        /// One step of a pipeline: a pass with its options.
        #[derive(Debug, Clone, PartialEq, Serialize)]
        pub enum PassSpec {
            $($variant(<$module::$pass as Pass>::Options)),*
        }

        /// Every pass's name, in registry order.
        pub const PASS_NAMES: &[&str] = &[$(<$module::$pass as Pass>::NAME),*];

        impl PassSpec {
            pub fn name(&self) -> &'static str {
                match self {
                    $(PassSpec::$variant(_) => <$module::$pass as Pass>::NAME),*
                }
            }

            /// Whether the pass refits against a reference when calibrating.
            pub fn lossy(&self) -> bool {
                match self {
                    $(PassSpec::$variant(_) => <$module::$pass as Pass>::LOSSY),*
                }
            }

            /// Whether a budget fitted before the pass must try it ([`Pass::SIZES`]).
            fn sizes(&self) -> bool {
                match self {
                    $(PassSpec::$variant(_) => <$module::$pass as Pass>::SIZES),*
                }
            }

            /// The pass called `name` with its default options.
            pub fn default_for(name: &str) -> Option<PassSpec> {
                $(if name == <$module::$pass as Pass>::NAME {
                    return Some(PassSpec::$variant(Default::default()));
                })*
                None
            }

            /// The pass called `name` with options parsed from `value`.
            fn parse(name: &str, value: yaml_serde::Value) -> std::result::Result<PassSpec, String> {
                let opts = |e: yaml_serde::Error| format!("options of pass `{name}`: {e}");
                $(if name == <$module::$pass as Pass>::NAME {
                    return Ok(PassSpec::$variant(yaml_serde::from_value(value).map_err(opts)?));
                })*
                Err(format!("unknown pass `{name}` (valid passes: {})", PASS_NAMES.join(", ")))
            }

            /// Checks option values (ranges, mutually exclusive keys).
            pub fn check(&self) -> Result<()> {
                match self {
                    $(PassSpec::$variant(o) => <$module::$pass as Pass>::validate(o)),*
                }
            }

            pub(crate) fn resolve_paths(&mut self, dir: &Path) {
                match self {
                    $(PassSpec::$variant(o) => <$module::$pass as Pass>::resolve_paths(o, dir)),*
                }
            }

            fn needs_original(&self) -> bool {
                match self {
                    $(PassSpec::$variant(o) => <$module::$pass as Pass>::needs_original(o)),*
                }
            }

            fn run(&self, model: &mut Model, ctx: &PassContext) -> Result<PassReport> {
                match self {
                    $(PassSpec::$variant(o) => <$module::$pass as Pass>::run(model, ctx, o)),*
                }
            }
        }
    };
}

registry! {
    Fold => fold::Fold,
    Prune => prune::Prune,
    Dw => dw::Dw,
    Lowrank => lowrank::Lowrank,
    Distill => distill::Distill,
    EliminateIdentity => eliminate_identity::EliminateIdentity,
    Canonicalize => canonicalize::Canonicalize,
    Retarget => retarget::Retarget,
    Resize => resize::Resize,
    Subsample => subsample::Subsample,
}

/// Pipelines shipped in the binary: (name, one-line summary, YAML).
pub const PIPELINES: &[(&str, &str, &str)] = &[
    ("fold", "fold BatchNormalization into convs: lossless, tract-friendly", include_str!("pipelines/fold.yaml")),
    ("cresnet", "CResNet (Luo et al. 2021) at 1/5 of the weights: fold, low-rank 1x1 convs and classifier, depthwise (rank 2 early, 1 late), distillation (trains only given calibration images)", include_str!("pipelines/cresnet.yaml")),
    ("cresnet-task", "CResNet for a task model (at most 100 classes; `cresnet` picks it for one): fold, low-rank 1x1 convs within 1/5, depthwise rank 1 (rank 8 on the stem), head refit, subsample; no training (needs a labelled calibration folder; refits on 512 of its photos)", include_str!("pipelines/cresnet-task.yaml")),
];

impl<'de> serde::Deserialize<'de> for PassSpec {
    /// A pass name, or a one-key map `{name: {options}}`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::{self, MapAccess, Visitor};
        struct SpecVisitor;
        impl<'de> Visitor<'de> for SpecVisitor {
            type Value = PassSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a pass name or a one-key map {{name: {{options}}}}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<PassSpec, E> {
                PassSpec::parse(v, empty_options()).map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<PassSpec, A::Error> {
                let (name, value): (String, yaml_serde::Value) = map.next_entry()?.ok_or_else(|| de::Error::custom("empty pass entry"))?;
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom(format!(
                        "pass entry `{name}` has more than one key; write each pass as its own list item"
                    )));
                }
                let value = if value.is_null() { empty_options() } else { value };
                PassSpec::parse(&name, value).map_err(de::Error::custom)
            }
        }
        d.deserialize_any(SpecVisitor)
    }
}

fn empty_options() -> yaml_serde::Value {
    yaml_serde::Value::Mapping(Default::default())
}

/// Which convs the calibrated recovery of a lossy pass refits (`prune`, `dw`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Refit {
    /// Only the convs that lost input or output channels.
    #[default]
    Changed,
    /// Every conv after the first change too: they see drifted inputs.
    All,
}

/// Checks that an optional share lies strictly between 0 and 1 (the
/// options of several passes).
pub(crate) fn check_unit(pass: &str, key: &str, v: Option<f64>) -> Result<()> {
    match v {
        Some(x) if !(x > 0.0 && x < 1.0) => Err(Error::Config(format!("`{pass}.{key}` is {x}, but must lie strictly between 0 and 1"))),
        _ => Ok(()),
    }
}

/// What a pass did to one node.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Change {
    pub node: String,
    pub what: String,
}

/// A node a pass could have changed but left alone, and why.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Decline {
    pub node: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct PassReport {
    pub pass: String,
    pub changed: Vec<Change>,
    pub declined: Vec<Decline>,
    pub params_before: u64,
    pub params_after: u64,
    pub macs_before: u64,
    pub macs_after: u64,
    pub seconds: f64,
}

impl PassReport {
    pub fn change(&mut self, node: &str, what: impl Into<String>) {
        self.changed.push(Change { node: node.to_string(), what: what.into() });
    }
    pub fn decline(&mut self, node: &str, reason: impl Into<String>) {
        self.declined.push(Decline { node: node.to_string(), reason: reason.into() });
    }
}

/// What a pass may read besides the graph it rewrites.
pub struct PassContext<'a> {
    /// Shapes of the graph as it is before this pass.
    pub shapes: &'a Shapes,
    /// The reference of calibrated recovery (only kept when calibrating):
    /// the model as loaded or as the previous pass left it
    /// (`calibration.reference`).
    pub reference: Option<&'a Model>,
    /// Calibration images, when the pipeline has them.
    pub calibration: Option<&'a crate::refit::Calibration>,
    /// The model as it was loaded (the teacher of `distill`; only kept
    /// when the pipeline distills).
    pub original: Option<&'a Model>,
    /// Where long passes (`distill`) report progress.
    pub progress: &'a dyn crate::progress::Progress,
}

impl PassContext<'_> {
    /// Refits `layers` of `model` (dense convs; others are skipped) against
    /// the reference, when calibrating, and reports each layer's error.
    pub fn refit(&self, model: &mut Model, layers: Vec<crate::refit::Layer>, report: &mut PassReport) -> Result<()> {
        let Some(calib) = self.calibration else { return Ok(()) };
        self.refit_with(model, layers, report, |g, layer, x, y| {
            let (before, after) = crate::refit::solve_layer(g, layer.node, x, y, crate::refit::Fit::for_layer(calib, g, layer.node))?;
            Ok((g.node(layer.node).name().to_string(), before, after))
        })
    }

    /// [`refit`](Self::refit) with a custom per-layer solver returning
    /// (layer, error before, error after); see [`crate::refit::refit_with`].
    pub fn refit_with(
        &self,
        model: &mut Model,
        layers: Vec<crate::refit::Layer>,
        report: &mut PassReport,
        solver: impl FnMut(&mut crate::ir::Graph, &crate::refit::Layer, &[f32], &[f32]) -> Result<(String, f64, f64)>,
    ) -> Result<()> {
        let (Some(calib), Some(reference)) = (self.calibration, self.reference) else { return Ok(()) };
        let layers = crate::refit::refittable(&model.graph, layers);
        for (layer, before, after) in crate::refit::refit_with(reference, model, &layers, calib, self.progress, solver)? {
            report.change(&layer, format!("refit: relative error {before:.4} -> {after:.4}"));
        }
        Ok(())
    }

    /// The calibration images and the reference model, when calibrating.
    pub fn calibrated(&self) -> Option<(&crate::refit::Calibration, &Model)> {
        self.calibration.zip(self.reference)
    }
}

/// The model a lossy pass refits against: the original (with its shapes)
/// when given and every tensor both graphs have still has its original
/// shape, else a copy of the model as it is now.
fn refit_reference<'a>(model: &Model, shapes: &Shapes, original: Option<(&'a Model, &Shapes)>) -> std::borrow::Cow<'a, Model> {
    match original {
        Some((o, o_shapes)) if o_shapes.iter().all(|(name, t)| shapes.get(name).is_none_or(|now| now.shape == t.shape)) => {
            std::borrow::Cow::Borrowed(o)
        }
        _ => std::borrow::Cow::Owned(model.clone()),
    }
}

/// Runs the passes in order, validating after each one.
pub fn run_pipeline(
    model: &mut Model,
    passes: &[PassSpec],
    overrides: &InputShapes,
    on_done: impl FnMut(&PassReport),
) -> Result<Vec<PassReport>> {
    run_pipeline_calibrated(model, passes, overrides, None, on_done)
}

/// `run_pipeline` with calibration images for the data-aware passes.
pub fn run_pipeline_calibrated(
    model: &mut Model,
    passes: &[PassSpec],
    overrides: &InputShapes,
    calibration: Option<&crate::refit::Calibration>,
    on_done: impl FnMut(&PassReport),
) -> Result<Vec<PassReport>> {
    run_pipeline_with(model, passes, overrides, calibration, &crate::progress::Silent, on_done)
}

/// [`run_pipeline_calibrated`] reporting the progress of long passes to `progress`.
pub fn run_pipeline_with(
    model: &mut Model,
    passes: &[PassSpec],
    overrides: &InputShapes,
    calibration: Option<&crate::refit::Calibration>,
    progress: &dyn crate::progress::Progress,
    mut on_done: impl FnMut(&PassReport),
) -> Result<Vec<PassReport>> {
    let mut shapes = crate::validate::validate(&model.graph, overrides)?;
    let mut reports = Vec::new();
    // Exporters' variants are canonicalized first (exact), before anything
    // is kept as a reference; it is reported only if it changed something.
    // Budgets are shares of the weights of the model as given (or as a
    // leading `retarget` made it: the task model).
    let mut start_params = crate::stats::from_shapes(&model.graph, &shapes).params;
    let implicit = !passes.is_empty() && !matches!(passes[0], PassSpec::Canonicalize(_));
    if implicit {
        let spec = PassSpec::Canonicalize(Default::default());
        let report = run_one(model, &spec, &mut shapes, overrides, None, None, None, progress)?;
        if !report.changed.is_empty() {
            on_done(&report);
            reports.push(report);
        }
    }
    // Leading `retarget` (and `canonicalize`) passes make the model the
    // others start from: the teacher of `distill` is the retargeted model.
    let lead = passes.iter().take_while(|p| matches!(p, PassSpec::Retarget(_) | PassSpec::Canonicalize(_))).count();
    for spec in &passes[..lead] {
        let report = run_one(model, spec, &mut shapes, overrides, None, calibration, None, progress)?;
        if matches!(spec, PassSpec::Retarget(_)) {
            start_params = report.params_after;
        }
        on_done(&report);
        reports.push(report);
    }
    let to_original = calibration.is_some_and(|c| c.reference == RefitReference::Original);
    let original = (passes.iter().any(PassSpec::needs_original) || to_original).then(|| model.clone());
    let original_shapes = to_original.then(|| shapes.clone());
    // A `prune.budget` holds for the rest of the pipeline too (distill's
    // BN fold gives bias-free convs a bias).
    let mut promise: Option<u64> = None;
    for (i, spec) in passes.iter().enumerate().skip(lead) {
        promise = prune_limit(spec, start_params).or(promise);
        let (spec, budget_note) =
            fit_budget(model, &passes[i..], start_params, overrides, calibration.is_some()).map_err(|e| after_pass(spec.name(), e))?;
        let lossy = calibration.is_some() && spec.lossy();
        let reference = lossy.then(|| refit_reference(model, &shapes, original.as_ref().zip(original_shapes.as_ref())));
        let mut report = run_one(model, &spec, &mut shapes, overrides, reference.as_deref(), calibration, original.as_ref(), progress)?;
        if let Some(note) = budget_note {
            report.changed.insert(0, Change { node: "(budget)".into(), what: note });
        }
        // The budget was fitted data-free, with room for the biases refits and BN folds add.
        if let Some(limit) = promise.filter(|&l| report.params_after > l) {
            let e = Error::Config(format!(
                "`prune.budget` promised at most {limit} weights, the model now keeps {} (biases added by refits or a BN fold): lower `budget`",
                report.params_after
            ));
            return Err(after_pass(spec.name(), e));
        }
        on_done(&report);
        reports.push(report);
    }
    if !passes.is_empty() {
        sync_value_info(model, &shapes);
    }
    Ok(reports)
}

/// `rest[0]` with its ratio lowered so that the model, after `rest`'s
/// lossy passes, keeps at most `lowrank.budget` of `start_params` weights
/// (see the `lowrank` module), and a note of what was chosen; `rest[0]`
/// itself when it has no budget.
fn fit_budget(
    model: &Model,
    rest: &[PassSpec],
    start_params: u64,
    overrides: &InputShapes,
    calibrated: bool,
) -> Result<(PassSpec, Option<String>)> {
    // The passes from here on that change the weight count, data-free,
    // later budgets resolved against this pipeline's start (not the trial's).
    let trial_steps = |first: PassSpec| -> Vec<PassSpec> {
        let mut steps: Vec<PassSpec> = rest.iter().filter(|p| p.sizes()).cloned().collect();
        steps[0] = first;
        for s in &mut steps[1..] {
            *s = prune_at(s, prune_limit(s, start_params).unwrap_or(0));
        }
        steps
    };
    let kept_with = |first: PassSpec| -> Result<u64> {
        let mut trial = model.clone();
        let reports = run_pipeline(&mut trial, &trial_steps(first), overrides, |_| {})?;
        Ok(reports.last().map_or(start_params, |r| r.params_after))
    };
    if let Some(limit) = prune_limit(&rest[0], start_params) {
        // Calibrated refits give a bias to every conv they fit, and a later
        // `distill` with `batchnorm: train` to every conv: room for those.
        let biases_later = calibrated || rest.iter().any(|p| matches!(p, PassSpec::Distill(_)));
        let room = if biases_later { missing_biases(&model.graph) } else { 0 };
        return fit_prune_budget(&rest[0], limit, room, start_params, kept_with);
    }
    let PassSpec::Lowrank(o) = &rest[0] else { return Ok((rest[0].clone(), None)) };
    let (Some(budget), Some(ratio)) = (o.budget, o.ratio) else { return Ok((rest[0].clone(), None)) };
    let with = |r: f64| PassSpec::Lowrank(lowrank::LowrankOptions { ratio: Some(r), budget: None, ..o.clone() });
    let kept = |r: f64| kept_with(with(r));
    let limit = limit_of(budget, start_params);
    let share = |p: u64| percent(p, start_params);
    let at_ratio = kept(ratio)?;
    if at_ratio <= limit {
        return Ok((rest[0].clone(), Some(format!("budget {:.2} %: ratio {ratio} keeps {:.2} %", 100.0 * budget, share(at_ratio)))));
    }
    let floor = 0.001;
    let at_floor = kept(floor)?;
    if at_floor > limit {
        return Err(Error::Config(format!(
            "`lowrank.budget` {budget} cannot be met: even at ratio {floor} the model keeps {:.2} % of its weights",
            share(at_floor)
        )));
    }
    // Largest ratio that fits: kept(lo) <= limit < kept(hi).
    let (mut lo, mut hi, mut at_lo) = (floor, ratio, at_floor);
    while hi - lo > 1e-4 {
        let mid = 0.5 * (lo + hi);
        let at_mid = kept(mid)?;
        if at_mid <= limit {
            (lo, at_lo) = (mid, at_mid);
        } else {
            hi = mid;
        }
    }
    let note = format!(
        "budget {:.2} %: ratio {ratio} would keep {:.2} %; lowered to {lo:.4}: {:.2} %",
        100.0 * budget,
        share(at_ratio),
        share(at_lo)
    );
    Ok((with(lo), Some(note)))
}

/// The weight count a budget b promises: ⌊b · start⌋.
fn limit_of(budget: f64, start_params: u64) -> u64 {
    (budget * start_params as f64).floor() as u64
}

/// `p` weights as a percentage of the pipeline's start.
fn percent(p: u64, start_params: u64) -> f64 {
    100.0 * p as f64 / start_params.max(1) as f64
}

/// The weight count a `prune: {budget: b}` promises.
fn prune_limit(spec: &PassSpec, start_params: u64) -> Option<u64> {
    match spec {
        PassSpec::Prune(o) => o.budget.map(|b| limit_of(b, start_params)),
        _ => None,
    }
}

/// `spec` with its `budget` replaced by the weight count `target` (other passes as they are).
fn prune_at(spec: &PassSpec, target: u64) -> PassSpec {
    match spec {
        PassSpec::Prune(o) if o.budget.is_some() => {
            PassSpec::Prune(prune::PruneOptions { budget: None, target_params: Some(target as f64), ..o.clone() })
        }
        other => other.clone(),
    }
}

/// Output channels of the Conv/Gemm layers without a bias: what refits may add.
fn missing_biases(graph: &crate::ir::Graph) -> u64 {
    let out_channels = |ix| {
        let node = graph.node(ix);
        node.input(1).and_then(|w| graph.constant(w)).map_or(0, |w| w.shape().first().copied().unwrap_or(0) as u64)
    };
    graph
        .node_indices()
        .into_iter()
        .filter(|&ix| matches!(graph.node(ix).op(), "Conv" | "Gemm") && graph.node(ix).input(2).is_none_or(str::is_empty))
        .map(out_channels)
        .sum()
}

/// `prune: {budget}` as a weight count that keeps the promise: the limit
/// less `room`, lowered by the overshoot of a data-free trial (biases added
/// by `compensate` are outside prune's cost model) until the trial fits.
fn fit_prune_budget(
    spec: &PassSpec,
    limit: u64,
    room: u64,
    start_params: u64,
    kept_with: impl Fn(PassSpec) -> Result<u64>,
) -> Result<(PassSpec, Option<String>)> {
    let share = |p: u64| percent(p, start_params);
    let fit = limit.saturating_sub(room).max(2);
    let (mut target, mut tried) = (fit, vec![]);
    for _ in 0..12 {
        let kept = kept_with(prune_at(spec, target))?;
        tried.push(format!("{target} -> {kept}"));
        if kept <= fit {
            let room = if room > 0 { format!(", {room} left for biases that refits or BN folds add") } else { String::new() };
            let note = format!(
                "budget {:.2} % of {start_params}: target_params {target} keeps {kept} ({:.2} %) data-free{room}",
                share(limit),
                share(kept)
            );
            return Ok((prune_at(spec, target), Some(note)));
        }
        // Lower by the overshoot, doubled on every try (removals come in steps).
        let step = (kept - fit) << (tried.len() - 1).min(20);
        target = target.saturating_sub(step).max(2);
    }
    Err(Error::Config(format!(
        "`prune.budget` {:.2} % ({limit} weights) cannot be met (target_params -> weights kept: {})",
        share(limit),
        tried.join(", ")
    )))
}

/// Runs one pass, drops the weights it orphaned, validates, and fills in
/// the report's counts; `shapes` become the graph's new shapes.
#[allow(clippy::too_many_arguments)]
fn run_one(
    model: &mut Model,
    spec: &PassSpec,
    shapes: &mut Shapes,
    overrides: &InputShapes,
    reference: Option<&Model>,
    calibration: Option<&crate::refit::Calibration>,
    original: Option<&Model>,
    progress: &dyn crate::progress::Progress,
) -> Result<PassReport> {
    let started = std::time::Instant::now();
    let before = crate::stats::from_shapes(&model.graph, shapes);
    let ctx = PassContext { shapes, reference, calibration, original, progress };
    let mut report = spec.run(model, &ctx).map_err(|e| after_pass(spec.name(), e))?;
    model.graph.drop_unused_weights();
    *shapes = crate::validate::validate(&model.graph, overrides).map_err(|e| after_pass(spec.name(), e))?;
    let after = crate::stats::from_shapes(&model.graph, shapes);
    report.pass = spec.name().to_string();
    (report.params_before, report.params_after) = (before.params, after.params);
    (report.macs_before, report.macs_after) = (before.macs, after.macs);
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn after_pass(pass: &str, e: Error) -> Error {
    match e {
        Error::AfterPass { .. } => e,
        e => Error::AfterPass { pass: pass.to_string(), source: Box::new(e) },
    }
}

/// Keeps value_info truthful after rewrites: entries of tensors that no
/// longer exist go, changed dimensions are updated (symbolic ones stay).
fn sync_value_info(model: &mut Model, shapes: &Shapes) {
    use crate::onnx::{tensor_shape_proto::dimension::Value as Dim, type_proto::Value as Ty, ValueInfoProto};
    let update = |vi: &mut ValueInfoProto| {
        let Some(shape) = shapes.get(vi.name()).and_then(|t| t.shape.as_ref()) else { return };
        let Some(Ty::TensorType(t)) = vi.r#type.as_mut().and_then(|t| t.value.as_mut()) else { return };
        let Some(s) = t.shape.as_mut() else { return };
        if s.dim.len() != shape.len() {
            return;
        }
        for (d, &n) in s.dim.iter_mut().zip(shape) {
            if let Some(Dim::DimValue(v)) = &mut d.value {
                *v = n as i64;
            }
        }
    };
    let meta = &mut model.graph.meta;
    meta.value_info.retain(|vi| shapes.contains_key(vi.name()));
    meta.value_info.iter_mut().for_each(update);
    meta.output.iter_mut().for_each(update);
}
