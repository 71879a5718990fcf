//! Pass `resize`: the network computes at a smaller size than the one it is
//! given — MobileNet's resolution multiplier, kept inside the model so its
//! interface (input shape, preprocessing) does not change.
//!
//! Before:  X [N,C,H,W] → readers of X
//! After:   X → Resize (linear, half_pixel, scales [1, 1, s, s]) → Xs [N,C,size,size] → readers of X
//!
//! `s` is the smallest f32 with `floor(H * s) == size` (tract and ONNX
//! Runtime truncate `H * s` in f32; `size / H` itself may round below). A
//! convolutional network up to a global pooling computes ~(size / H)² of its
//! MACs; its weights do not change. When it pays: photos whose own size is
//! below the input size (a 150-px photo upsampled to 224 carries nothing a
//! 160-px copy lacks), and students trained at a smaller size than they run
//! at. Passes after it (refits, `retarget`, `distill`) see the network at
//! `size`.
//!
//! Applies to the model's (first) data input when it is a square 4-d image
//! of known size (symbolic H and W take 224 unless `--input-shape` says
//! otherwise; the scale is fixed, so an input of another size is computed at
//! `floor(H * s)`). `Shape` and `Size` nodes keep reading the input itself.
//! Declines, with the reason, when: the opset is below 11 (no linear Resize
//! with half_pixel coordinates), the graph has subgraphs (their bodies may
//! read the input unseen), the input has no readers, is not square or not
//! larger than `size`, or the network does not accept the smaller size
//! (shape inference fails, e.g. a Flatten into a Gemm without global
//! pooling) or would change the shape of a graph output (a network whose
//! output is an image).
use super::{Pass, PassContext, PassReport};
use crate::error::{Error, Result};
use crate::ir::{Graph, Model, Node, Weight};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeOptions {
    /// The height and width the network computes at (required).
    pub size: Option<usize>,
}

/// The `resize` pass.
pub struct Resize;

impl Pass for Resize {
    const NAME: &'static str = "resize";
    type Options = ResizeOptions;

    fn validate(options: &ResizeOptions) -> Result<()> {
        match options.size {
            None => Err(Error::Config(
                "`resize.size` is required: the height and width the network computes at, e.g. `resize: {size: 160}`".into(),
            )),
            Some(s) if s < 8 => Err(Error::Config(format!("`resize.size` is {s}, but must be at least 8"))),
            Some(_) => Ok(()),
        }
    }

    fn run(model: &mut Model, ctx: &PassContext, options: &ResizeOptions) -> Result<PassReport> {
        let mut report = PassReport::default();
        let size = options.size.unwrap_or_default();
        let opset = model.opset();
        let Some(input) = model.graph.data_input().map(|i| i.name().to_string()) else {
            report.decline("(input)", "the model has no data input");
            return Ok(report);
        };
        let shape = ctx.shapes.get(&input).and_then(|t| t.shape.clone());
        if let Err(reason) = applies(opset, shape.as_deref(), size) {
            report.decline(&input, reason);
            return Ok(report);
        }
        if model.graph.nodes().any(|n| n.has_subgraph()) {
            report.decline(&input, "the graph has subgraphs, which may read the input from the outer scope");
            return Ok(report);
        }
        if resized_readers(&model.graph, &input).is_empty() {
            report.decline(&input, "nothing but Shape or Size reads it");
            return Ok(report);
        }
        let shape = shape.unwrap_or_default();
        let side = shape[2];
        let mut trial = model.graph.clone();
        insert(&mut trial, &input, side, size, opset)?;
        let overrides = [(input.clone(), shape)].into();
        match crate::shape::infer(&trial, &overrides) {
            Ok(after) => match changed_output(&trial, ctx.shapes, &after) {
                Some(out) => report.decline(&input, format!("graph output `{out}` would change its shape")),
                None => {
                    model.graph = trial;
                    report.change(
                        &input,
                        format!("the network computes at {size}x{size} instead of {side}x{side} (linear Resize after the input)"),
                    );
                }
            },
            Err(e) => report.decline(&input, format!("the network does not accept {size}x{size}: {e}")),
        }
        Ok(report)
    }
}

/// Why the pass cannot apply to an input of `shape`, if it cannot.
fn applies(opset: i64, shape: Option<&[usize]>, size: usize) -> std::result::Result<(), String> {
    if opset < 11 {
        return Err(format!("opset {opset} < 11 has no linear Resize with half_pixel coordinates"));
    }
    let Some(shape) = shape else { return Err("its shape is unknown".into()) };
    if shape.len() != 4 || shape[2] != shape[3] {
        return Err(format!("it is {shape:?}, not a square NxCxHxW image"));
    }
    if shape[2] <= size {
        return Err(format!("it is {}x{}, not larger than {size}x{size}", shape[2], shape[3]));
    }
    Ok(())
}

/// The smallest f32 scale `s` with `floor(side * s) == size`, in f32 (tract,
/// ONNX Runtime, our shape inference) and f64 arithmetic alike.
pub fn scale_for(side: usize, size: usize) -> f32 {
    let mut s = size as f32 / side as f32;
    while (side as f32 * s) < size as f32 || (side as f64 * s as f64) < size as f64 {
        s = f32::from_bits(s.to_bits() + 1);
    }
    s
}

/// The readers of `input` that get the resized image: all but `Shape` and
/// `Size`, which keep describing the model's input.
fn resized_readers(graph: &Graph, input: &str) -> Vec<(petgraph::stable_graph::NodeIndex, usize)> {
    graph.consumers(input).into_iter().filter(|&(ix, _)| !matches!(graph.node(ix).op(), "Shape" | "Size")).collect()
}

/// A graph output whose shape `after` differs from `before`, if any.
fn changed_output(graph: &Graph, before: &crate::shape::Shapes, after: &crate::shape::Shapes) -> Option<String> {
    let shape = |s: &crate::shape::Shapes, name: &str| s.get(name).and_then(|t| t.shape.clone());
    graph.meta.output.iter().map(|o| o.name().to_string()).find(|name| shape(before, name) != shape(after, name))
}

/// Puts a Resize of `input` to `size`x`size` between it and every reader.
fn insert(graph: &mut Graph, input: &str, side: usize, size: usize, opset: i64) -> Result<()> {
    let out = graph.fresh_name(&format!("{input}_{size}px"));
    let scales = graph.fresh_name(&format!("{input}_resize_scales"));
    let s = scale_for(side, size);
    graph.insert_weight(scales.clone(), Weight::from_f32(&scales, ndarray::arr1(&[1.0, 1.0, s, s]).into_dyn()))?;
    // roi is a required input before opset 13: an empty tensor.
    let roi = if opset < 13 {
        let roi = graph.fresh_name(&format!("{input}_resize_roi"));
        graph.insert_weight(roi.clone(), Weight::from_f32(&roi, ndarray::Array1::<f32>::zeros(0).into_dyn()))?;
        roi
    } else {
        String::new()
    };
    for (reader, slot) in resized_readers(graph, input) {
        graph.update_node(reader, |n| n.proto.input[slot] = out.clone())?;
    }
    let mut node = Node::new("Resize", &graph.fresh_name(&format!("{input}_resize")), &[input, &roi, &scales], &[&out]);
    node.set_attr_str("mode", "linear");
    node.set_attr_str("coordinate_transformation_mode", "half_pixel");
    graph.add_node(node)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_gives_the_size_in_f32_and_f64() {
        for side in [224usize, 256, 299, 384] {
            for size in 8..side {
                let s = scale_for(side, size);
                assert_eq!((side as f32 * s) as usize, size, "{side} -> {size}");
                assert_eq!((side as f64 * s as f64).floor() as usize, size, "{side} -> {size}");
            }
        }
    }
}
