//! Pass `fold`: fold inference-mode BatchNormalization into the Conv or Gemm before it.
//!
//! Before:  X → Conv(W, b) → c → BatchNormalization(γ, β, μ, σ², ε) → y
//! After:   X → Conv(W', b') → y
//!
//! with, per output channel m, s = γ/√(σ²+ε):  W'[m] = W[m]·s,  b' = (b − μ)·s + β
//! (b = 0 when the conv has no bias). For Gemm (Y = α·A·B + β_g·C) the scale
//! applies per output column: B' scales column n (row n with transB), and
//! C' = (β_g·C − μ)·s + β with β_g set to 1.
//!
//! Applies to any group count (depthwise too: tract does not fold BN into
//! depthwise convs itself). BN from opsets 9, 14 and 15 (training_mode = 0).
//! Declines, with the reason, when: a BN parameter or the conv/Gemm weights
//! are not constant initializers, the producer's output has another reader or
//! is a graph output, the producer's weight is shared, the dtype is not
//! f32/f64, the BN is in training mode or has extra outputs in use.
use super::{Pass, PassContext, PassReport};
use crate::error::Result;
use crate::ir::{Data, Graph, Model, Weight};
use petgraph::stable_graph::NodeIndex;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FoldOptions {}

/// The `fold` pass.
pub struct Fold;

impl Pass for Fold {
    const NAME: &'static str = "fold";
    type Options = FoldOptions;

    fn run(model: &mut Model, _ctx: &PassContext, _options: &FoldOptions) -> Result<PassReport> {
        fold_all(&mut model.graph)
    }
}

/// A BN's per-channel affine form y = s·x + t.
struct Affine {
    scale: Vec<f64>,
    shift: Vec<f64>,
}

fn fold_all(graph: &mut Graph) -> Result<PassReport> {
    let mut report = PassReport::default();
    let bns: Vec<NodeIndex> =
        graph.topo_order()?.into_iter().filter(|&ix| graph.node(ix).op() == "BatchNormalization" && graph.node(ix).is_standard()).collect();
    for bn in bns {
        let name = graph.node(bn).name().to_string();
        match plan(graph, bn) {
            Ok((producer, affine)) => {
                let what = apply(graph, producer, bn, &affine)?;
                report.change(&name, what);
            }
            Err(reason) => report.decline(&name, reason),
        }
    }
    Ok(report)
}

/// Checks that `bn` can be folded; returns its producer and affine form.
fn plan(graph: &Graph, bn: NodeIndex) -> std::result::Result<(NodeIndex, Affine), String> {
    let node = graph.node(bn);
    if node.attr_int("training_mode").unwrap_or(0) != 0 {
        return Err("training_mode = 1".into());
    }
    if node.outputs().iter().skip(1).any(|o| !o.is_empty() && graph.use_count(o) > 0) {
        return Err("its running-statistics outputs are used".into());
    }
    let input = node.input(0).ok_or("no input")?;
    let (producer, _) = graph.producer(input).ok_or("its input is not produced by a node")?;
    let p = graph.node(producer);
    if !p.is_standard() || !matches!(p.op(), "Conv" | "Gemm") {
        return Err(format!("its input comes from {} `{}`, not Conv or Gemm", p.op(), p.name()));
    }
    if graph.use_count(input) != 1 {
        return Err(format!("the output of `{}` has other readers", p.name()));
    }
    for slot in [1, 2] {
        if let Some(w) = p.input(slot) {
            if graph.constant(w).is_none() {
                return Err(format!("`{w}` of `{}` is not a constant initializer", p.name()));
            }
            if graph.consumers(w).len() != 1 {
                return Err(format!("weight `{w}` of `{}` is shared with another node", p.name()));
            }
        }
    }
    let affine = affine(graph, node)?;
    let w = p.input(1).and_then(|w| graph.constant(w)).ok_or("producer has no constant weight")?;
    if !matches!(w.data(), Data::F32(_) | Data::F64(_)) {
        return Err(format!("weight dtype {} is not f32/f64", w.dtype()));
    }
    Ok((producer, affine))
}

fn affine(graph: &Graph, bn: &crate::ir::Node) -> std::result::Result<Affine, String> {
    let param = |slot: usize| -> std::result::Result<Vec<f64>, String> {
        let name = bn.input(slot).ok_or_else(|| format!("missing input {slot}"))?;
        let w = graph.constant(name).ok_or_else(|| format!("`{name}` is not a constant initializer"))?;
        Weight::to_f64_vec(w).ok_or_else(|| format!("`{name}` has dtype {}, not f32/f64", w.dtype()))
    };
    let (gamma, beta, mean, var) = (param(1)?, param(2)?, param(3)?, param(4)?);
    let eps = bn.attr_float("epsilon").unwrap_or(1e-5) as f64;
    let scale = crate::ir::batchnorm::scale(&gamma, &var, eps);
    let shift = beta.iter().zip(&mean).zip(&scale).map(|((b, m), s)| b - m * s).collect();
    Ok(Affine { scale, shift })
}

/// Rewrites the producer's weights and takes the BN out of the graph.
fn apply(graph: &mut Graph, producer: NodeIndex, bn: NodeIndex, a: &Affine) -> Result<String> {
    let p = graph.node(producer).clone();
    let is_gemm = p.op() == "Gemm";
    let weight_name = p.input(1).expect("planned").to_string();
    let bias = p.input(2).and_then(|b| graph.constant(b)).and_then(Weight::to_f64_vec);
    let gemm_beta = if is_gemm { p.attr_float("beta").unwrap_or(1.0) as f64 } else { 1.0 };
    let n = a.scale.len();
    let old_bias: Vec<f64> = match bias {
        Some(b) if b.len() == n => b.iter().map(|v| v * gemm_beta).collect(),
        Some(b) if b.len() == 1 => vec![b[0] * gemm_beta; n],
        _ => vec![0.0; n],
    };
    let new_bias: Vec<f64> = old_bias.iter().zip(&a.scale).zip(&a.shift).map(|((b, s), t)| b * s + t).collect();
    let trans_b = is_gemm && p.attr_int("transB").unwrap_or(0) == 1;
    let w = graph.weight_mut(&weight_name).expect("planned");
    // Conv weights and transposed Gemm weights scale along axis 0, plain Gemm along axis 1.
    scale_axis(w, if is_gemm && !trans_b { 1 } else { 0 }, &a.scale);
    let dtype_is_f64 = matches!(w.data(), Data::F64(_));
    let bias_name = match p.input(2) {
        Some(b) => b.to_string(),
        None => graph.fresh_name(&format!("{}.bias", p.name())),
    };
    let bias_weight = bias_tensor(&bias_name, &new_bias, dtype_is_f64, graph.weight(&bias_name));
    graph.insert_weight(bias_name.clone(), bias_weight)?;
    let bn_out = graph.node(bn).outputs()[0].clone();
    graph.remove_node(bn)?;
    graph.update_node(producer, |node| {
        node.proto.output[0] = bn_out;
        if node.proto.input.len() < 3 {
            node.proto.input.resize(3, String::new());
        }
        node.proto.input[2] = bias_name;
        if is_gemm {
            node.proto.attribute.retain(|at| at.name() != "beta");
        }
    })?;
    Ok(format!("folded into {} `{}`", p.op(), p.name()))
}

/// Multiplies the slices of `w` along `axis` by `scale`.
fn scale_axis(w: &mut Weight, axis: usize, scale: &[f64]) {
    match w.data_mut() {
        Data::F32(a) => {
            a.axis_iter_mut(ndarray::Axis(axis)).zip(scale).for_each(|(mut row, &s)| row.mapv_inplace(|v| (v as f64 * s) as f32))
        }
        Data::F64(a) => a.axis_iter_mut(ndarray::Axis(axis)).zip(scale).for_each(|(mut row, &s)| row.mapv_inplace(|v| v * s)),
        _ => {}
    }
}

/// The new bias, keeping the old tensor's metadata when there was one.
fn bias_tensor(name: &str, values: &[f64], as_f64: bool, old: Option<&Weight>) -> Weight {
    let mut w = Weight::from_f32(name, ndarray::Array1::from_iter(values.iter().map(|&v| v as f32)).into_dyn());
    if let Some(old) = old {
        w.proto = old.proto.clone();
    }
    if as_f64 {
        w.proto.data_type = Some(crate::onnx::tensor_proto::DataType::Double as i32);
        w.set_data(Data::F64(ndarray::Array1::from_vec(values.to_vec()).into_dyn()));
    }
    w
}
