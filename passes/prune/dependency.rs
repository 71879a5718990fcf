//! Channel dependency analysis: which channels of which tensors are tied
//! together, so that removing one removes all of them consistently.
//!
//! Every channel of every 4-d/2-d activation tensor is a slot; slots that
//! must be pruned together are merged (union-find, the same idea as
//! Torch-Pruning's DependencyGraph or tract's change_axes worklist):
//! - Conv (group 1), Gemm, MatMul with a constant B: input and output
//!   channels are independent; the node *produces* its output channels and
//!   *consumes* its input channels.
//! - Depthwise Conv (group = C_in = C_out): ties input channel c to output c.
//! - BatchNormalization, Relu and other elementwise ops with constant
//!   operands, pooling, Identity/Dropout: tie input c to output c.
//! - Add/Sub/Mul/Div/Max/Min/Sum of tensors: ties all inputs and the output.
//! - Concat on the channel axis: input k channel c ~ output channel offset_k + c.
//! - Flatten of [N,C,H,W]: output columns c·H·W … c·H·W+H·W−1 ~ input channel c.
//! - Graph inputs and outputs, other grouped convs, shared or non-constant
//!   weights, non-f32 weights and every op not listed (Reshape, Transpose,
//!   unknown ops and domains) *block* the channels they touch: they stay.
use crate::ir::{Graph, Weight};
use crate::shape::Shapes;
use petgraph::stable_graph::NodeIndex;
use std::collections::HashMap;

/// How a node relates to the channels of its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Conv (group 1) / Gemm / MatMul: independent in and out channels.
    Dense,
    /// Depthwise conv: in channel c = out channel c, weight row c.
    Depthwise,
    /// Per-channel passthrough with parameters or none (BN, Relu, pools, Add…).
    Passthrough,
    /// Channel layout change (Concat, Flatten): ties with an index map.
    Remap,
}

/// The tied channels of the graph.
#[derive(Debug, Clone)]
pub struct ChannelGraph {
    /// Channel-carrying tensors, in a fixed order.
    pub tensors: Vec<String>,
    /// Tensor name → index into `tensors`.
    pub index: HashMap<String, usize>,
    /// First slot of each tensor.
    pub base: Vec<usize>,
    /// Channel count of each tensor.
    pub channels: Vec<usize>,
    /// The role of each analysed node.
    pub roles: HashMap<NodeIndex, Role>,
    sets: UnionFind,
    blocked: Vec<bool>,
    /// Why slots were blocked (first reason per tensor), for reports.
    pub block_reasons: HashMap<String, String>,
    /// Tensors tied through an Add/Concat (the residual stream).
    pub residual: Vec<bool>,
}

/// Channel axis length of a tensor, when it has one.
fn channel_count(shapes: &Shapes, name: &str) -> Option<usize> {
    shapes.get(name)?.shape.as_ref().filter(|s| s.len() >= 2).map(|s| s[1])
}

impl ChannelGraph {
    /// Builds the analysis over `graph` with the given shapes.
    pub fn build(graph: &Graph, shapes: &Shapes) -> ChannelGraph {
        let mut cg = ChannelGraph::slots(graph, shapes);
        for input in &graph.meta.input {
            cg.block_tensor(input.name(), "graph input");
        }
        for output in &graph.meta.output {
            cg.block_tensor(output.name(), "graph output");
        }
        for ix in graph.topo_order().unwrap_or_default() {
            if let Err(reason) = cg.visit(graph, shapes, ix) {
                cg.block_node(graph, ix, &reason);
            }
        }
        cg
    }

    /// One slot per channel of every activation tensor (not weights).
    fn slots(graph: &Graph, shapes: &Shapes) -> ChannelGraph {
        let mut cg = ChannelGraph {
            tensors: vec![],
            index: HashMap::new(),
            base: vec![],
            channels: vec![],
            roles: HashMap::new(),
            sets: UnionFind::default(),
            blocked: vec![],
            block_reasons: HashMap::new(),
            residual: vec![],
        };
        let names = graph
            .meta
            .input
            .iter()
            .map(|i| i.name().to_string())
            .chain(graph.topo_order().unwrap_or_default().into_iter().flat_map(|ix| graph.node(ix).outputs().to_vec()));
        for name in names {
            if graph.weights().contains_key(&name) || cg.index.contains_key(&name) {
                continue;
            }
            if let Some(c) = channel_count(shapes, &name) {
                cg.index.insert(name.clone(), cg.tensors.len());
                cg.tensors.push(name);
                cg.base.push(cg.sets.len());
                cg.channels.push(c);
                cg.residual.push(false);
                cg.sets.grow(c);
                cg.blocked.extend(std::iter::repeat_n(false, c));
            }
        }
        cg
    }

    pub fn slot_count(&self) -> usize {
        self.sets.len()
    }

    pub fn slot(&self, tensor: &str, channel: usize) -> Option<usize> {
        let t = *self.index.get(tensor)?;
        (channel < self.channels[t]).then(|| self.base[t] + channel)
    }

    /// The class (set root) of a slot.
    pub fn find(&self, s: usize) -> usize {
        self.sets.find(s)
    }

    fn union(&mut self, a: usize, b: usize) {
        self.sets.union(a, b);
    }

    /// Ties channel c of `a` to channel c of `b` for all c (same counts).
    fn tie(&mut self, a: &str, b: &str) -> Result<(), String> {
        let (Some(&ta), Some(&tb)) = (self.index.get(a), self.index.get(b)) else {
            return Err(format!("`{a}` or `{b}` has no channel axis"));
        };
        if self.channels[ta] != self.channels[tb] {
            return Err(format!("`{a}` and `{b}` have different channel counts"));
        }
        for c in 0..self.channels[ta] {
            self.union(self.base[ta] + c, self.base[tb] + c);
        }
        Ok(())
    }

    pub fn block_tensor(&mut self, name: &str, reason: &str) {
        if let Some(&t) = self.index.get(name) {
            self.block_reasons.entry(name.to_string()).or_insert_with(|| reason.to_string());
            for c in 0..self.channels[t] {
                self.blocked[self.base[t] + c] = true;
            }
        }
    }

    fn block_node(&mut self, graph: &Graph, ix: NodeIndex, reason: &str) {
        let node = graph.node(ix);
        let why = format!("{} `{}`: {reason}", node.op(), node.name());
        for t in node.inputs().iter().chain(node.outputs()) {
            self.block_tensor(t, &why);
        }
        self.roles.remove(&ix);
    }

    /// Whether the class of `slot` may be pruned.
    pub fn is_blocked(&self, slot: usize, roots_blocked: &HashMap<usize, bool>) -> bool {
        roots_blocked.get(&self.find(slot)).copied().unwrap_or(false)
    }

    /// Blocked flag per class root (a class is blocked if any member is).
    pub fn blocked_roots(&self) -> HashMap<usize, bool> {
        let mut out: HashMap<usize, bool> = HashMap::new();
        for s in 0..self.sets.len() {
            *out.entry(self.find(s)).or_insert(false) |= self.blocked[s];
        }
        out
    }

    fn visit(&mut self, graph: &Graph, shapes: &Shapes, ix: NodeIndex) -> Result<(), String> {
        let node = graph.node(ix);
        if !node.is_standard() || node.has_subgraph() {
            return Err("op not understood by the channel analysis".into());
        }
        let role = match node.op() {
            "Conv" => self.visit_conv(graph, node)?,
            "Gemm" | "MatMul" => visit_dense(graph, shapes, node)?,
            "BatchNormalization" => self.visit_batchnorm(graph, node)?,
            "Relu" | "LeakyRelu" | "Sigmoid" | "Tanh" | "HardSigmoid" | "HardSwish" | "Elu" | "Selu" | "Softplus" | "Mish" | "Gelu"
            | "Erf" | "Abs" | "Neg" | "Identity" | "Dropout" | "Clip" | "MaxPool" | "AveragePool" | "GlobalAveragePool"
            | "GlobalMaxPool" => self.visit_unary(graph, node)?,
            "Add" | "Sub" | "Mul" | "Div" | "Max" | "Min" | "Sum" => self.visit_elementwise(graph, shapes, node)?,
            "Resize" | "Upsample" => self.visit_resize(graph, node)?,
            "Concat" => self.visit_concat(shapes, node)?,
            "Flatten" => self.visit_flatten(shapes, node)?,
            other => return Err(format!("{other} is not channel-transparent")),
        };
        self.roles.insert(ix, role);
        Ok(())
    }

    fn visit_conv(&mut self, graph: &Graph, node: &crate::ir::Node) -> Result<Role, String> {
        check_weights(graph, node, &[1, 2])?;
        let (x, y) = (node.input(0).unwrap_or(""), node.output(0).unwrap_or(""));
        let group = node.attr_int("group").unwrap_or(1);
        let w = graph.constant_f32(node.input(1).unwrap_or("")).ok_or("no f32 weight")?;
        match group {
            1 => Ok(Role::Dense),
            g if w.shape()[1] == 1 && g as usize == w.shape()[0] => {
                self.tie(x, y)?;
                Ok(Role::Depthwise)
            }
            g => Err(format!("grouped conv (group {g}) is not pruned")),
        }
    }

    fn visit_batchnorm(&mut self, graph: &Graph, node: &crate::ir::Node) -> Result<Role, String> {
        check_weights(graph, node, &[1, 2, 3, 4])?;
        if node.outputs().iter().skip(1).any(|o| !o.is_empty()) {
            return Err("training-mode outputs".into());
        }
        self.tie(node.input(0).unwrap_or(""), node.output(0).unwrap_or(""))?;
        Ok(Role::Passthrough)
    }

    fn visit_unary(&mut self, graph: &Graph, node: &crate::ir::Node) -> Result<Role, String> {
        // Clip's min/max (and other extra inputs) must be constant scalars.
        for extra in node.inputs().iter().skip(1).filter(|n| !n.is_empty()) {
            match graph.constant(extra) {
                Some(w) if w.len() == 1 => {}
                _ => return Err(format!("input `{extra}` is not a constant scalar")),
            }
        }
        self.tie(node.input(0).unwrap_or(""), node.output(0).unwrap_or(""))?;
        Ok(Role::Passthrough)
    }

    /// A resize scales H and W only (given by constant `scales`; `sizes`
    /// would spell out the channel count, which pruning changes).
    fn visit_resize(&mut self, graph: &Graph, node: &crate::ir::Node) -> Result<Role, String> {
        let scales_slot = if node.op() == "Upsample" { 1 } else { 2 };
        if node.op() == "Resize" && node.input(3).is_some() {
            return Err("Resize by `sizes` fixes the channel count".into());
        }
        let scales = match node.input(scales_slot) {
            Some(t) => graph.constant(t).and_then(Weight::to_f64_vec).ok_or_else(|| format!("scales `{t}` are not constant"))?,
            None => node.attr("scales").map(|a| a.floats.iter().map(|&f| f as f64).collect()).unwrap_or_default(),
        };
        if scales.len() < 2 || scales[0] != 1.0 || scales[1] != 1.0 {
            return Err(format!("scales {scales:?} resize the batch or channel axis"));
        }
        for extra in node.inputs().iter().skip(1).filter(|n| !n.is_empty()) {
            if graph.constant(extra).is_none() {
                return Err(format!("input `{extra}` is not constant"));
            }
        }
        self.tie(node.input(0).unwrap_or(""), node.output(0).unwrap_or(""))?;
        Ok(Role::Passthrough)
    }

    fn visit_elementwise(&mut self, graph: &Graph, shapes: &Shapes, node: &crate::ir::Node) -> Result<Role, String> {
        let y = node.output(0).unwrap_or("").to_string();
        let out_c = channel_count(shapes, &y).ok_or("output has no channel axis")?;
        let out_rank = shapes.get(&y).and_then(|t| t.shape.as_ref()).map_or(0, |s| s.len());
        let mut tied = 0;
        for x in node.inputs().iter().filter(|n| !n.is_empty()) {
            if let Some(w) = graph.constant(x) {
                per_channel_axis(&w.shape(), out_rank, out_c)?;
                if w.as_f32().is_none() {
                    return Err(format!("constant `{x}` is not f32"));
                }
                continue;
            }
            let rank = shapes.get(x).and_then(|t| t.shape.as_ref()).map_or(0, |s| s.len());
            if rank != out_rank || channel_count(shapes, x) != Some(out_c) {
                return Err(format!("input `{x}` broadcasts over channels"));
            }
            self.tie(x, &y)?;
            tied += 1;
        }
        if tied > 1 {
            let t = self.index[&y];
            self.residual[t] = true;
        }
        Ok(Role::Passthrough)
    }

    fn visit_concat(&mut self, shapes: &Shapes, node: &crate::ir::Node) -> Result<Role, String> {
        let y = node.output(0).unwrap_or("");
        let rank = shapes.get(y).and_then(|t| t.shape.as_ref()).map_or(0, |s| s.len()) as i64;
        let axis = node.attr_int("axis").unwrap_or(0);
        if axis != 1 && axis != 1 - rank {
            return Err("concat not on the channel axis".into());
        }
        let yt = *self.index.get(y).ok_or("output has no channel axis")?;
        let mut offset = 0;
        for x in node.inputs().iter().filter(|n| !n.is_empty()) {
            let xt = *self.index.get(x).ok_or_else(|| format!("`{x}` is a constant or has no channel axis"))?;
            for c in 0..self.channels[xt] {
                self.union(self.base[xt] + c, self.base[yt] + offset + c);
            }
            offset += self.channels[xt];
        }
        self.residual[yt] = true;
        Ok(Role::Remap)
    }

    fn visit_flatten(&mut self, shapes: &Shapes, node: &crate::ir::Node) -> Result<Role, String> {
        let (x, y) = (node.input(0).unwrap_or(""), node.output(0).unwrap_or(""));
        let xs = shapes.get(x).and_then(|t| t.shape.clone()).ok_or("input shape unknown")?;
        if node.attr_int("axis").unwrap_or(1) != 1 || xs.len() < 2 {
            return Err("flatten not at axis 1".into());
        }
        let area: usize = xs[2..].iter().product();
        let (xt, yt) = (*self.index.get(x).ok_or("no input channels")?, *self.index.get(y).ok_or("no output channels")?);
        for c in 0..self.channels[xt] {
            for p in 0..area {
                self.union(self.base[xt] + c, self.base[yt] + c * area + p);
            }
        }
        Ok(Role::Remap)
    }
}

/// The axis along which a constant operand varies per channel, if any
/// (None = broadcast over channels); an error if it varies otherwise.
pub fn per_channel_axis(shape: &[usize], out_rank: usize, channels: usize) -> Result<Option<usize>, String> {
    if shape.len() > out_rank {
        return Err("constant operand of higher rank".into());
    }
    let pad = out_rank - shape.len();
    let mut axis = None;
    for (i, &d) in shape.iter().enumerate() {
        match (i + pad, d) {
            (_, 1) => {}
            (1, d) if d == channels => axis = Some(i),
            _ => return Err(format!("constant operand of shape {shape:?} is not per-channel")),
        }
    }
    Ok(axis)
}

/// The weights at `slots` must be constant f32 initializers used only here.
fn check_weights(graph: &Graph, node: &crate::ir::Node, slots: &[usize]) -> Result<(), String> {
    for &slot in slots {
        let Some(name) = node.input(slot) else { continue };
        let w = graph.constant(name).ok_or_else(|| format!("`{name}` is not a constant initializer"))?;
        if w.as_f32().is_none() {
            return Err(format!("`{name}` is not f32"));
        }
        if graph.consumers(name).len() != 1 {
            return Err(format!("weight `{name}` is shared"));
        }
    }
    Ok(())
}

fn visit_dense(graph: &Graph, shapes: &Shapes, node: &crate::ir::Node) -> Result<Role, String> {
    let slots: &[usize] = if node.op() == "Gemm" { &[1, 2] } else { &[1] };
    check_weights(graph, node, slots)?;
    if node.attr_int("transA").unwrap_or(0) != 0 {
        return Err("transA".into());
    }
    let rank = |slot: usize| node.input(slot).and_then(|n| shapes.get(n)).and_then(|t| t.shape.as_ref()).map_or(0, |s| s.len());
    if rank(0) != 2 || rank(1) != 2 {
        return Err("only 2-d products are pruned".into());
    }
    if let Some(c) = node.input(2).and_then(|n| graph.constant(n)) {
        if c.shape().iter().filter(|&&d| d != 1).count() > 1 || c.shape().len() > 2 {
            return Err("bias is not a vector".into());
        }
    }
    Ok(Role::Dense)
}

/// Disjoint sets of 0..n (union by size: every find path stays logarithmic).
#[derive(Debug, Clone, Default)]
pub struct UnionFind {
    parent: Vec<usize>,
    size: Vec<usize>,
}

impl UnionFind {
    /// `n` singletons.
    pub fn new(n: usize) -> UnionFind {
        UnionFind { parent: (0..n).collect(), size: vec![1; n] }
    }

    /// Adds `n` singletons.
    pub fn grow(&mut self, n: usize) {
        let start = self.parent.len();
        self.parent.extend(start..start + n);
        self.size.extend(std::iter::repeat_n(1, n));
    }

    pub fn len(&self) -> usize {
        self.parent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parent.is_empty()
    }

    pub fn find(&self, mut s: usize) -> usize {
        while self.parent[s] != s {
            s = self.parent[s];
        }
        s
    }

    pub fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (big, small) = if self.size[ra] >= self.size[rb] { (ra, rb) } else { (rb, ra) };
            self.parent[small] = big;
            self.size[big] += self.size[small];
        }
    }
}
