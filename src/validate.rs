//! Structural and shape validation of the IR, run after loading and after
//! every pass: every input is defined, edges agree with the names, there is
//! no cycle, the graph outputs exist, and shape inference succeeds (which
//! checks that weights fit their consumers).
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::shape::{self, InputShapes, Shapes};
use std::collections::HashSet;

/// Validates `graph` and returns the inferred shapes.
pub fn validate(graph: &Graph, overrides: &InputShapes) -> Result<Shapes> {
    check_defined(graph)?;
    check_edges(graph)?;
    graph.topo_order()?;
    shape::infer(graph, overrides)
}

fn check_defined(graph: &Graph) -> Result<()> {
    let mut defined: HashSet<&str> = graph.weights().keys().map(String::as_str).collect();
    defined.extend(graph.meta.input.iter().map(|i| i.name()));
    for ix in graph.node_indices() {
        defined.extend(graph.node(ix).outputs().iter().map(String::as_str));
    }
    for ix in graph.node_indices() {
        let node = graph.node(ix);
        // Nodes with subgraphs may read outer-scope names we do not track here.
        for name in node.inputs().iter().filter(|n| !n.is_empty()) {
            if !defined.contains(name.as_str()) {
                return Err(Error::invalid(format!(
                    "node `{}` ({}) reads `{name}`, which no node, input or initializer defines",
                    node.name(),
                    node.op()
                )));
            }
        }
    }
    for out in &graph.meta.output {
        if !defined.contains(out.name()) {
            return Err(Error::invalid(format!("graph output `{}` is not defined", out.name())));
        }
    }
    Ok(())
}

/// Edges must be exactly what the names say (guards the IR's own bookkeeping).
fn check_edges(graph: &Graph) -> Result<()> {
    for (from, to, w) in graph.wires() {
        let (from, to) = (graph.node(from), graph.node(to));
        if from.output(w.from_slot) != Some(w.name.as_str()) || to.input(w.to_slot) != Some(w.name.as_str()) {
            return Err(Error::invalid(format!("dangling edge `{}` from `{}` to `{}`", w.name, from.name(), to.name())));
        }
    }
    Ok(())
}
