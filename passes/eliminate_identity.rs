//! Pass `eliminate_identity`: removes nodes that pass their input through
//! unchanged — `Identity`, and `Dropout` at inference (exporters leave both
//! behind: torch's dynamo exporter writes Identity for aliased tensors,
//! Keras and older torch exports keep Dropout before the classifier).
//!
//! Before:  X → Identity (or Dropout) → Y → readers of Y
//! After:   X → readers of Y (each now reads X)
//!
//! Applies to nodes of the default domain without subgraphs. Declines, with
//! the reason, when: Y is a graph output (its name is the model's interface;
//! X cannot take it), the graph has subgraphs (If/Loop/Scan bodies may read Y
//! from the outer scope, which the graph's wires do not show), a Dropout's
//! mask output is read, or a Dropout's `training_mode` input is not a
//! constant false.
use super::{Pass, PassContext, PassReport};
use crate::error::Result;
use crate::ir::{Data, Graph, Model, Weight};
use petgraph::stable_graph::NodeIndex;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EliminateIdentityOptions {}

/// The `eliminate_identity` pass.
pub struct EliminateIdentity;

impl Pass for EliminateIdentity {
    const NAME: &'static str = "eliminate_identity";
    type Options = EliminateIdentityOptions;

    fn run(model: &mut Model, _ctx: &PassContext, _options: &EliminateIdentityOptions) -> Result<PassReport> {
        let graph = &mut model.graph;
        let mut report = PassReport::default();
        let candidates: Vec<NodeIndex> = graph.topo_order()?.into_iter().filter(|&ix| is_pass_through(graph, ix)).collect();
        // Removing nodes adds no subgraph: look once, not per candidate.
        let has_subgraphs = graph.nodes().any(|n| n.has_subgraph());
        for ix in candidates {
            let name = graph.node(ix).name().to_string();
            match plan(graph, ix, has_subgraphs) {
                Ok((x, y)) => {
                    bypass(graph, ix, &x, &y)?;
                    report.change(&name, format!("removed: its readers read `{x}`"));
                }
                Err(reason) => report.decline(&name, reason),
            }
        }
        Ok(report)
    }
}

fn is_pass_through(graph: &Graph, ix: NodeIndex) -> bool {
    let node = graph.node(ix);
    node.is_standard() && !node.has_subgraph() && matches!(node.op(), "Identity" | "Dropout")
}

/// The tensor the node reads and the one it writes, if it can go.
fn plan(graph: &Graph, ix: NodeIndex, has_subgraphs: bool) -> std::result::Result<(String, String), String> {
    let node = graph.node(ix);
    let x = node.input(0).ok_or("no input")?.to_string();
    let y = node.output(0).ok_or("no output")?.to_string();
    if graph.is_graph_output(&y) {
        return Err(format!("its output `{y}` is a graph output"));
    }
    if has_subgraphs {
        return Err(format!("the graph has subgraphs, which may read `{y}` from the outer scope"));
    }
    if node.op() == "Dropout" {
        if node.output(1).is_some_and(|mask| graph.use_count(mask) > 0) {
            return Err("its mask output is read".into());
        }
        if let Some(mode) = node.input(2) {
            if !graph.constant(mode).is_some_and(all_zero) {
                return Err(format!("`training_mode` input `{mode}` is not a constant false"));
            }
        }
    }
    Ok((x, y))
}

/// Whether a constant (a bool `training_mode`, stored as bytes or int32s) is all false.
fn all_zero(w: &Weight) -> bool {
    match w.data() {
        Data::F32(a) => a.iter().all(|&v| v == 0.0),
        Data::F64(a) => a.iter().all(|&v| v == 0.0),
        Data::I64(a) => a.iter().all(|&v| v == 0),
        Data::Other => w.proto.raw_data.as_ref().is_none_or(|b| b.iter().all(|&v| v == 0)) && w.proto.int32_data.iter().all(|&v| v == 0),
    }
}

/// Makes every reader of `y` read `x`, then removes the node.
fn bypass(graph: &mut Graph, ix: NodeIndex, x: &str, y: &str) -> Result<()> {
    for (reader, slot) in graph.consumers(y) {
        graph.update_node(reader, |n| n.proto.input[slot] = x.to_string())?;
    }
    graph.remove_node(ix)?;
    Ok(())
}
