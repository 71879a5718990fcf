//! Graph statistics: parameters, MACs, per-layer rows and per-stage totals.
//!
//! `params` counts the elements of every weight tensor (initializers and
//! Constant nodes). `macs` counts multiply-accumulates at the inferred shapes
//! (batch 1): Conv = output elements × C_in/group × kernel area;
//! Gemm/MatMul = rows × inner × columns.
use crate::error::Result;
use crate::ir::{Graph, Node};
use crate::shape::{InputShapes, Shapes};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Layer {
    pub name: String,
    pub op: String,
    pub output_shape: Option<Vec<usize>>,
    pub params: u64,
    pub macs: u64,
    /// This layer's share of the model's MACs.
    pub share: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    pub params: u64,
    pub macs: u64,
    pub nodes: usize,
    pub ops: BTreeMap<String, usize>,
    pub layers: Vec<Layer>,
}

/// One row of the per-stage view: layers grouped by the spatial size of
/// their output (ResNet stages are exactly the resolution steps).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stage {
    pub stage: String,
    pub params: u64,
    pub macs: u64,
}

pub fn compute(graph: &Graph, overrides: &InputShapes) -> Result<Stats> {
    let shapes = crate::shape::infer(graph, overrides)?;
    Ok(from_shapes(graph, &shapes))
}

pub fn from_shapes(graph: &Graph, shapes: &Shapes) -> Stats {
    let order = graph.topo_order().unwrap_or_else(|_| graph.node_indices());
    let mut layers: Vec<Layer> = order.iter().map(|&ix| layer(graph, graph.node(ix), shapes)).collect();
    let macs: u64 = layers.iter().map(|l| l.macs).sum();
    for l in &mut layers {
        l.share = if macs == 0 { 0.0 } else { l.macs as f64 / macs as f64 };
    }
    let constants: u64 = layers.iter().filter(|l| l.op == "Constant").map(|l| l.params).sum();
    let mut ops = BTreeMap::new();
    for l in &layers {
        *ops.entry(l.op.clone()).or_insert(0) += 1;
    }
    Stats {
        params: graph.weights().values().map(|w| w.len() as u64).sum::<u64>() + constants,
        macs,
        nodes: graph.node_count(),
        ops,
        layers,
    }
}

fn layer(graph: &Graph, node: &Node, shapes: &Shapes) -> Layer {
    let out = node.output(0).and_then(|n| shapes.get(n)).and_then(|t| t.shape.clone());
    let params = if node.op() == "Constant" {
        node.attr_tensor("value").map_or(0, |t| t.dims.iter().map(|&d| d.max(0) as u64).product())
    } else {
        node.inputs().iter().filter_map(|n| graph.weight(n)).map(|w| w.len() as u64).sum()
    };
    let input_shape = |slot: usize| node.input(slot).and_then(|n| shapes.get(n)).and_then(|t| t.shape.clone());
    Layer {
        name: node.name().to_string(),
        op: node.op().to_string(),
        macs: macs(node, out.as_deref(), &input_shape),
        output_shape: out,
        params,
        share: 0.0,
    }
}

fn macs(node: &Node, out: Option<&[usize]>, input: &dyn Fn(usize) -> Option<Vec<usize>>) -> u64 {
    let Some(out) = out else { return 0 };
    let elements: u64 = out.iter().map(|&d| d as u64).product();
    match node.op() {
        "Conv" => {
            let Some(w) = input(1) else { return 0 };
            // C_in/group × kernel area is exactly the weight's per-filter size.
            elements * w[1..].iter().map(|&d| d as u64).product::<u64>()
        }
        "Gemm" => {
            let Some(a) = input(0) else { return 0 };
            let inner = if node.attr_int("transA").unwrap_or(0) == 1 { a[0] } else { a.get(1).copied().unwrap_or(1) };
            elements * inner as u64
        }
        "MatMul" => input(0).and_then(|a| a.last().copied()).map_or(0, |k| elements * k as u64),
        _ => 0,
    }
}

/// Totals per output resolution, in order of first appearance.
pub fn stages(stats: &Stats) -> Vec<Stage> {
    let mut out: Vec<Stage> = Vec::new();
    for l in stats.layers.iter().filter(|l| l.params > 0 || l.macs > 0) {
        let key = match l.output_shape.as_deref() {
            Some([_, _, h, w, ..]) => format!("{h}x{w}"),
            Some(_) => "head".to_string(),
            None => "unknown".to_string(),
        };
        match out.iter_mut().find(|s| s.stage == key) {
            Some(s) => {
                s.params += l.params;
                s.macs += l.macs;
            }
            None => out.push(Stage { stage: key, params: l.params, macs: l.macs }),
        }
    }
    out
}
