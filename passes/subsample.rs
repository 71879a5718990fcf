//! Pass `subsample`: strided 1x1 convs read one shared depthwise
//! subsampling conv instead of striding themselves. Exact; for tract.
//!
//! Before:  X [N,C,H,W] → Conv W [M, C, 1, 1], strides [sh, sw] → Y   (each such reader of X)
//! After:   X → Conv S [C, 1, sh, sw], group C, strides [sh, sw], end pads
//!          [(sh − H mod sh) mod sh, (sw − W mod sw) mod sw] → Xs
//!          → Conv W, strides [1, 1] → Y
//!
//! S is 1 at tap (0, 0) of every channel and 0 elsewhere: Xs[c, i, j] =
//! X[c, sh·i, sw·j], exactly the pixels a strided 1x1 conv reads, and the
//! output size is ⌈H/sh⌉ × ⌈W/sw⌉ both ways (the end pads only complete the
//! last window; its tap (0, 0) lies inside X). The outputs are equal bit for
//! bit (a product by 1 and sums of exact zeros), given finite inputs.
//!
//! Why: tract runs a strided 1x1 conv as one copy per strided axis
//! (`Downsample`), which its optimizer pulls up through the Add and ReLU
//! before it onto both inputs of the Add: four copies per ResNet stage
//! (7.5 % of the factorized task student's time) and an Add that no longer
//! fuses into the product writing it. A depthwise conv whose group equals
//! its input and output channels runs in tract's depthwise kernel instead.
//! Measured on the factorized task student (docs/RESULTS.md, session 22):
//! the copies and the unfused Adds gone, 3 stages' worth of ~1 ms each.
//! Other runtimes stride 1x1 convs natively: use this pass for tract, last
//! in a pipeline (the refits and `distill` then see plain convs before it).
//!
//! Applies to Convs of the default domain with a 1x1 kernel (a 4-d f32
//! weight [M, C/group, 1, 1] from an initializer), a stride above 1 on
//! some axis, zero (explicit) pads and a 4-d input of known channel count
//! and size. Readers of the same X with the same strides share one S.
//! Declines, with the reason, when: `auto_pad` is SAME_UPPER/SAME_LOWER or
//! the pads are not zero, the conv is grouped, the weight is not f32, or
//! X's shape is unknown.
use super::{Pass, PassContext, PassReport};
use crate::error::Result;
use crate::ir::conv::{explicit_pads, Window};
use crate::ir::{Graph, Model, Node, Weight};
use crate::shape::Shapes;
use ndarray::Array4;
use petgraph::stable_graph::NodeIndex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SubsampleOptions {}

/// The `subsample` pass.
pub struct Subsample;

impl Pass for Subsample {
    const NAME: &'static str = "subsample";
    // Exact, but its taps are weights: a budget fitted before it counts them.
    const SIZES: bool = true;
    type Options = SubsampleOptions;

    fn run(model: &mut Model, ctx: &PassContext, _options: &SubsampleOptions) -> Result<PassReport> {
        let graph = &mut model.graph;
        let mut report = PassReport::default();
        // (X, strides) → the subsampled tensor, shared by every such reader.
        let mut made: HashMap<(String, [usize; 2]), String> = HashMap::new();
        for ix in graph.topo_order()? {
            let Some(window) = strided_1x1(graph, ix) else { continue };
            let strides = [window.strides[0], window.strides[1]];
            let name = graph.node(ix).name().to_string();
            match plan(graph, ctx.shapes, ix, &window) {
                Ok((x, channels, size)) => {
                    let key = (x.clone(), strides);
                    let xs = match made.get(&key) {
                        Some(xs) => xs.clone(),
                        None => {
                            let xs = insert(graph, &x, channels, size, strides)?;
                            made.insert(key, xs.clone());
                            xs
                        }
                    };
                    graph.update_node(ix, |n| {
                        n.proto.input[0] = xs.clone();
                        n.set_attr_ints("strides", &[1, 1]);
                    })?;
                    report.change(&name, format!("reads `{xs}` (`{x}` subsampled by {}x{}) with stride 1", strides[0], strides[1]));
                }
                Err(reason) => report.decline(&name, reason),
            }
        }
        Ok(report)
    }
}

/// The window of a 1x1 Conv of the default domain that strides, if it is one.
fn strided_1x1(graph: &Graph, ix: NodeIndex) -> Option<Window> {
    let node = graph.node(ix);
    if !node.is_standard() || node.op() != "Conv" {
        return None;
    }
    let shape = graph.weight(node.input(1)?)?.shape();
    if shape.len() != 4 || shape[2] != 1 || shape[3] != 1 {
        return None;
    }
    let window = Window::of(node, vec![1, 1]).ok()?;
    window.strides.iter().any(|&s| s > 1).then_some(window)
}

/// X, its channel count and its (H, W) if the conv can read a subsampled X;
/// Err with the reason otherwise.
fn plan(graph: &Graph, shapes: &Shapes, ix: NodeIndex, window: &Window) -> std::result::Result<(String, usize, [usize; 2]), String> {
    let node = graph.node(ix);
    if !explicit_pads(node) && node.attr_str("auto_pad").as_deref() != Some("VALID") {
        return Err("`auto_pad` SAME_* pads a strided conv by its stride, not by its 1x1 kernel".into());
    }
    if window.pads.iter().any(|&p| p != 0) {
        return Err("its pads are not zero".into());
    }
    if node.attr_int("group").unwrap_or(1) != 1 {
        return Err("grouped conv".into());
    }
    let wname = node.input(1).unwrap_or("");
    if graph.weight(wname).and_then(|w| w.as_f32()).is_none() {
        return Err("its weight is not f32".into());
    }
    let x = node.input(0).ok_or("no input")?.to_string();
    let shape = shapes.get(&x).and_then(|t| t.shape.clone());
    match shape.as_deref() {
        Some(&[_, c, h, w]) if c > 0 && h > 0 && w > 0 => Ok((x, c, [h, w])),
        _ => Err(format!("the shape of its input `{x}` is unknown or not 4-d")),
    }
}

/// Adds the subsampling conv of `x` for `strides`; returns its output's name.
fn insert(graph: &mut Graph, x: &str, channels: usize, size: [usize; 2], strides: [usize; 2]) -> Result<String> {
    let base = format!("{x}_sub{}x{}", strides[0], strides[1]);
    let out = graph.fresh_name(&base);
    let wname = graph.fresh_name(&format!("{base}_w"));
    let mut taps = Array4::<f32>::zeros((channels, 1, strides[0], strides[1]));
    taps.slice_mut(ndarray::s![.., 0, 0, 0]).fill(1.0);
    graph.insert_weight(wname.clone(), Weight::from_f32(&wname, taps.into_dyn()))?;
    let end = |axis: usize| ((strides[axis] - size[axis] % strides[axis]) % strides[axis]) as i64;
    let mut node = Node::new("Conv", &graph.fresh_name(&base), &[x, &wname], &[&out]);
    node.set_attr_int("group", channels as i64);
    node.set_attr_ints("kernel_shape", &[strides[0] as i64, strides[1] as i64]);
    node.set_attr_ints("strides", &[strides[0] as i64, strides[1] as i64]);
    node.set_attr_ints("pads", &[0, 0, end(0), end(1)]);
    graph.add_node(node)?;
    Ok(out)
}
