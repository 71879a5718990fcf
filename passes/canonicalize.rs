//! Pass `canonicalize`: rewrites what exporters write differently into the
//! one form the other passes read, without changing what the model
//! computes. The pipeline runs it first, on its own, whenever it runs any
//! pass (a model nothing is asked of is written back byte for byte); it is
//! reported only when it changed something.
//!
//! 1. **Initializers listed as graph inputs** (`keep_initializers_as_inputs`,
//!    every export at opset < 9, model-zoo files) are taken off the input
//!    list: they are the weights, and the other passes may only rewrite
//!    weights nobody can override. `keep_initializer_inputs: true` keeps
//!    them as inputs (and so keeps every pass away from them).
//! 2. **`Constant` nodes become initializers** (paddle2onnx writes every
//!    weight that way; torch writes Clip's bounds and shape vectors).
//! 3. **Constant subgraphs are folded**: a node of [`FOLDABLE`] whose inputs
//!    are all constant (and `CastLike` of a constant) is replaced by its
//!    value — the dynamo exporter's zero conv bias `Expand(CastLike(0),
//!    Shape(W))`, a `Pad`'s `Concat`/`Slice` of constant pads, a
//!    `Reshape(Constant, Constant)` bias. A `Shape` of an activation is
//!    not constant (its batch is not) and stays.
//! 4. **Flatten-like `Reshape` → `Flatten(axis=1)`**: `Reshape(x, t)` whose
//!    target is `[-1, C·H·W]`, `[0, -1]`, `[-1, -1]`-free, or
//!    `Concat(batch of Shape(·), [-1 | C·H·W])` — `x.view(x.size(0), -1)`,
//!    the dynamo exporter's `view` — computes `Flatten(x, 1)` for every
//!    batch (the batch being the leading axis, as in every NCHW model).
//!    So does `Squeeze(x, axes={2,3})` of an `[N, C, 1, 1]` pooled map
//!    (tf2onnx's Keras head: GlobalAveragePool → Squeeze → MatMul).
//! 5. **Spatial mean → `GlobalAveragePool`**: `ReduceMean(x, axes={2,3})` of
//!    a 4-d `x` (the dynamo exporter's `adaptive_avg_pool2d(x, 1)`), plus a
//!    `Flatten` when `keepdims` is 0.
//! 6. **Zero `Pad` before a `Conv` → the conv's `pads`**: a constant-mode
//!    `Pad` of zeros on H and W only (non-negative, constant pads), read by
//!    one conv with explicit pads (TF-style "SAME" padding written as
//!    `F.pad`), is merged into that conv.
//! 7. **`Add(Conv(x), b)` with a per-channel constant `b`** (`[1,C,1,1]` or
//!    `[C,1,1]`: paddle2onnx's conv bias) becomes the conv's bias, when the
//!    conv's output has no other reader; likewise `Add(Gemm(x), b)` with `b`
//!    of `[M]` or `[1, M]` (a Dense layer's bias).
//! 8. **`MatMul(x, W)` with a 2-d `x` and a 2-d f32 weight → `Gemm`**
//!    (tf2onnx's Dense), so it may take a bias.
//! 9. Nodes left without readers by the rewrites above are removed.
//!
//! Before:  W → Shape → Expand(CastLike(0, x), ·) → Conv.B;  x → ReduceMean{2,3} → Reshape(·, [-1, 512]) → Gemm
//! After:   Conv with an initializer bias;                   x → GlobalAveragePool → Flatten(axis=1) → Gemm
use super::{Pass, PassContext, PassReport};
use crate::error::Result;
use crate::ir::constant::{self, Value, FOLDABLE};
use crate::ir::{Graph, Model, Node, Weight};
use crate::shape::Shapes;
use petgraph::stable_graph::NodeIndex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CanonicalizeOptions {
    /// Keep initializers that are also graph inputs as inputs (overridable
    /// at run time, so no pass rewrites them).
    #[serde(default)]
    pub keep_initializer_inputs: bool,
}

/// The `canonicalize` pass.
pub struct Canonicalize;

impl Pass for Canonicalize {
    const NAME: &'static str = "canonicalize";
    type Options = CanonicalizeOptions;

    fn run(model: &mut Model, ctx: &PassContext, options: &CanonicalizeOptions) -> Result<PassReport> {
        let graph = &mut model.graph;
        let mut report = PassReport::default();
        if !options.keep_initializer_inputs {
            initializer_inputs(graph, &mut report);
        }
        constant_nodes(graph, &mut report)?;
        fold_constants(graph, ctx.shapes, &mut report)?;
        flatten_reshapes(graph, ctx.shapes, &mut report)?;
        spatial_means(graph, ctx.shapes, &mut report)?;
        pads_into_convs(graph, &mut report)?;
        matmuls_into_gemms(graph, ctx.shapes, &mut report)?;
        biases_into_convs(graph, ctx.shapes, &mut report)?;
        // Outer-scope reads from subgraphs are not wires: only prune dead nodes without them.
        let dead = if graph.nodes().any(Node::has_subgraph) { 0 } else { remove_dead(graph)? };
        if dead > 0 {
            report.change("(graph)", format!("removed {dead} node(s) left without readers"));
        }
        Ok(report)
    }
}

fn initializer_inputs(graph: &mut Graph, report: &mut PassReport) {
    let before = graph.meta.input.len();
    let weights = graph.weights();
    let listed: Vec<String> = graph.meta.input.iter().filter(|i| weights.contains_key(i.name())).map(|i| i.name().to_string()).collect();
    graph.meta.input.retain(|i| !listed.contains(&i.name().to_string()));
    if graph.meta.input.len() < before {
        report.change(
            "(graph inputs)",
            format!(
                "{} initializer(s) also listed as graph inputs are treated as the constants they are and no longer listed \
                 (`canonicalize: {{keep_initializer_inputs: true}}` keeps them; then no pass rewrites them)",
                listed.len()
            ),
        );
    }
}

fn constant_nodes(graph: &mut Graph, report: &mut PassReport) -> Result<()> {
    let mut lifted = 0;
    for ix in graph.topo_order()? {
        let node = graph.node(ix);
        if node.op() != "Constant" || !node.is_standard() {
            continue;
        }
        let Some(out) = node.output(0).map(str::to_string) else { continue };
        if graph.is_graph_output(&out) {
            continue;
        }
        let Some(weight) = constant::constant_node_tensor(node).and_then(|t| Weight::decode(t, None).ok()) else { continue };
        graph.remove_node(ix)?;
        graph.insert_weight(out, weight)?;
        lifted += 1;
    }
    if lifted > 0 {
        report.change("(graph)", format!("{lifted} Constant node(s) became initializers"));
    }
    Ok(())
}

/// Whether `node` can be folded once its inputs' values are known.
fn foldable(node: &Node) -> bool {
    node.is_standard() && !node.has_subgraph() && FOLDABLE.contains(&node.op()) && node.outputs().len() == 1
}

fn fold_constants(graph: &mut Graph, shapes: &Shapes, report: &mut PassReport) -> Result<()> {
    let mut values: HashMap<String, Value> = HashMap::new();
    let mut folded = 0;
    for ix in graph.topo_order()? {
        let node = graph.node(ix);
        if !foldable(node) || node.output(0).is_none_or(|o| graph.is_graph_output(o)) {
            continue;
        }
        if node.op() == "Shape" {
            // A weight's shape is constant (an activation's is not: its batch); only the shape is read.
            let x = node.input(0).unwrap_or("");
            if graph.constant(x).is_none() && !values.contains_key(x) {
                continue;
            }
        }
        let value = |n: &str| values.get(n).cloned().or_else(|| constant::value_of(graph, n));
        let info = |n: &str| shapes.get(n).map_or((None, 0), |t| (t.shape.clone(), t.dtype));
        let Some(value) = constant::eval_with(node, value, info) else { continue };
        let out = node.output(0).expect("checked").to_string();
        graph.remove_node(ix)?;
        graph.insert_weight(out.clone(), value.clone().into_weight(&out))?;
        values.insert(out, value);
        folded += 1;
    }
    if folded > 0 {
        report.change("(graph)", format!("{folded} node(s) of constant arithmetic folded into initializers"));
    }
    Ok(())
}

fn shape_of<'a>(shapes: &'a Shapes, tensor: &str) -> Option<&'a Vec<usize>> {
    shapes.get(tensor).and_then(|t| t.shape.as_ref())
}

/// One element of a Reshape target as far as it is known symbolically.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Elem {
    Int(i64),
    /// The leading (batch) dim of some activation.
    Batch,
}

/// The symbolic elements of a 1-d int tensor, following shape arithmetic;
/// the batch is the leading dim of `x` or of a graph input (exporters take
/// it from either).
fn elems(graph: &Graph, x: &str, tensor: &str, depth: usize) -> Option<Vec<Elem>> {
    if let Some(v) = constant::value_of(graph, tensor) {
        return Some(v.ints()?.into_iter().map(Elem::Int).collect());
    }
    let (ix, _) = graph.producer(tensor)?;
    let node = graph.node(ix);
    if depth > 8 || !node.is_standard() {
        return None;
    }
    let input = |slot: usize| node.input(slot).and_then(|n| elems(graph, x, n, depth + 1));
    match node.op() {
        "Identity" | "Cast" | "Squeeze" | "Unsqueeze" | "Reshape" => input(0).filter(|e| e.len() == 1),
        "Concat" => node.inputs().iter().map(|n| elems(graph, x, n, depth + 1)).collect::<Option<Vec<_>>>().map(|v| v.concat()),
        "Shape" => {
            let (start, end) = (node.attr_int("start").unwrap_or(0), node.attr_int("end"));
            (start == 0 && end == Some(1) && batch_source(graph, x, node)).then(|| vec![Elem::Batch])
        }
        "Gather" => {
            let (ps, _) = graph.producer(node.input(0)?)?;
            let shape_node = graph.node(ps);
            let idx = constant::value_of(graph, node.input(1)?)?.ints()?;
            let plain_shape =
                shape_node.op() == "Shape" && shape_node.attr_int("start").unwrap_or(0) == 0 && batch_source(graph, x, shape_node);
            (plain_shape && idx == [0] && node.attr_int("axis").unwrap_or(0) == 0).then(|| vec![Elem::Batch])
        }
        "Slice" => {
            let (ps, _) = graph.producer(node.input(0)?)?;
            let shape_node = graph.node(ps);
            let starts = constant::value_of(graph, node.input(1)?)?.ints()?;
            let ends = constant::value_of(graph, node.input(2)?)?.ints()?;
            let plain_shape = shape_node.op() == "Shape" && shape_node.attr_int("start").unwrap_or(0) == 0;
            (plain_shape
                && starts == [0]
                && ends == [1]
                && node.input(3).is_none_or(|a| constant::value_of(graph, a).and_then(|v| v.ints()) == Some(vec![0])))
            .then(|| vec![Elem::Batch])
        }
        _ => None,
    }
}

/// Whether Shape node `shape` reads `x` itself or a graph input.
fn batch_source(graph: &Graph, x: &str, shape: &Node) -> bool {
    shape.input(0).is_some_and(|s| s == x || graph.is_graph_input(s))
}

/// Whether Reshape `node` computes `Flatten(x, axis=1)` for every batch.
fn is_flatten(graph: &Graph, shapes: &Shapes, node: &Node) -> bool {
    let (Some(x), Some(t), Some(y)) = (node.input(0), node.input(1), node.output(0)) else { return false };
    let (Some(xs), Some(ys)) = (shape_of(shapes, x), shape_of(shapes, y)) else { return false };
    let rest: usize = xs.iter().skip(1).product();
    if xs.len() < 2 || ys.as_slice() != [xs[0], rest] {
        return false;
    }
    let allow_zero = node.attr_int("allowzero").unwrap_or(0) == 1;
    let Some(e) = elems(graph, x, t, 0) else { return false };
    let lead = matches!(e.first(), Some(Elem::Batch | Elem::Int(-1))) || (e.first() == Some(&Elem::Int(0)) && !allow_zero);
    let tail = matches!(e.get(1), Some(Elem::Int(v)) if *v == -1 || *v == rest as i64);
    e.len() == 2 && lead && tail && e != [Elem::Int(-1), Elem::Int(-1)]
}

/// Whether Squeeze `node` drops exactly the unit H, W axes of a 4-d tensor.
fn is_pooled_squeeze(graph: &Graph, shapes: &Shapes, node: &Node) -> bool {
    let Some(xs) = node.input(0).and_then(|x| shape_of(shapes, x)) else { return false };
    xs.len() == 4 && xs[2] == 1 && xs[3] == 1 && over_height_and_width(graph, node)
}

fn flatten_reshapes(graph: &mut Graph, shapes: &Shapes, report: &mut PassReport) -> Result<()> {
    let found: Vec<NodeIndex> = graph
        .topo_order()?
        .into_iter()
        .filter(|&ix| {
            let node = graph.node(ix);
            node.is_standard()
                && match node.op() {
                    "Reshape" => is_flatten(graph, shapes, node),
                    "Squeeze" => is_pooled_squeeze(graph, shapes, node),
                    _ => false,
                }
        })
        .collect();
    for ix in found {
        let old = graph.node(ix).clone();
        let mut flat = Node::new("Flatten", old.name(), &[old.input(0).expect("checked")], &[old.output(0).expect("checked")]);
        flat.set_attr_int("axis", 1);
        graph.replace_node(ix, vec![flat])?;
        report.change(old.name(), format!("{} to [batch, -1] is Flatten(axis=1)", old.op()));
    }
    Ok(())
}

/// Whether the `axes` of Squeeze/ReduceMean `node` (an attribute before
/// opset 13/18, a constant input after) are exactly H and W of a 4-d tensor.
fn over_height_and_width(graph: &Graph, node: &Node) -> bool {
    let axes = match node.attr_ints("axes") {
        Some(a) => Some(a.to_vec()),
        None => node.input(1).and_then(|a| constant::value_of(graph, a)).and_then(|v| v.ints()),
    };
    let Some(mut axes) = axes.map(|a| a.iter().map(|&v| if v < 0 { v + 4 } else { v }).collect::<Vec<_>>()) else { return false };
    axes.sort_unstable();
    axes == [2, 3]
}

fn spatial_means(graph: &mut Graph, shapes: &Shapes, report: &mut PassReport) -> Result<()> {
    let found: Vec<NodeIndex> = graph
        .topo_order()?
        .into_iter()
        .filter(|&ix| {
            let node = graph.node(ix);
            let rank4 = node.input(0).and_then(|x| shape_of(shapes, x)).is_some_and(|s| s.len() == 4);
            node.op() == "ReduceMean" && node.is_standard() && rank4 && over_height_and_width(graph, node) && node.output(0).is_some()
        })
        .collect();
    for ix in found {
        let old = graph.node(ix).clone();
        let (x, y) = (old.input(0).expect("checked"), old.output(0).expect("checked"));
        let nodes = if old.attr_int("keepdims").unwrap_or(1) == 1 {
            vec![Node::new("GlobalAveragePool", old.name(), &[x], &[y])]
        } else {
            let mid = graph.fresh_name(&format!("{y}_pooled"));
            let mut flat = Node::new("Flatten", &graph.fresh_name(&format!("{}_flatten", old.name())), &[&mid], &[y]);
            flat.set_attr_int("axis", 1);
            vec![Node::new("GlobalAveragePool", old.name(), &[x], &[&mid]), flat]
        };
        graph.replace_node(ix, nodes)?;
        report.change(old.name(), "ReduceMean over H, W is GlobalAveragePool");
    }
    Ok(())
}

/// The H, W pads (begin h, begin w, end h, end w) of a zero Pad on a 4-d
/// tensor, if it pads nothing else.
fn spatial_zero_pads(graph: &Graph, pad: &Node) -> Option<[i64; 4]> {
    if pad.attr_str("mode").is_some_and(|m| m != "constant") {
        return None;
    }
    let pads = match pad.attr_ints("pads") {
        Some(p) => p.to_vec(),
        None => constant::value_of(graph, pad.input(1)?)?.ints()?,
    };
    let zero_fill = match pad.input(2) {
        None => pad.attr_float("value").unwrap_or(0.0) == 0.0,
        Some(v) => matches!(constant::value_of(graph, v)?, Value::F32(a) if a.iter().all(|&x| x == 0.0)),
    };
    // Pad with `axes` (opset 18) is left alone: its pads are per listed axis.
    if !zero_fill || pad.input(3).is_some() || pads.len() != 8 || pads.iter().any(|&p| p < 0) {
        return None;
    }
    (pads[0] == 0 && pads[1] == 0 && pads[4] == 0 && pads[5] == 0).then_some([pads[2], pads[3], pads[6], pads[7]])
}

fn pads_into_convs(graph: &mut Graph, report: &mut PassReport) -> Result<()> {
    for ix in graph.topo_order()? {
        let pad = graph.node(ix);
        if pad.op() != "Pad" || !pad.is_standard() {
            continue;
        }
        let (Some(x), Some(y)) = (pad.input(0).map(str::to_string), pad.output(0).map(str::to_string)) else { continue };
        let Some(extra) = spatial_zero_pads(graph, pad) else { continue };
        let [(conv_ix, 0)] = graph.consumers(&y)[..] else { continue };
        let conv = graph.node(conv_ix);
        let explicit = conv.attr_str("auto_pad").is_none_or(|a| a == "NOTSET" || a.is_empty());
        if conv.op() != "Conv" || !conv.is_standard() || !explicit || graph.is_graph_output(&y) {
            continue;
        }
        let old: Vec<i64> = conv.attr_ints("pads").map_or(vec![0; 4], <[i64]>::to_vec);
        if old.len() != 4 {
            continue;
        }
        let merged: Vec<i64> = old.iter().zip(extra).map(|(a, b)| a + b).collect();
        let (pad_name, conv_name) = (pad.name().to_string(), conv.name().to_string());
        graph.update_node(conv_ix, |c| {
            c.proto.input[0] = x.clone();
            c.set_attr_ints("pads", &merged);
        })?;
        graph.remove_node(ix)?;
        report.change(&conv_name, format!("zero Pad `{pad_name}` merged into its pads {merged:?}"));
    }
    Ok(())
}

/// The conv feeding Add `node` and the per-channel constant it adds, if it is a bias.
fn conv_bias(graph: &Graph, shapes: &Shapes, add: &Node) -> Option<(NodeIndex, String, Vec<f32>)> {
    if add.op() != "Add" || !add.is_standard() || add.inputs().len() != 2 {
        return None;
    }
    for (a, b) in [(0, 1), (1, 0)] {
        let (x, b) = (add.input(a)?, add.input(b)?);
        let Some((conv, 0)) = graph.producer(x) else { continue };
        let c = graph.node(conv);
        let gemm = c.op() == "Gemm" && c.attr_float("beta").unwrap_or(1.0) == 1.0;
        let explicit = (c.op() == "Conv" || gemm) && c.is_standard() && graph.constant_f32(c.input(1).unwrap_or("")).is_some();
        let rank = if gemm { 2 } else { 4 };
        let channels = shape_of(shapes, x).filter(|s| s.len() == rank)?[1];
        let Some(bias) = graph.constant_f32(b) else { continue };
        let per_channel = if gemm {
            matches!(bias.shape(), [n] | [1, n] if *n == channels)
        } else {
            matches!(bias.shape(), [1, n, 1, 1] | [n, 1, 1] if *n == channels)
        };
        // The old bias must be this node's own: another reader would see the sum too.
        let bias_ok =
            c.input(2).is_none_or(|old| graph.constant_f32(old).is_some_and(|o| o.len() == channels) && graph.use_count(old) == 1);
        if explicit && per_channel && bias_ok && graph.use_count(x) == 1 {
            return Some((conv, x.to_string(), bias.iter().copied().collect()));
        }
    }
    None
}

fn biases_into_convs(graph: &mut Graph, shapes: &Shapes, report: &mut PassReport) -> Result<()> {
    for ix in graph.topo_order()? {
        let add = graph.node(ix);
        let Some((conv, _, bias)) = conv_bias(graph, shapes, add) else { continue };
        let (add_name, y) = (add.name().to_string(), add.output(0).unwrap_or_default().to_string());
        let old = graph.bias_or_zeros(conv, bias.len());
        graph.set_bias(conv, old.iter().zip(&bias).map(|(a, b)| a + b).collect());
        graph.remove_node(ix)?;
        graph.update_node(conv, |c| c.proto.output[0] = y.clone())?;
        report.change(graph.node(conv).name(), format!("the constant added by `{add_name}` became its bias"));
    }
    Ok(())
}

fn matmuls_into_gemms(graph: &mut Graph, shapes: &Shapes, report: &mut PassReport) -> Result<()> {
    for ix in graph.topo_order()? {
        let node = graph.node(ix);
        let (Some(x), Some(w), Some(y)) = (node.input(0), node.input(1), node.output(0)) else { continue };
        let weight_2d = graph.constant_f32(w).is_some_and(|a| a.ndim() == 2);
        if node.op() != "MatMul" || !node.is_standard() || !weight_2d || shape_of(shapes, x).is_none_or(|s| s.len() != 2) {
            continue;
        }
        let gemm = Node::new("Gemm", node.name(), &[x, w], &[y]);
        let name = node.name().to_string();
        graph.replace_node(ix, vec![gemm])?;
        report.change(&name, "MatMul of a 2-d input by a weight is Gemm");
    }
    Ok(())
}

/// Removes default-domain nodes none of whose outputs is read; returns how many.
fn remove_dead(graph: &mut Graph) -> Result<usize> {
    let mut removed = 0;
    loop {
        let dead: Vec<NodeIndex> = graph
            .node_indices()
            .into_iter()
            .filter(|&ix| {
                let n = graph.node(ix);
                n.is_standard() && !n.has_subgraph() && n.outputs().iter().all(|o| o.is_empty() || graph.use_count(o) == 0)
            })
            .collect();
        if dead.is_empty() {
            return Ok(removed);
        }
        for ix in dead {
            graph.remove_node(ix)?;
            removed += 1;
        }
    }
}
