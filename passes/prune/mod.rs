//! Pass `prune`: structured channel pruning over coupled channel groups.
//!
//! Before:  conv A (C→M) → BN → Relu → conv B (M→N)
//! After:   conv A (C→M') → BN(M') → Relu → conv B (M'→N)   with M' < M
//! and likewise for a residual stream: every conv writing into a stage's
//! chain of Adds, the downsample conv, and every conv (and the final Gemm,
//! through GlobalAveragePool/Flatten) reading from it lose the same channels.
//!
//! 1. [`ChannelGraph`](super::dependency::ChannelGraph) ties channels; a
//!    class is a set of tied channels, a group the tensors they span.
//! 2. Importance: each producer filter's score (`l1`/`l2` of its weights,
//!    times |γ/√(σ²+ε)| when a BN follows), divided by its layer's mean,
//!    summed over the class's producers, then divided by the group's mean.
//! 3. Allocation. `ratio: r` removes ⌊r·n⌋ of each group's n classes.
//!    `target_macs`/`target_params: f` removes channels until MACs/params
//!    are at most f of the original (`target_params` above 1: until the
//!    whole model has at most that many weights, e.g. the paper's 4.08 M as
//!    `4080000`), costed exactly by per-layer formulas. `budget: b`
//!    instead: the model keeps at most a share b of the weights the
//!    *pipeline* started with (the task model, whatever passes ran before:
//!    `dw` then `prune: {budget: 0.2}` lands on 1/5 of the original); the
//!    pipeline turns it into a weight count, tries it data-free on a copy
//!    and lowers the count until the pruned model holds the promise (the
//!    biases `compensate` adds are not in the cost model), and reports
//!    the count it chose. Allocation:
//!    `allocation: global` (default) removes the globally least important
//!    classes (by the normalized score above; a bisection on one score
//!    threshold), `allocation: uniform` the same share r of every group
//!    (a bisection on r). Measured on ResNet-50 at 70 % of the MACs (inner,
//!    reconstruction, calibrated): uniform 0.668 top-1, global 0.560. Every group keeps at least
//!    `min_channels` and a multiple of `round_to` channels. `scope: inner`
//!    prunes only groups not tied through an Add/Concat (bottleneck
//!    insides); `ignore` keeps the groups of the named nodes' outputs;
//!    `min_resolution`/`max_resolution` keep every group with a tensor
//!    outside that range of heights (a budget per stage, as in `dw`: the
//!    stem and the 56-pixel stream are `min_resolution: 56`).
//!    Without options: `ratio: 0.25`, `scope: all`, `importance: l1`.
//! 4. Apply: producers lose output filters (weight rows, bias), BN and other
//!    per-channel parameters lose entries, depthwise convs lose both (and
//!    their group count shrinks), consumers lose input columns.
//! 5. Data-free compensation (`compensate`, default on): a removed channel is
//!    taken as its constant part — its producer's bias pushed through the
//!    BN/activation/pool/Add chain — and W[:, c]·Σkernel · value is added to
//!    each consumer's bias. Exact for 1x1 consumers when the removed filters
//!    are zero; approximate at zero-padded borders of KxK consumers.
//!
//! 6. `importance: reconstruction` (with `calibration`; without, `l1` is
//!    used and the report says so): the allocation
//!    above runs on `l1` scores, then every group whose channels all reach
//!    one dense conv as its inputs (a bottleneck's insides) is chosen on
//!    data instead: during the layer-by-layer refit (`src/refit/mod.rs`) that
//!    conv drops its share of input channels by least reconstruction cost
//!    with the refit included (group Optimal Brain Surgeon,
//!    `src/refit/obs.rs`); the dropped inputs' weights are zero, so their
//!    producers' filters are then removed exactly. Other groups keep `l1`.
//!    `refit: all` refits every conv, not only the changed ones (later
//!    layers see drifted inputs).
//!
//! Declines (the group stays whole): channels touching graph inputs/outputs,
//! unknown ops, Reshape/Transpose, grouped non-depthwise convs, shared,
//! dynamic or non-f32 weights.
mod allocate;
mod apply;
mod compensate;
mod cost;
pub mod dependency;
pub mod importance;
mod on_data;

use super::factorize::height_within;
use super::{check_unit, Pass, PassContext, PassReport, Refit};
use crate::error::{Error, Result};
use crate::ir::{Graph, Model, Weight};
use crate::shape::Shapes;
use allocate::*;
use apply::*;
use compensate::*;
use cost::*;
use dependency::{per_channel_axis, ChannelGraph, Role, UnionFind};
use importance::{output_axis, producer_scores};
use ndarray::{ArrayD, Axis};
use on_data::*;
use petgraph::stable_graph::NodeIndex;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Importance {
    #[default]
    L1,
    L2,
    /// Data-driven: per layer, drop the input channels whose loss the
    /// refit compensates best (needs calibration; see `src/refit/obs.rs`).
    Reconstruction,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    All,
    Inner,
}

/// How `target_macs`/`target_params` spread the removals over the groups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    /// Remove the globally least important channels (normalized scores).
    #[default]
    Global,
    /// Remove the same share of every group's channels.
    Uniform,
}

/// Options of `prune`; see the module documentation for their meaning.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PruneOptions {
    pub ratio: Option<f64>,
    pub target_macs: Option<f64>,
    pub target_params: Option<f64>,
    /// At most this share of the pipeline's starting weights (see module doc).
    pub budget: Option<f64>,
    pub importance: Importance,
    pub allocation: Allocation,
    pub refit: Refit,
    pub scope: Scope,
    pub round_to: usize,
    pub min_channels: usize,
    pub ignore: Vec<String>,
    pub compensate: bool,
    /// Only groups whose every tensor is at least / at most this many
    /// pixels high (a flattened tensor counts as 1): pruning per stage.
    pub min_resolution: Option<usize>,
    pub max_resolution: Option<usize>,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            ratio: None,
            target_macs: None,
            target_params: None,
            budget: None,
            importance: Importance::L1,
            allocation: Allocation::Global,
            refit: Refit::Changed,
            scope: Scope::All,
            round_to: 1,
            min_channels: 1,
            ignore: vec![],
            compensate: true,
            min_resolution: None,
            max_resolution: None,
        }
    }
}

/// The `prune` pass.
pub struct Prune;

impl Pass for Prune {
    const NAME: &'static str = "prune";
    const LOSSY: bool = true;
    type Options = PruneOptions;

    fn validate(o: &PruneOptions) -> Result<()> {
        check_unit("prune", "ratio", o.ratio)?;
        check_unit("prune", "target_macs", o.target_macs)?;
        // `target_params` above 1 is a weight count (the paper's 4.08 M: 4080000).
        match o.target_params {
            Some(p) if p > 1.0 && p.is_finite() && p.fract() == 0.0 => {}
            Some(p) if p > 1.0 => {
                return Err(Error::Config(format!("`prune.target_params` is {p}: a share in (0, 1] or a whole number of weights")))
            }
            other => check_unit("prune", "target_params", other)?,
        }
        check_unit("prune", "budget", o.budget)?;
        let set = [o.ratio, o.target_macs, o.target_params, o.budget].iter().filter(|v| v.is_some()).count();
        if set > 1 {
            return Err(Error::Config("`prune` takes only one of `ratio`, `target_macs`, `target_params`, `budget`".into()));
        }
        if let (Some(min), Some(max)) = (o.min_resolution, o.max_resolution) {
            if min > max {
                return Err(Error::Config(format!(
                    "`prune.min_resolution` is {min}, above `prune.max_resolution` ({max}): no group can match"
                )));
            }
        }
        if o.round_to == 0 || o.min_channels == 0 {
            return Err(Error::Config("`prune.round_to` and `prune.min_channels` must be at least 1".into()));
        }
        Ok(())
    }

    fn run(model: &mut Model, ctx: &PassContext, options: &PruneOptions) -> Result<PassReport> {
        prune(model, ctx, options)
    }
}

fn prune(model: &mut Model, ctx: &PassContext, opts: &PruneOptions) -> Result<PassReport> {
    if opts.budget.is_some() {
        // A pipeline turns it into `target_params` first (passes/mod.rs, fit_budget).
        return Err(Error::Config("`prune.budget` is a share of a pipeline's starting weights: run `prune` in a pipeline".into()));
    }
    let mut report = PassReport::default();
    let graph = &mut model.graph;
    let cg = ChannelGraph::build(graph, ctx.shapes);
    let (classes, groups) = classes(graph, ctx.shapes, &cg, opts);
    let removed = select(graph, ctx.shapes, &cg, &classes, groups, opts);
    let deferred = match opts.importance {
        // Data-free (e.g. the `cresnet` pipeline without calibration): the l1 choice stands.
        Importance::Reconstruction if ctx.calibration.is_none() => {
            report.decline("(all)", "importance: reconstruction needs calibration images (a `calibration:` section); used l1");
            vec![]
        }
        Importance::Reconstruction => deferred_groups(graph, &cg, &classes, &removed),
        _ => vec![],
    };
    let removed_roots: HashSet<usize> =
        removed.iter().filter(|&&i| !deferred.iter().any(|d| d.group == classes[i].group)).map(|&i| classes[i].root).collect();
    let per_tensor = removed_channels(&cg, &removed_roots);
    if opts.compensate {
        compensate(graph, &cg, &per_tensor);
    }
    let mut refit = refit_layers(graph, &cg, &per_tensor);
    apply(graph, ctx.shapes, &cg, &per_tensor, &mut report)?;
    let extra: Vec<NodeIndex> = match opts.refit {
        Refit::Changed => deferred.iter().map(|d| d.consumer).collect(),
        Refit::All => graph.node_indices().into_iter().filter(|&ix| graph.node(ix).op() == "Conv").collect(),
    };
    let missing: Vec<crate::refit::Layer> =
        extra.into_iter().filter(|&ix| !refit.iter().any(|l| l.node == ix)).map(|node| crate::refit::Layer { node, kept: None }).collect();
    refit.extend(missing);
    sort_topologically(graph, &mut refit);
    if deferred.is_empty() {
        ctx.refit(model, refit, &mut report)?;
    } else {
        let chosen = select_on_data(model, ctx, refit, &deferred, &mut report)?;
        remove_dead_inputs(&mut model.graph, &chosen, &mut report)?;
    }
    for (tensor, reason) in cg.block_reasons.iter().filter(|(t, _)| !t.is_empty()) {
        report.decline(tensor, reason.clone());
    }
    report.declined.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(report)
}
