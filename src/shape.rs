//! Shape inference over the IR, with concrete dimensions. A symbolic batch
//! (the leading dim of an input) counts as 1; symbolic height and width of
//! a 4-d input take [`DEFAULT_RESOLUTION`] unless `--input-shape` says
//! otherwise ([`input_notes`] says which size was taken). Small integer
//! tensors (shape arithmetic: `Shape`, `Gather`, `Concat`, …) are evaluated
//! along, so a `Reshape` to a computed shape has a shape too. Ops we do not
//! know take their shape from the model's value_info when it is concrete,
//! or stay unknown — and so do the tensors computed from them: only a pass
//! that needs a shape declines for it. A real mismatch (a conv weight that
//! disagrees with its input, broadcast failures, …) is an error naming the
//! node.
use crate::error::{Error, Result};
use crate::ir::constant::{self, Value};
use crate::ir::conv::Window;
use crate::ir::{Graph, Node};
use crate::onnx::{tensor_proto::DataType, tensor_shape_proto::dimension::Value as Dim, type_proto, ValueInfoProto};
use std::collections::HashMap;

/// What we know of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: i32,
    pub shape: Option<Vec<usize>>,
}

/// Tensor name → info, for every tensor of the graph.
pub type Shapes = HashMap<String, TensorInfo>;

/// Per-input shape overrides, e.g. from `--input-shape input:1,3,224,224`.
pub type InputShapes = HashMap<String, Vec<usize>>;

/// The height and width a 4-d input with symbolic spatial dims takes (the
/// size the default preprocessing produces).
pub const DEFAULT_RESOLUTION: usize = 224;

const FLOAT: i32 = DataType::Float as i32;

/// Integer tensors up to this size are evaluated during inference.
const MAX_TRACKED: usize = 64;

/// Infers the shape of every tensor of `graph`.
pub fn infer(graph: &Graph, overrides: &InputShapes) -> Result<Shapes> {
    let mut shapes = Shapes::new();
    for (name, w) in graph.weights() {
        shapes.insert(name.clone(), TensorInfo { dtype: w.dtype(), shape: Some(w.shape()) });
    }
    for input in &graph.meta.input {
        if graph.weights().contains_key(input.name()) && !overrides.contains_key(input.name()) {
            continue;
        }
        shapes.insert(input.name().to_string(), input_info(input, overrides.get(input.name())));
    }
    let declared: HashMap<&str, &ValueInfoProto> = graph.meta.value_info.iter().chain(&graph.meta.output).map(|v| (v.name(), v)).collect();
    let mut values: HashMap<String, Value> = HashMap::new();
    for ix in graph.topo_order()? {
        let node = graph.node(ix);
        let outs = infer_node(graph, node, &shapes, &values).map_err(|reason| Error::Shape {
            node: node.name().to_string(),
            op: node.op().to_string(),
            reason,
        })?;
        let value = evaluate(graph, node, &shapes, &values);
        for (slot, name) in node.outputs().iter().enumerate() {
            if name.is_empty() {
                continue;
            }
            let inferred = outs.get(slot).cloned().flatten();
            let from_value = value.as_ref().filter(|_| slot == 0).map(|v| TensorInfo { dtype: v.dtype(), shape: Some(v.shape().to_vec()) });
            let info = match (inferred.or(from_value), declared.get(name.as_str())) {
                (Some(info), _) => info,
                (None, Some(vi)) => declared_info(vi),
                (None, None) => TensorInfo { dtype: 0, shape: None },
            };
            shapes.insert(name.clone(), info);
        }
        if let (Some(v), Some(out)) = (value, node.output(0)) {
            values.insert(out.to_string(), v);
        }
    }
    Ok(shapes)
}

/// A small integer tensor's value (shape arithmetic), if its inputs' are known.
fn evaluate(graph: &Graph, node: &Node, shapes: &Shapes, values: &HashMap<String, Value>) -> Option<Value> {
    let value = |n: &str| -> Option<Value> {
        values.get(n).cloned().or_else(|| {
            let small = shapes.get(n).and_then(|t| t.shape.as_ref()).is_some_and(|s| s.iter().product::<usize>() <= MAX_TRACKED);
            small.then(|| constant::value_of(graph, n)).flatten()
        })
    };
    let info = |n: &str| shapes.get(n).map_or((None, 0), |t| (t.shape.clone(), t.dtype));
    let out = constant::eval_with(node, value, info)?;
    (matches!(out, Value::I64(_)) && out.len() <= MAX_TRACKED).then_some(out)
}

/// The element type declared by a value_info, if it is a tensor.
fn value_info_dtype(vi: &ValueInfoProto) -> Option<i32> {
    match vi.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => t.elem_type,
        _ => None,
    }
}

/// The declared dims: `Some(n)` for a concrete one, `None` for a symbolic one.
fn declared_dims(vi: &ValueInfoProto) -> Option<Vec<Option<usize>>> {
    match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => t.shape.as_ref().map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(Dim::DimValue(v)) if v >= 0 => Some(v as usize),
                    _ => None,
                })
                .collect()
        }),
        _ => None,
    }
}

/// A value_info's tensor type with symbolic or missing dims taken as 1.
pub fn value_info_tensor(vi: &ValueInfoProto) -> TensorInfo {
    let dtype = value_info_dtype(vi).unwrap_or(0);
    TensorInfo { dtype, shape: declared_dims(vi).map(|d| d.into_iter().map(|d| d.unwrap_or(1)).collect()) }
}

/// An intermediate tensor's declared type: usable when every dim but the
/// leading (batch) one is concrete; otherwise the shape stays unknown.
fn declared_info(vi: &ValueInfoProto) -> TensorInfo {
    let dtype = value_info_dtype(vi).unwrap_or(0);
    let shape = declared_dims(vi).and_then(|d| d.iter().enumerate().map(|(i, d)| d.or((i == 0).then_some(1))).collect());
    TensorInfo { dtype, shape }
}

/// A graph input's shape: the override, or the declared dims with a
/// symbolic batch as 1 and symbolic H, W of a 4-d input as
/// [`DEFAULT_RESOLUTION`]; unknown if another dim is symbolic.
pub fn input_info(vi: &ValueInfoProto, over: Option<&Vec<usize>>) -> TensorInfo {
    let dtype = value_info_dtype(vi).unwrap_or(FLOAT);
    if let Some(shape) = over {
        return TensorInfo { dtype, shape: Some(shape.clone()) };
    }
    let shape = declared_dims(vi).and_then(|dims| {
        let spatial = spatial_axes(&dims);
        dims.iter()
            .enumerate()
            .map(|(i, d)| match (d, i) {
                (Some(n), _) => Some(*n),
                (None, 0) => Some(1),
                (None, i) if spatial.contains(&i) => Some(DEFAULT_RESOLUTION),
                (None, _) => None,
            })
            .collect()
    });
    TensorInfo { dtype, shape }
}

/// The height and width axes of a 4-d image input: 2, 3 (NCHW), or 1, 2
/// when the last dim is a concrete channel count of 1, 3 or 4 and the
/// second is not (NHWC, as Keras models have it).
fn spatial_axes(dims: &[Option<usize>]) -> [usize; 2] {
    match dims {
        [_, None, _, Some(1 | 3 | 4)] => [1, 2],
        [_, _, _, _] => [2, 3],
        _ => [usize::MAX; 2],
    }
}

/// One line per graph input whose symbolic height/width took the default
/// size (so the user learns which size stats and checks used).
pub fn input_notes(graph: &Graph, overrides: &InputShapes) -> Vec<String> {
    let mut notes = vec![];
    for input in graph.meta.input.iter().filter(|i| !graph.weights().contains_key(i.name()) && !overrides.contains_key(i.name())) {
        let Some(dims) = declared_dims(input) else { continue };
        let [h, w] = spatial_axes(&dims);
        if dims.len() == 4 && (dims[h].is_none() || dims[w].is_none()) {
            let shape = input_info(input, None).shape.unwrap_or_default();
            notes.push(format!(
                "input `{}` has a symbolic height/width: using {shape:?} (give --input-shape {}:DIMS for another size)",
                input.name(),
                input.name()
            ));
        }
    }
    notes
}

type Outs = std::result::Result<Vec<Option<TensorInfo>>, String>;
type Dims = std::result::Result<Option<Vec<usize>>, String>;

/// The int values of `tensor`: evaluated shape arithmetic, an initializer or a Constant node.
fn ints_of(graph: &Graph, values: &HashMap<String, Value>, tensor: Option<&str>) -> Option<Vec<i64>> {
    let t = tensor?;
    values.get(t).and_then(Value::ints).or_else(|| constant::value_of(graph, t).and_then(|v| v.ints()))
}

fn floats_of(graph: &Graph, tensor: Option<&str>) -> Option<Vec<f32>> {
    match constant::value_of(graph, tensor?)? {
        Value::F32(a) => Some(a.iter().copied().collect()),
        Value::I64(_) => None,
    }
}

fn infer_node(graph: &Graph, node: &Node, shapes: &Shapes, values: &HashMap<String, Value>) -> Outs {
    let input = |slot: usize| -> Option<&TensorInfo> { node.input(slot).and_then(|n| shapes.get(n)) };
    if !node.is_standard() {
        return Ok(vec![]);
    }
    // Without the first input's shape there is nothing to compute from.
    let Some(x) = input(0).cloned().filter(|t| t.shape.is_some()) else {
        return Ok(match node.op() {
            "Constant" => vec![constant_info(node)],
            _ => vec![],
        });
    };
    let xs = x.shape.clone().unwrap_or_default();
    let ints = |slot: usize| ints_of(graph, values, node.input(slot));
    let typed = |dtype: i32, shape: Option<Vec<usize>>| Ok(vec![shape.map(|s| TensorInfo { dtype, shape: Some(s) })]);
    let same = |shape: Dims| typed(x.dtype, shape?);
    match node.op() {
        "Conv" => same(conv(node, &xs, input(1), input(2))),
        "BatchNormalization" => {
            batchnorm(&xs, node, &input)?;
            same(Ok(Some(xs)))
        }
        "Relu" | "Clip" | "Sigmoid" | "Tanh" | "LeakyRelu" | "Elu" | "Selu" | "HardSigmoid" | "HardSwish" | "Exp" | "Log" | "Abs"
        | "Neg" | "Sqrt" | "Reciprocal" | "Identity" | "Dropout" | "Softmax" | "LogSoftmax" | "Erf" | "Gelu" | "Softplus" | "Mish"
        | "Floor" | "Ceil" | "Round" | "Sign" | "LRN" | "Not" | "IsNaN" => same(Ok(Some(xs))),
        "Cast" => typed(node.attr_int("to").unwrap_or(0) as i32, Some(xs)),
        "CastLike" => typed(input(1).map_or(0, |t| t.dtype), Some(xs)),
        "Add" | "Mul" | "Sub" | "Div" | "Pow" | "Max" | "Min" | "Sum" | "Mean" | "PRelu" => same(broadcast_all(node, shapes)),
        "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "And" | "Or" => {
            typed(DataType::Bool as i32, broadcast_all(node, shapes)?)
        }
        "Where" => typed(input(1).map_or(0, |t| t.dtype), broadcast_all(node, shapes)?),
        "MaxPool" | "AveragePool" | "LpPool" => same(pool(node, &xs).map(Some)),
        "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => {
            let mut s = xs.clone();
            s.iter_mut().skip(2).for_each(|d| *d = 1);
            same(Ok(Some(s)))
        }
        "ReduceMean" | "ReduceMax" | "ReduceMin" | "ReduceSum" | "ReduceProd" | "ReduceL2" | "ReduceL1" | "ReduceLogSumExp" => {
            same(reduce(node, &xs, ints(1)))
        }
        "Flatten" => same(flatten(node, &xs).map(Some)),
        "Reshape" => match ints(1) {
            Some(t) => same(
                constant::reshape_target(&xs, &t, node.attr_int("allowzero").unwrap_or(0) == 1)
                    .map(Some)
                    .ok_or_else(|| format!("cannot reshape {xs:?} to {t:?}")),
            ),
            None => Ok(vec![]),
        },
        "Gemm" => same(gemm(node, &xs, input(1))),
        "MatMul" => same(matmul(&xs, input(1))),
        "Concat" => same(concat(node, shapes)),
        "Transpose" => same(transpose(node, &xs).map(Some)),
        "Shape" => {
            let rank = xs.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank);
            let n = clamp(node.attr_int("end").unwrap_or(rank)) - clamp(node.attr_int("start").unwrap_or(0));
            typed(DataType::Int64 as i32, Some(vec![n.max(0) as usize]))
        }
        "Pad" => same(pad(&xs, node.attr_ints("pads").map(<[i64]>::to_vec).or_else(|| ints(1)), ints(3))),
        "Resize" | "Upsample" => same(resize(graph, node, &xs, values)),
        "Unsqueeze" => same(unsqueeze(&xs, node.attr_ints("axes").map(<[i64]>::to_vec).or_else(|| ints(1)))),
        "Squeeze" => same(squeeze(&xs, node.attr_ints("axes").map(<[i64]>::to_vec).or_else(|| ints(1)), node.input(1).is_some())),
        "Expand" => same(Ok(ints(1).and_then(|t| broadcast(&xs, &t.iter().map(|&d| d.max(0) as usize).collect::<Vec<_>>()).ok()))),
        "ConstantOfShape" => {
            let dtype = node.attr_tensor("value").and_then(|t| t.data_type).unwrap_or(FLOAT);
            typed(dtype, ints(0).map(|v| v.iter().map(|&d| d.max(0) as usize).collect()))
        }
        _ => Ok(vec![]),
    }
}

fn reduce(node: &Node, x: &[usize], axes_input: Option<Vec<i64>>) -> Dims {
    let noop = node.attr_int("noop_with_empty_axes").unwrap_or(0) == 1;
    let axes = match node.attr_ints("axes").map(<[i64]>::to_vec).or(axes_input) {
        Some(a) if a.is_empty() && noop => return Ok(Some(x.to_vec())),
        Some(a) if a.is_empty() => (0..x.len() as i64).collect(),
        Some(a) => a,
        None if node.input(1).is_some() => return Ok(None),
        None if noop => return Ok(Some(x.to_vec())),
        None => (0..x.len() as i64).collect(),
    };
    let axes: Vec<usize> = axes.iter().map(|&a| axis(a, x.len(), false)).collect::<std::result::Result<_, _>>()?;
    let keep = node.attr_int("keepdims").unwrap_or(1) == 1;
    Ok(Some(x.iter().enumerate().filter_map(|(i, &d)| if axes.contains(&i) { keep.then_some(1) } else { Some(d) }).collect()))
}

fn pad(x: &[usize], pads: Option<Vec<i64>>, axes: Option<Vec<i64>>) -> Dims {
    let Some(pads) = pads else { return Ok(None) };
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&a| axis(a, x.len(), false)).collect::<std::result::Result<_, _>>()?,
        None => (0..x.len()).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return Err(format!("{} pads for {} axes", pads.len(), axes.len()));
    }
    let mut out = x.to_vec();
    for (k, &a) in axes.iter().enumerate() {
        let size = out[a] as i64 + pads[k] + pads[k + axes.len()];
        if size < 0 {
            return Err(format!("pads {pads:?} shrink axis {a} of {x:?} below zero"));
        }
        out[a] = size as usize;
    }
    Ok(Some(out))
}

fn resize(graph: &Graph, node: &Node, x: &[usize], values: &HashMap<String, Value>) -> Dims {
    // Resize: (X, roi, scales, sizes); Upsample: (X, scales) or the `scales` attribute.
    let (scales_slot, sizes_slot) = if node.op() == "Upsample" { (1, usize::MAX) } else { (2, 3) };
    if let Some(sizes) = ints_of(graph, values, node.input(sizes_slot)).filter(|s| !s.is_empty()) {
        if sizes.len() != x.len() {
            return Ok(None);
        }
        return Ok(Some(sizes.iter().map(|&d| d.max(0) as usize).collect()));
    }
    let scales =
        node.attr("scales").map(|a| a.floats.clone()).filter(|s| !s.is_empty()).or_else(|| floats_of(graph, node.input(scales_slot)));
    match scales.filter(|s| s.len() == x.len()) {
        // In f32, as tract and ONNX Runtime compute it (`(d as f32 * s) as usize`):
        // in f64, 10 × 0.7f32 is 6.99999… and floors to 6, where they get 7.
        Some(s) => Ok(Some(x.iter().zip(&s).map(|(&d, &f)| (d as f32 * f).max(0.0) as usize).collect())),
        None => Ok(None),
    }
}

fn unsqueeze(x: &[usize], axes: Option<Vec<i64>>) -> Dims {
    let Some(axes) = axes else { return Ok(None) };
    let rank = x.len() + axes.len();
    let at: Vec<usize> = axes.iter().map(|&a| axis(a, rank, false)).collect::<std::result::Result<_, _>>()?;
    let mut dims = x.iter().copied();
    Ok((0..rank).map(|i| if at.contains(&i) { Some(1) } else { dims.next() }).collect())
}

fn squeeze(x: &[usize], axes: Option<Vec<i64>>, axes_given: bool) -> Dims {
    let drop: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&a| axis(a, x.len(), false)).collect::<std::result::Result<_, _>>()?,
        None if axes_given => return Ok(None),
        None => (0..x.len()).filter(|&i| x[i] == 1).collect(),
    };
    if let Some(&i) = drop.iter().find(|&&i| x[i] != 1) {
        return Err(format!("cannot squeeze axis {i} of size {}", x[i]));
    }
    Ok(Some((0..x.len()).filter(|i| !drop.contains(i)).map(|i| x[i]).collect()))
}

fn known(t: Option<&TensorInfo>) -> Option<&Vec<usize>> {
    t.and_then(|t| t.shape.as_ref())
}

fn constant_info(node: &Node) -> Option<TensorInfo> {
    let t = node.attr_tensor("value")?;
    Some(TensorInfo { dtype: t.data_type.unwrap_or(0), shape: Some(t.dims.iter().map(|&d| d.max(0) as usize).collect()) })
}

/// Output spatial sizes of a sliding window, honouring auto_pad and ceil_mode.
fn spatial(node: &Node, input: &[usize], w: &Window) -> std::result::Result<Vec<usize>, String> {
    let auto_pad = node.attr_str("auto_pad").unwrap_or_else(|| "NOTSET".into());
    let ceil = node.attr_int("ceil_mode").unwrap_or(0) == 1;
    let n = w.kernel.len();
    (0..n)
        .map(|i| {
            let reach = w.dilations[i] * (w.kernel[i].max(1) - 1) + 1;
            let size = input[i];
            match auto_pad.as_str() {
                "SAME_UPPER" | "SAME_LOWER" => Ok(size.div_ceil(w.strides[i])),
                "VALID" => size
                    .checked_sub(reach)
                    .map(|r| r / w.strides[i] + 1)
                    .ok_or_else(|| format!("kernel reach {reach} exceeds input size {size}")),
                "NOTSET" | "" => {
                    let padded = size + w.pads[i] + w.pads[i + n];
                    let r = padded.checked_sub(reach).ok_or_else(|| format!("kernel reach {reach} exceeds padded input size {padded}"))?;
                    Ok(if ceil { r.div_ceil(w.strides[i]) + 1 } else { r / w.strides[i] + 1 })
                }
                other => Err(format!("unknown auto_pad `{other}`")),
            }
        })
        .collect()
}

fn conv(node: &Node, x: &[usize], w: Option<&TensorInfo>, b: Option<&TensorInfo>) -> Dims {
    let Some(ws) = known(w) else { return Ok(None) };
    if x.len() < 3 || ws.len() != x.len() {
        return Err(format!("input rank {} and weight rank {} do not match", x.len(), ws.len()));
    }
    let group = node.attr_int("group").unwrap_or(1);
    if group < 1 {
        return Err(format!("group {group} < 1"));
    }
    let group = group as usize;
    if ws[1] * group != x[1] {
        return Err(format!("input has {} channels but the weight {:?} with group {group} expects {}", x[1], ws, ws[1] * group));
    }
    if ws[0] % group != 0 {
        return Err(format!("{} output channels are not divisible by group {group}", ws[0]));
    }
    if let Some(bs) = known(b) {
        if bs.as_slice() != [ws[0]] {
            return Err(format!("bias shape {bs:?} does not match {} output channels", ws[0]));
        }
    }
    let kernel = match node.attr_ints("kernel_shape") {
        Some(k) if k.iter().map(|&v| v as usize).eq(ws[2..].iter().copied()) => ws[2..].to_vec(),
        Some(k) => return Err(format!("kernel_shape {k:?} disagrees with weight {ws:?}")),
        None => ws[2..].to_vec(),
    };
    let w = Window::of(node, kernel)?;
    let mut out = vec![x[0], ws[0]];
    out.extend(spatial(node, &x[2..], &w)?);
    Ok(Some(out))
}

fn batchnorm<'a>(x: &[usize], node: &Node, input: &dyn Fn(usize) -> Option<&'a TensorInfo>) -> std::result::Result<(), String> {
    let c = *x.get(1).ok_or("input has no channel axis")?;
    for slot in 1..5 {
        if let Some(s) = known(input(slot)) {
            if s.as_slice() != [c] {
                return Err(format!("parameter `{}` has shape {s:?}, expected [{c}]", node.input(slot).unwrap_or("")));
            }
        }
    }
    Ok(())
}

fn pool(node: &Node, x: &[usize]) -> std::result::Result<Vec<usize>, String> {
    let kernel: Vec<usize> = node.attr_ints("kernel_shape").ok_or("missing kernel_shape")?.iter().map(|&k| k.max(0) as usize).collect();
    if x.len() != kernel.len() + 2 {
        return Err(format!("kernel {kernel:?} does not fit input {x:?}"));
    }
    let w = Window::of(node, kernel)?;
    let mut out = x[..2].to_vec();
    out.extend(spatial(node, &x[2..], &w)?);
    Ok(out)
}

fn broadcast(a: &[usize], b: &[usize]) -> std::result::Result<Vec<usize>, String> {
    constant::broadcast_shape(a, b).ok_or_else(|| format!("shapes {a:?} and {b:?} do not broadcast"))
}

fn broadcast_all(node: &Node, shapes: &Shapes) -> Dims {
    let mut out: Vec<usize> = vec![];
    for name in node.inputs().iter().filter(|n| !n.is_empty()) {
        let Some(s) = shapes.get(name).and_then(|t| t.shape.as_ref()) else { return Ok(None) };
        out = broadcast(&out, s)?;
    }
    Ok(Some(out))
}

fn axis(raw: i64, rank: usize, allow_end: bool) -> std::result::Result<usize, String> {
    let a = if raw < 0 { raw + rank as i64 } else { raw };
    let limit = rank as i64 + i64::from(allow_end);
    if a < 0 || a >= limit {
        return Err(format!("axis {raw} out of range for rank {rank}"));
    }
    Ok(a as usize)
}

fn flatten(node: &Node, x: &[usize]) -> std::result::Result<Vec<usize>, String> {
    let a = axis(node.attr_int("axis").unwrap_or(1), x.len(), true)?;
    Ok(vec![x[..a].iter().product(), x[a..].iter().product()])
}

fn gemm(node: &Node, a: &[usize], b: Option<&TensorInfo>) -> Dims {
    let Some(b) = known(b) else { return Ok(None) };
    if a.len() != 2 || b.len() != 2 {
        return Err(format!("Gemm needs 2-d inputs, got {a:?} and {b:?}"));
    }
    let (m, k) = if node.attr_int("transA").unwrap_or(0) == 1 { (a[1], a[0]) } else { (a[0], a[1]) };
    let (kb, n) = if node.attr_int("transB").unwrap_or(0) == 1 { (b[1], b[0]) } else { (b[0], b[1]) };
    if k != kb {
        return Err(format!("A {a:?} and B {b:?} disagree on the inner dimension ({k} vs {kb})"));
    }
    Ok(Some(vec![m, n]))
}

fn matmul(a: &[usize], b: Option<&TensorInfo>) -> Dims {
    let Some(b) = known(b) else { return Ok(None) };
    if a.is_empty() || b.is_empty() {
        return Err("MatMul of a scalar".into());
    }
    let a2: Vec<usize> = if a.len() == 1 { vec![1, a[0]] } else { a.to_vec() };
    let b2: Vec<usize> = if b.len() == 1 { vec![b[0], 1] } else { b.to_vec() };
    let (k1, k2) = (a2[a2.len() - 1], b2[b2.len() - 2]);
    if k1 != k2 {
        return Err(format!("A {a:?} and B {b:?} disagree on the inner dimension"));
    }
    let mut out = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2])?;
    if a.len() > 1 {
        out.push(a2[a2.len() - 2]);
    }
    if b.len() > 1 {
        out.push(b2[b2.len() - 1]);
    }
    Ok(Some(out))
}

fn concat(node: &Node, shapes: &Shapes) -> Dims {
    let mut out: Option<Vec<usize>> = None;
    let mut ax = 0;
    for name in node.inputs().iter().filter(|n| !n.is_empty()) {
        let Some(s) = shapes.get(name).and_then(|t| t.shape.as_ref()) else { return Ok(None) };
        match &mut out {
            None => {
                ax = axis(node.attr_int("axis").ok_or("missing axis")?, s.len(), false)?;
                out = Some(s.clone());
            }
            Some(o) => {
                let fits = o.len() == s.len() && o.iter().zip(s).enumerate().all(|(i, (a, b))| i == ax || a == b);
                if !fits {
                    return Err(format!("input `{name}` {s:?} does not fit {o:?} along axis {ax}"));
                }
                o[ax] += s[ax];
            }
        }
    }
    out.map(Some).ok_or_else(|| "no inputs".into())
}

fn transpose(node: &Node, x: &[usize]) -> std::result::Result<Vec<usize>, String> {
    let perm: Vec<usize> = match node.attr_ints("perm") {
        Some(p) => p.iter().map(|&v| v.max(0) as usize).collect(),
        None => (0..x.len()).rev().collect(),
    };
    let mut seen = perm.clone();
    seen.sort();
    if seen != (0..x.len()).collect::<Vec<_>>() {
        return Err(format!("perm {perm:?} is not a permutation of rank {}", x.len()));
    }
    Ok(perm.iter().map(|&p| x[p]).collect())
}
