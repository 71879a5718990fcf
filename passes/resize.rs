//! Pass `resize`: the network computes at a smaller size than the one it is
//! given — MobileNet's resolution multiplier, kept inside the model so its
//! interface (input shape, preprocessing) does not change.
//!
//! Before:  X [N,C,H,W] → readers of X
//! After:   X → Resize (linear, half_pixel, scales [1, 1, s, s]) → Xs [N,C,size,size] → readers of X
//!
//! `s` is the smallest f32 with `floor(H * s) == size` (tract and ONNX
//! Runtime both truncate `H * s`; `size / H` itself may round below). A
//! convolutional network up to a global pooling computes ~(size / H)² of its
//! MACs; its weights do not change. When it pays: photos whose own size is
//! below the input size (a 150-px photo upsampled to 224 carries nothing a
//! 160-px copy lacks), and students trained at a smaller size than they run
//! at. Passes after it (refits, `retarget`, `distill`) see the network at
//! `size`.
//!
//! Applies to the model's single 4-d data input with a square, concrete
//! size (symbolic H and W take 224 unless `--input-shape` says otherwise).
//! Declines, with the reason, when: the opset is below 11 (no linear Resize
//! with half_pixel coordinates), the input is not square or not larger than
//! `size`, or the network does not accept the smaller size (a Flatten into a
//! Gemm without global pooling: shape inference fails).
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
        let side = shape.map_or(0, |s| s[2]);
        let mut trial = model.graph.clone();
        insert(&mut trial, &input, side, size, opset)?;
        match crate::shape::infer(&trial, &Default::default()) {
            Ok(_) => {
                model.graph = trial;
                report.change(
                    &input,
                    format!("the network computes at {size}x{size} instead of {side}x{side} (linear Resize after the input)"),
                );
            }
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

/// The smallest f32 scale `s` with `floor(side * s) == size`, in f32 (tract)
/// and f64 (ONNX Runtime, our shape inference) arithmetic alike.
pub fn scale_for(side: usize, size: usize) -> f32 {
    let mut s = size as f32 / side as f32;
    while (side as f32 * s) < size as f32 || (side as f64 * s as f64) < size as f64 {
        s = f32::from_bits(s.to_bits() + 1);
    }
    s
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
    for (reader, slot) in graph.consumers(input) {
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
