//! Shape inference over the IR, with concrete dimensions: a symbolic
//! dimension (e.g. the batch `N`) counts as 1 unless overridden. Ops we do
//! not know take their shape from the model's value_info, or stay unknown.
//! A mismatch (a conv weight that disagrees with its input, broadcast
//! failures, …) is an error naming the node.
use crate::error::{Error, Result};
use crate::ir::conv::Window;
use crate::ir::{Data, Graph, Node};
use crate::onnx::{tensor_proto::DataType, type_proto, ValueInfoProto};
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

const FLOAT: i32 = DataType::Float as i32;

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
        let info = match overrides.get(input.name()) {
            Some(shape) => TensorInfo { dtype: value_info_dtype(input).unwrap_or(FLOAT), shape: Some(shape.clone()) },
            None => value_info_tensor(input),
        };
        shapes.insert(input.name().to_string(), info);
    }
    let declared: HashMap<&str, &ValueInfoProto> = graph.meta.value_info.iter().chain(&graph.meta.output).map(|v| (v.name(), v)).collect();
    for ix in graph.topo_order()? {
        let node = graph.node(ix);
        let outs = infer_node(graph, node, &shapes).map_err(|reason| Error::Shape {
            node: node.name().to_string(),
            op: node.op().to_string(),
            reason,
        })?;
        for (slot, name) in node.outputs().iter().enumerate() {
            if name.is_empty() {
                continue;
            }
            let inferred = outs.get(slot).cloned().flatten();
            let info = match (inferred, declared.get(name.as_str())) {
                (Some(info), _) => info,
                (None, Some(vi)) => value_info_tensor(vi),
                (None, None) => TensorInfo { dtype: 0, shape: None },
            };
            shapes.insert(name.clone(), info);
        }
    }
    Ok(shapes)
}

/// The element type declared by a value_info, if it is a tensor.
fn value_info_dtype(vi: &ValueInfoProto) -> Option<i32> {
    match vi.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => t.elem_type,
        _ => None,
    }
}

/// A value_info's tensor type with symbolic or missing dims taken as 1.
pub fn value_info_tensor(vi: &ValueInfoProto) -> TensorInfo {
    let dtype = value_info_dtype(vi).unwrap_or(0);
    let shape = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => t.shape.as_ref().map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(crate::onnx::tensor_shape_proto::dimension::Value::DimValue(v)) if v >= 0 => v as usize,
                    _ => 1,
                })
                .collect()
        }),
        _ => None,
    };
    TensorInfo { dtype, shape }
}

type Outs = std::result::Result<Vec<Option<TensorInfo>>, String>;

fn infer_node(graph: &Graph, node: &Node, shapes: &Shapes) -> Outs {
    let input = |slot: usize| -> Option<&TensorInfo> { node.input(slot).and_then(|n| shapes.get(n)) };
    let first = input(0).cloned();
    if !node.is_standard() {
        return Ok(vec![]);
    }
    // Without the first input's shape there is nothing to compute from.
    let Some(x) = first.clone().filter(|t| t.shape.is_some()) else {
        return Ok(match node.op() {
            "Constant" => vec![constant_info(node)],
            _ => vec![],
        });
    };
    let xs = x.shape.clone().unwrap_or_default();
    let same = |shape: Vec<usize>| Ok(vec![Some(TensorInfo { dtype: x.dtype, shape: Some(shape) })]);
    match node.op() {
        "Conv" => same(conv(node, &xs, input(1), input(2))?),
        "BatchNormalization" => {
            batchnorm(&xs, node, &input)?;
            same(xs)
        }
        "Relu" | "Clip" | "Sigmoid" | "Tanh" | "LeakyRelu" | "Elu" | "Selu" | "HardSigmoid" | "HardSwish" | "Exp" | "Log" | "Abs"
        | "Neg" | "Sqrt" | "Reciprocal" | "Identity" | "Dropout" | "Softmax" | "LogSoftmax" | "Erf" | "Gelu" | "Softplus" | "Mish"
        | "Floor" | "Ceil" | "Round" | "Sign" | "LRN" => same(xs),
        "Cast" => Ok(vec![Some(TensorInfo { dtype: node.attr_int("to").unwrap_or(0) as i32, shape: Some(xs) })]),
        "Add" | "Mul" | "Sub" | "Div" | "Pow" | "Max" | "Min" | "Sum" | "Mean" | "PRelu" => same(broadcast_all(node, shapes)?),
        "MaxPool" | "AveragePool" | "LpPool" => same(pool(node, &xs)?),
        "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => {
            let mut s = xs.clone();
            s.iter_mut().skip(2).for_each(|d| *d = 1);
            same(s)
        }
        "Flatten" => same(flatten(node, &xs)?),
        "Reshape" => Ok(vec![reshape(graph, node, &xs)?.map(|s| TensorInfo { dtype: x.dtype, shape: Some(s) })]),
        "Gemm" => same(gemm(node, &xs, input(1))?),
        "MatMul" => same(matmul(&xs, input(1))?),
        "Concat" => same(concat(node, shapes)?),
        "Transpose" => same(transpose(node, &xs)?),
        "Shape" => Ok(vec![Some(TensorInfo { dtype: DataType::Int64 as i32, shape: Some(vec![xs.len()]) })]),
        _ => Ok(vec![]),
    }
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

fn conv(node: &Node, x: &[usize], w: Option<&TensorInfo>, b: Option<&TensorInfo>) -> std::result::Result<Vec<usize>, String> {
    let ws = known(w).ok_or("weight shape unknown")?;
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
    Ok(out)
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
    let n = a.len().max(b.len());
    let at = |s: &[usize], i: usize| if i + s.len() >= n { s[i + s.len() - n] } else { 1 };
    (0..n)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            _ => Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        })
        .collect()
}

fn broadcast_all(node: &Node, shapes: &Shapes) -> std::result::Result<Vec<usize>, String> {
    let mut out: Vec<usize> = vec![];
    for name in node.inputs().iter().filter(|n| !n.is_empty()) {
        let s = shapes.get(name).and_then(|t| t.shape.as_ref()).ok_or_else(|| format!("shape of `{name}` unknown"))?;
        out = broadcast(&out, s)?;
    }
    Ok(out)
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

fn reshape(graph: &Graph, node: &Node, x: &[usize]) -> std::result::Result<Option<Vec<usize>>, String> {
    let Some(target) = node.input(1).and_then(|n| graph.constant(n)) else { return Ok(None) };
    let Data::I64(t) = target.data() else { return Err("shape input is not int64".into()) };
    let allow_zero = node.attr_int("allowzero").unwrap_or(0) == 1;
    let total: usize = x.iter().product();
    let mut out = Vec::with_capacity(t.len());
    let mut infer_at = None;
    for (i, &d) in t.iter().enumerate() {
        match d {
            -1 if infer_at.is_none() => {
                infer_at = Some(i);
                out.push(1);
            }
            0 if !allow_zero => out.push(*x.get(i).ok_or("0 in shape copies a missing input dim")?),
            d if d >= 0 => out.push(d as usize),
            _ => return Err(format!("bad target shape {:?}", t.as_slice())),
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer_at {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot reshape {x:?} to {:?}", t.as_slice()));
        }
        out[i] = total / known;
    } else if known != total {
        return Err(format!("cannot reshape {x:?} ({total} elements) to {out:?}"));
    }
    Ok(Some(out))
}

fn gemm(node: &Node, a: &[usize], b: Option<&TensorInfo>) -> std::result::Result<Vec<usize>, String> {
    let b = known(b).ok_or("B shape unknown")?;
    if a.len() != 2 || b.len() != 2 {
        return Err(format!("Gemm needs 2-d inputs, got {a:?} and {b:?}"));
    }
    let (m, k) = if node.attr_int("transA").unwrap_or(0) == 1 { (a[1], a[0]) } else { (a[0], a[1]) };
    let (kb, n) = if node.attr_int("transB").unwrap_or(0) == 1 { (b[1], b[0]) } else { (b[0], b[1]) };
    if k != kb {
        return Err(format!("A {a:?} and B {b:?} disagree on the inner dimension ({k} vs {kb})"));
    }
    Ok(vec![m, n])
}

fn matmul(a: &[usize], b: Option<&TensorInfo>) -> std::result::Result<Vec<usize>, String> {
    let b = known(b).ok_or("B shape unknown")?;
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
    Ok(out)
}

fn concat(node: &Node, shapes: &Shapes) -> std::result::Result<Vec<usize>, String> {
    let mut out: Option<Vec<usize>> = None;
    let mut ax = 0;
    for name in node.inputs().iter().filter(|n| !n.is_empty()) {
        let s = shapes.get(name).and_then(|t| t.shape.as_ref()).ok_or_else(|| format!("shape of `{name}` unknown"))?;
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
    out.ok_or_else(|| "no inputs".into())
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
