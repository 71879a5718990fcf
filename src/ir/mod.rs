//! The intermediate representation: a `StableDiGraph` of ONNX ops whose edges
//! are the tensors flowing between them, plus the weights as ndarray arrays.
//!
//! Node protos keep their input/output *names* (the ONNX source of truth);
//! the edges and the producer map are derived from them. Every structural
//! change goes through [`Graph`]'s edit methods (`add_node`, `remove_node`,
//! `replace_node`, `update_node`), each of which re-links the graph and
//! fails when a tensor would be defined twice, so no caller can leave the
//! edges stale; [`crate::validate`] re-checks the whole after every pass. Every
//! field we do not interpret (attributes, doc strings, metadata, functions,
//! opsets, value_info, unknown ops and domains) is kept as the original proto.
pub mod batchnorm;
pub mod constant;
pub mod conv;
pub mod tensor;

use crate::error::{Error, Result};
use crate::onnx::{attribute_proto::AttributeType, AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto};
use indexmap::IndexMap;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::{BinaryHeap, HashMap, HashSet};
pub use tensor::{Data, Weight};

/// One op. Inputs and outputs are tensor names; "" marks an omitted optional input.
#[derive(Debug, Clone)]
pub struct Node {
    pub proto: NodeProto,
}

/// A tensor flowing from output `from_slot` of one node to input `to_slot` of another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wire {
    pub name: String,
    pub from_slot: usize,
    pub to_slot: usize,
}

impl Node {
    pub fn new(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            proto: NodeProto {
                op_type: Some(op.to_string()),
                name: Some(name.to_string()),
                input: inputs.iter().map(|s| s.to_string()).collect(),
                output: outputs.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        }
    }

    pub fn op(&self) -> &str {
        self.proto.op_type()
    }
    pub fn name(&self) -> &str {
        self.proto.name()
    }
    /// Ops of the default ONNX domain have an empty or "ai.onnx" domain.
    pub fn is_standard(&self) -> bool {
        matches!(self.proto.domain(), "" | "ai.onnx")
    }
    pub fn inputs(&self) -> &[String] {
        &self.proto.input
    }
    pub fn outputs(&self) -> &[String] {
        &self.proto.output
    }
    /// Input `slot`, or None when absent or omitted ("").
    pub fn input(&self, slot: usize) -> Option<&str> {
        self.proto.input.get(slot).map(String::as_str).filter(|s| !s.is_empty())
    }
    pub fn output(&self, slot: usize) -> Option<&str> {
        self.proto.output.get(slot).map(String::as_str).filter(|s| !s.is_empty())
    }
    pub fn attr(&self, name: &str) -> Option<&AttributeProto> {
        self.proto.attribute.iter().find(|a| a.name() == name)
    }
    pub fn attr_int(&self, name: &str) -> Option<i64> {
        self.attr(name).and_then(|a| a.i)
    }
    pub fn attr_float(&self, name: &str) -> Option<f32> {
        self.attr(name).and_then(|a| a.f)
    }
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }
    pub fn attr_str(&self, name: &str) -> Option<String> {
        self.attr(name).and_then(|a| a.s.as_ref()).map(|s| String::from_utf8_lossy(s).into_owned())
    }
    pub fn attr_tensor(&self, name: &str) -> Option<&TensorProto> {
        self.attr(name).and_then(|a| a.t.as_ref())
    }
    /// Whether any attribute holds a subgraph (If/Loop/Scan bodies).
    pub fn has_subgraph(&self) -> bool {
        self.proto.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty())
    }

    pub fn set_attr_int(&mut self, name: &str, value: i64) {
        self.set_attr(AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Int as i32),
            i: Some(value),
            ..Default::default()
        });
    }
    pub fn set_attr_ints(&mut self, name: &str, values: &[i64]) {
        self.set_attr(AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Ints as i32),
            ints: values.to_vec(),
            ..Default::default()
        });
    }
    pub fn set_attr_str(&mut self, name: &str, value: &str) {
        self.set_attr(AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::String as i32),
            s: Some(value.as_bytes().to_vec().into()),
            ..Default::default()
        });
    }
    fn set_attr(&mut self, attr: AttributeProto) {
        match self.proto.attribute.iter_mut().find(|a| a.name == attr.name) {
            Some(slot) => *slot = attr,
            None => self.proto.attribute.push(attr),
        }
    }
}

/// The computation graph. `meta` is the original `GraphProto` with its nodes
/// and initializers taken out (they live in `net` and `weights`).
#[derive(Debug, Clone, Default)]
pub struct Graph {
    net: StableDiGraph<Node, Wire>,
    weights: IndexMap<String, Weight>,
    pub meta: GraphProto,
    producers: HashMap<String, (NodeIndex, usize)>,
}

/// A whole model: `proto` is the `ModelProto` without its graph.
#[derive(Debug, Clone)]
pub struct Model {
    pub proto: ModelProto,
    pub graph: Graph,
}

impl Graph {
    /// Builds the graph from nodes, weights and the remaining graph fields.
    pub fn new(nodes: Vec<NodeProto>, weights: IndexMap<String, Weight>, meta: GraphProto) -> Result<Graph> {
        let mut graph = Graph { weights, meta, ..Default::default() };
        for proto in nodes {
            graph.net.add_node(Node { proto });
        }
        graph.relink()?;
        Ok(graph)
    }

    /// Recomputes the producer map and every edge from the node protos' names.
    /// Fails when two nodes (or a node and a weight) define the same tensor.
    fn relink(&mut self) -> Result<()> {
        self.net.clear_edges();
        self.producers.clear();
        let indices: Vec<NodeIndex> = self.net.node_indices().collect();
        for &ix in &indices {
            for (slot, name) in self.net[ix].proto.output.iter().enumerate() {
                if name.is_empty() {
                    continue;
                }
                if self.producers.insert(name.clone(), (ix, slot)).is_some() || self.weights.contains_key(name) {
                    return Err(Error::invalid(format!("tensor `{name}` is defined more than once")));
                }
            }
        }
        for &ix in &indices {
            let wires: Vec<(NodeIndex, Wire)> = self.net[ix]
                .proto
                .input
                .iter()
                .enumerate()
                .filter_map(|(to_slot, name)| {
                    let &(from, from_slot) = self.producers.get(name)?;
                    Some((from, Wire { name: name.clone(), from_slot, to_slot }))
                })
                .collect();
            for (from, wire) in wires {
                self.net.add_edge(from, ix, wire);
            }
        }
        Ok(())
    }

    pub fn node(&self, ix: NodeIndex) -> &Node {
        &self.net[ix]
    }
    /// Changes node `ix` (attributes, or the tensors it reads and writes) and re-links.
    pub fn update_node(&mut self, ix: NodeIndex, change: impl FnOnce(&mut Node)) -> Result<()> {
        change(&mut self.net[ix]);
        self.relink()
    }
    /// Every node, in index order.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.net.node_weights()
    }
    /// Every wire (producer, consumer, tensor).
    pub fn wires(&self) -> impl Iterator<Item = (NodeIndex, NodeIndex, &Wire)> {
        petgraph::visit::IntoEdgeReferences::edge_references(&self.net).map(|e| (e.source(), e.target(), e.weight()))
    }

    /// The weights (initializers) by name, in file order.
    pub fn weights(&self) -> &IndexMap<String, Weight> {
        &self.weights
    }
    pub fn weight(&self, name: &str) -> Option<&Weight> {
        self.weights.get(name)
    }
    /// A weight to rewrite in place (its shape may change).
    pub fn weight_mut(&mut self, name: &str) -> Option<&mut Weight> {
        self.weights.get_mut(name)
    }
    /// Adds or replaces weight `name`; fails if a node writes that tensor.
    pub fn insert_weight(&mut self, name: String, weight: Weight) -> Result<()> {
        if self.producers.contains_key(&name) {
            return Err(Error::invalid(format!("weight `{name}` would redefine a node's output")));
        }
        self.weights.insert(name, weight);
        Ok(())
    }
    pub fn node_count(&self) -> usize {
        self.net.node_count()
    }
    pub fn node_indices(&self) -> Vec<NodeIndex> {
        self.net.node_indices().collect()
    }
    pub fn find_node(&self, name: &str) -> Option<NodeIndex> {
        self.net.node_indices().find(|&ix| self.net[ix].name() == name)
    }

    /// The node and output slot that produce `tensor`, if a node does.
    pub fn producer(&self, tensor: &str) -> Option<(NodeIndex, usize)> {
        self.producers.get(tensor).copied()
    }

    /// Every (node, input slot) reading `tensor`, in node order.
    pub fn consumers(&self, tensor: &str) -> Vec<(NodeIndex, usize)> {
        let mut found: Vec<(NodeIndex, usize)> = match self.producers.get(tensor) {
            Some(&(from, _)) => self
                .net
                .edges_directed(from, Direction::Outgoing)
                .filter(|e| e.weight().name == tensor)
                .map(|e| (e.target(), e.weight().to_slot))
                .collect(),
            None => self
                .net
                .node_indices()
                .flat_map(|ix| {
                    let node = &self.net[ix];
                    node.proto.input.iter().enumerate().filter(|(_, n)| *n == tensor).map(move |(slot, _)| (ix, slot))
                })
                .collect(),
        };
        found.sort();
        found
    }

    pub fn is_graph_output(&self, tensor: &str) -> bool {
        self.meta.output.iter().any(|o| o.name() == tensor)
    }
    /// The first graph input that is not a weight: the image a classifier
    /// reads (old models also list their initializers as inputs).
    pub fn data_input(&self) -> Option<&crate::onnx::ValueInfoProto> {
        self.meta.input.iter().find(|i| !self.weights.contains_key(i.name()))
    }
    pub fn is_graph_input(&self, tensor: &str) -> bool {
        self.meta.input.iter().any(|o| o.name() == tensor)
    }

    /// A weight a pass may rewrite: an initializer that no graph input can
    /// override (old models list initializers among the inputs).
    pub fn constant(&self, tensor: &str) -> Option<&Weight> {
        if self.is_graph_input(tensor) {
            return None;
        }
        self.weights.get(tensor)
    }

    /// The f32 data of a rewritable weight.
    pub fn constant_f32(&self, tensor: &str) -> Option<&ndarray::ArrayD<f32>> {
        self.constant(tensor).and_then(Weight::as_f32)
    }

    /// Number of nodes reading `tensor` plus one if it is a graph output.
    pub fn use_count(&self, tensor: &str) -> usize {
        self.consumers(tensor).len() + usize::from(self.is_graph_output(tensor))
    }

    /// Adds a node and relinks.
    pub fn add_node(&mut self, node: Node) -> Result<NodeIndex> {
        let ix = self.net.add_node(node);
        self.relink()?;
        Ok(ix)
    }

    /// Removes a node and relinks. Its outputs become undefined unless
    /// another node is then made to produce them.
    pub fn remove_node(&mut self, ix: NodeIndex) -> Result<Node> {
        let node = self.net.remove_node(ix).ok_or_else(|| Error::invalid("node removed twice"))?;
        self.relink()?;
        Ok(node)
    }

    /// Replaces node `old` by `new` (added in order, so they may write its
    /// outputs), then relinks; returns the new nodes' indices.
    pub fn replace_node(&mut self, old: NodeIndex, new: Vec<Node>) -> Result<Vec<NodeIndex>> {
        let added = new.into_iter().map(|n| self.net.add_node(n)).collect();
        self.net.remove_node(old).ok_or_else(|| Error::invalid("node removed twice"))?;
        self.relink()?;
        Ok(added)
    }

    /// Removes weights no node reads any more (and that are no graph output).
    pub fn drop_unused_weights(&mut self) -> usize {
        let used: HashSet<&str> = self
            .net
            .node_weights()
            .flat_map(|n| n.proto.input.iter().map(String::as_str))
            .chain(self.meta.output.iter().map(|o| o.name()))
            .collect();
        let unused: Vec<String> = self.weights.keys().filter(|k| !used.contains(k.as_str())).cloned().collect();
        for name in &unused {
            self.weights.shift_remove(name);
        }
        unused.len()
    }

    /// The f32 bias (input 2) of node `ix`, or `len` zeros if it has none.
    pub fn bias_or_zeros(&self, ix: NodeIndex, len: usize) -> Vec<f32> {
        self.net[ix].input(2).and_then(|b| self.constant_f32(b)).map_or_else(|| vec![0.0; len], |b| b.iter().copied().collect())
    }

    /// Sets node `ix`'s bias (input 2) to `values`, adding the input when the
    /// node has none (a new Gemm bias drops `beta`, which would scale it).
    pub fn set_bias(&mut self, ix: NodeIndex, values: Vec<f32>) {
        // Only a weight input changes: weights are not wires, so no relink.
        let node = &self.net[ix];
        let name = match node.input(2) {
            Some(b) => b.to_string(),
            None => self.fresh_name(&format!("{}.bias", node.name())),
        };
        self.weights.insert(name.clone(), Weight::from_f32(&name, ndarray::Array1::from_vec(values).into_dyn()));
        let node = &mut self.net[ix];
        if node.input(2).is_none() {
            node.proto.input.resize(node.proto.input.len().max(3), String::new());
            node.proto.input[2] = name;
            if node.op() == "Gemm" {
                node.proto.attribute.retain(|a| a.name() != "beta");
            }
        }
    }

    /// A name not yet used by any tensor or node, built from `base`.
    pub fn fresh_name(&self, base: &str) -> String {
        let taken = |n: &str| {
            self.weights.contains_key(n) || self.producers.contains_key(n) || self.is_graph_input(n) || self.find_node(n).is_some()
        };
        if !taken(base) {
            return base.to_string();
        }
        (1..).map(|i| format!("{base}_{i}")).find(|n| !taken(n)).expect("an unused name exists")
    }

    /// Nodes in a topological order that keeps the stored order wherever
    /// the data flow allows (so an untouched model is written as it was read).
    pub fn topo_order(&self) -> Result<Vec<NodeIndex>> {
        let mut pending: HashMap<NodeIndex, usize> =
            self.net.node_indices().map(|ix| (ix, self.net.edges_directed(ix, Direction::Incoming).count())).collect();
        let mut ready: BinaryHeap<std::cmp::Reverse<NodeIndex>> =
            pending.iter().filter(|(_, &n)| n == 0).map(|(&ix, _)| std::cmp::Reverse(ix)).collect();
        let mut order = Vec::with_capacity(pending.len());
        while let Some(std::cmp::Reverse(ix)) = ready.pop() {
            order.push(ix);
            for edge in self.net.edges_directed(ix, Direction::Outgoing) {
                let count = pending.get_mut(&edge.target()).expect("edge target is a node");
                *count -= 1;
                if *count == 0 {
                    ready.push(std::cmp::Reverse(edge.target()));
                }
            }
        }
        if order.len() != self.net.node_count() {
            let stuck: Vec<&str> = pending.iter().filter(|(_, &n)| n > 0).map(|(&ix, _)| self.net[ix].name()).take(5).collect();
            return Err(Error::invalid(format!("the graph has a cycle through node(s) {}", stuck.join(", "))));
        }
        Ok(order)
    }

    /// Back to a `GraphProto`, nodes in topological order.
    pub fn to_proto(&self) -> Result<GraphProto> {
        let mut proto = self.meta.clone();
        proto.node = self.topo_order()?.into_iter().map(|ix| self.net[ix].proto.clone()).collect();
        // Changed weights are converted to bytes here (tens of MB): in parallel.
        use rayon::prelude::*;
        proto.initializer = self.weights.values().collect::<Vec<_>>().into_par_iter().map(Weight::encode).collect();
        Ok(proto)
    }
}

impl Model {
    pub fn to_proto(&self) -> Result<ModelProto> {
        let mut proto = self.proto.clone();
        proto.graph = Some(self.graph.to_proto()?);
        Ok(proto)
    }

    /// The opset version of the default domain.
    pub fn opset(&self) -> i64 {
        self.proto.opset_import.iter().find(|o| matches!(o.domain(), "" | "ai.onnx")).and_then(|o| o.version).unwrap_or(1)
    }
}

/// A float tensor's value info; `None` dims are the symbolic batch `N`.
pub fn value_info(name: &str, dims: &[Option<i64>]) -> crate::onnx::ValueInfoProto {
    use crate::onnx::tensor_shape_proto::dimension::Value;
    let dim = dims
        .iter()
        .map(|d| crate::onnx::tensor_shape_proto::Dimension {
            value: Some(d.map_or(Value::DimParam("N".into()), Value::DimValue)),
            ..Default::default()
        })
        .collect();
    let tensor = crate::onnx::type_proto::Tensor { elem_type: Some(1), shape: Some(crate::onnx::TensorShapeProto { dim }) };
    crate::onnx::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(crate::onnx::TypeProto { value: Some(crate::onnx::type_proto::Value::TensorType(tensor)), ..Default::default() }),
        ..Default::default()
    }
}
