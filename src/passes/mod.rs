//! Graph passes and the pipeline that runs them. Each pass lives in its own
//! file (named verb_object) opening with its spec; each returns a
//! [`PassReport`] of what it changed and what it declined, and the pipeline
//! validates the graph after every pass, naming the pass in any error.
pub mod dependency;
pub mod distill_model;
pub mod factorize_depthwise;
pub mod factorize_lowrank;
pub mod fold_batchnorm;
pub mod importance;
pub mod prune_channels;

use crate::config::{PassSpec, RefitReference};
use crate::error::{Error, Result};
use crate::ir::Model;
use crate::shape::{InputShapes, Shapes};
use serde::Serialize;

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
    pub calibration: Option<&'a crate::recover::Calibration>,
    /// The model as it was loaded (the teacher of `distill`; only kept
    /// when the pipeline distills).
    pub original: Option<&'a Model>,
}

impl PassContext<'_> {
    /// Refits `layers` of `graph` against the pre-pass model, when calibrating.
    pub fn recover(&self, graph: &mut crate::ir::Graph, layers: Vec<crate::recover::Layer>, report: &mut PassReport) -> Result<()> {
        let Some(calib) = self.calibration else { return Ok(()) };
        self.recover_with(graph, layers, report, |g, layer, x, y| {
            let (before, after) = crate::recover::solve_layer(g, layer.node, x, y, crate::recover::Fit::for_layer(calib, g, layer.node))?;
            Ok((g.node(layer.node).name().to_string(), before, after))
        })
    }

    /// [`recover`](Self::recover) with a custom per-layer solver (see
    /// [`crate::recover::refit_with`]).
    pub fn recover_with(
        &self,
        graph: &mut crate::ir::Graph,
        layers: Vec<crate::recover::Layer>,
        report: &mut PassReport,
        solver: impl FnMut(&mut crate::ir::Graph, &crate::recover::Layer, &[f32], &[f32]) -> Result<(String, f64, f64)>,
    ) -> Result<()> {
        let (Some(calib), Some(reference)) = (self.calibration, self.reference) else { return Ok(()) };
        let mut model = Model { proto: reference.proto.clone(), graph: std::mem::take(graph) };
        let layers = crate::recover::refittable(&model.graph, layers);
        let result = crate::recover::refit_with(reference, &mut model, &layers, calib, solver);
        *graph = model.graph;
        for (layer, before, after) in result? {
            report.change(&layer, format!("refit: relative error {before:.4} -> {after:.4}"));
        }
        Ok(())
    }
}

/// The model a lossy pass refits against: the original (with its shapes)
/// when given and every tensor both graphs have still has its original
/// shape, else a copy of the model as it is now.
fn refit_reference<'a>(model: &Model, shapes: &Shapes, original: Option<(&'a Model, &Shapes)>) -> std::borrow::Cow<'a, Model> {
    match original {
        Some((o, o_shapes)) if o_shapes.iter().all(|(name, t)| shapes.get(name).is_none_or(|now| now.shape == t.shape)) => std::borrow::Cow::Borrowed(o),
        _ => std::borrow::Cow::Owned(model.clone()),
    }
}

/// Runs the passes in order, validating after each one.
pub fn run_pipeline(model: &mut Model, passes: &[PassSpec], overrides: &InputShapes, on_done: impl FnMut(&PassReport)) -> Result<Vec<PassReport>> {
    run_pipeline_calibrated(model, passes, overrides, None, on_done)
}

/// `run_pipeline` with calibration images for the data-aware passes.
pub fn run_pipeline_calibrated(
    model: &mut Model,
    passes: &[PassSpec],
    overrides: &InputShapes,
    calibration: Option<&crate::recover::Calibration>,
    mut on_done: impl FnMut(&PassReport),
) -> Result<Vec<PassReport>> {
    let mut shapes = crate::validate::validate(&model.graph, overrides)?;
    let mut reports = Vec::new();
    let to_original = calibration.is_some_and(|c| c.reference == RefitReference::Original);
    let distills = passes.iter().any(|p| matches!(p, PassSpec::Distill(o) if o.teacher.is_none()));
    let original = (distills || to_original).then(|| model.clone());
    let original_shapes = to_original.then(|| shapes.clone());
    for spec in passes {
        let started = std::time::Instant::now();
        let before = crate::stats::from_shapes(&model.graph, &shapes);
        let lossy = calibration.is_some() && matches!(spec, PassSpec::Prune(_) | PassSpec::Dw(_) | PassSpec::Lowrank(_));
        let reference = lossy.then(|| refit_reference(model, &shapes, original.as_ref().zip(original_shapes.as_ref())));
        let ctx = PassContext { shapes: &shapes, reference: reference.as_deref(), calibration, original: original.as_ref() };
        let mut report = match spec {
            PassSpec::Fold(o) => fold_batchnorm::run(&mut model.graph, &ctx, o),
            PassSpec::Prune(o) => prune_channels::run(&mut model.graph, &ctx, o),
            PassSpec::Dw(o) => factorize_depthwise::run(&mut model.graph, &ctx, o),
            PassSpec::Lowrank(o) => factorize_lowrank::run(&mut model.graph, &ctx, o),
            PassSpec::Distill(o) => distill_model::run(&mut model.graph, &ctx, o),
        }
        .map_err(|e| after_pass(spec.name(), e))?;
        model.graph.drop_unused_weights();
        shapes = crate::validate::validate(&model.graph, overrides).map_err(|e| after_pass(spec.name(), e))?;
        let after = crate::stats::from_shapes(&model.graph, &shapes);
        report.pass = spec.name().to_string();
        (report.params_before, report.params_after) = (before.params, after.params);
        (report.macs_before, report.macs_after) = (before.macs, after.macs);
        report.seconds = started.elapsed().as_secs_f64();
        on_done(&report);
        reports.push(report);
    }
    if !passes.is_empty() {
        sync_value_info(model, &shapes);
    }
    Ok(reports)
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
