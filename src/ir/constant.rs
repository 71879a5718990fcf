//! Constant values: what a tensor holds when it does not depend on the
//! graph's inputs — an initializer, a `Constant` node, or an op over such
//! tensors (the shape arithmetic exporters emit: `Shape` of a weight,
//! `Gather`, `Concat`, `Unsqueeze`, `ConstantOfShape`, `Expand`, …).
//! [`eval`] computes one node's outputs from constant inputs, for the ops
//! listed in [`FOLDABLE`]; anything else is left to the runtime.
use super::{Graph, Node, Weight};
use crate::onnx::{tensor_proto::DataType, TensorProto};
use ndarray::{ArrayD, Axis, IxDyn};

/// A constant's numbers (the dtypes shape arithmetic and weights use).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    F32(ArrayD<f32>),
    I64(ArrayD<i64>),
}

/// Ops [`eval`] computes.
pub const FOLDABLE: &[&str] = &[
    "Identity",
    "Cast",
    "CastLike",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Reshape",
    "Slice",
    "ConstantOfShape",
    "Expand",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Transpose",
];

/// Tensors larger than this are not produced by folding (a folded
/// `ConstantOfShape` could otherwise blow a few bytes up into gigabytes).
pub const MAX_FOLDED_ELEMENTS: usize = 1 << 22;

impl Value {
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::F32(a) => a.shape(),
            Value::I64(a) => a.shape(),
        }
    }
    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> i32 {
        match self {
            Value::F32(_) => DataType::Float as i32,
            Value::I64(_) => DataType::Int64 as i32,
        }
    }
    /// The values as integers (shape arithmetic), if they are.
    pub fn ints(&self) -> Option<Vec<i64>> {
        match self {
            Value::I64(a) => Some(a.iter().copied().collect()),
            Value::F32(_) => None,
        }
    }
    /// A weight named `name` holding these values.
    pub fn into_weight(self, name: &str) -> Weight {
        match self {
            Value::F32(a) => Weight::from_f32(name, a),
            Value::I64(a) => Weight::from_i64(name, a),
        }
    }
    fn of_weight(w: &Weight) -> Option<Value> {
        match w.data() {
            super::Data::F32(a) => Some(Value::F32(a.clone())),
            super::Data::I64(a) => Some(Value::I64(a.clone())),
            _ => None,
        }
    }
}

/// The tensor a `Constant` node holds (`value`, `value_float(s)`,
/// `value_int(s)`), named after its output; `None` for other attributes
/// (sparse or string constants).
pub fn constant_node_tensor(node: &Node) -> Option<TensorProto> {
    let name = node.output(0)?.to_string();
    let attr = node.proto.attribute.first().filter(|_| node.proto.attribute.len() == 1)?;
    let mut t = match attr.name() {
        "value" => attr.t.clone()?,
        "value_float" => TensorProto { data_type: Some(DataType::Float as i32), float_data: vec![attr.f?], ..Default::default() },
        "value_floats" => TensorProto {
            data_type: Some(DataType::Float as i32),
            dims: vec![attr.floats.len() as i64],
            float_data: attr.floats.clone(),
            ..Default::default()
        },
        "value_int" => TensorProto { data_type: Some(DataType::Int64 as i32), int64_data: vec![attr.i?], ..Default::default() },
        "value_ints" => TensorProto {
            data_type: Some(DataType::Int64 as i32),
            dims: vec![attr.ints.len() as i64],
            int64_data: attr.ints.clone(),
            ..Default::default()
        },
        _ => return None,
    };
    // External data inside a node attribute is not resolved here.
    if !t.external_data.is_empty() {
        return None;
    }
    t.name = Some(name);
    Some(t)
}

/// The value of `tensor` if it is an initializer (not overridable as a
/// graph input) or the output of a `Constant` node.
pub fn value_of(graph: &Graph, tensor: &str) -> Option<Value> {
    if let Some(w) = graph.constant(tensor) {
        return Value::of_weight(w);
    }
    let (ix, _) = graph.producer(tensor)?;
    let node = graph.node(ix);
    if node.op() != "Constant" || !node.is_standard() {
        return None;
    }
    Weight::decode(constant_node_tensor(node)?, None).ok().as_ref().and_then(Value::of_weight)
}

/// `node`'s outputs from its inputs' values (`None` for an omitted
/// optional input); `None` when the op is not foldable here or the inputs
/// do not fit it. `shapes[i]`/`dtypes[i]` describe input i even when it is
/// not constant (`Shape` and `CastLike` read only that).
pub fn eval(node: &Node, inputs: &[Option<Value>], shapes: &[Option<Vec<usize>>], dtypes: &[i32]) -> Option<Vec<Value>> {
    if !node.is_standard() {
        return None;
    }
    let arg = |i: usize| inputs.get(i).cloned().flatten();
    let ints = |i: usize| arg(i).and_then(|v| v.ints());
    let out = match node.op() {
        "Identity" => arg(0)?,
        "Cast" => cast(arg(0)?, node.attr_int("to")? as i32)?,
        "CastLike" => cast(arg(0)?, *dtypes.get(1)?)?,
        "Shape" => shape_of(node, shapes.first()?.as_ref()?)?,
        "Gather" => gather(arg(0)?, &arg(1)?, node.attr_int("axis").unwrap_or(0))?,
        "Unsqueeze" => unsqueeze(arg(0)?, &node.attr_ints("axes").map(<[i64]>::to_vec).or_else(|| ints(1))?)?,
        "Squeeze" => squeeze(arg(0)?, node.attr_ints("axes").map(<[i64]>::to_vec).or_else(|| ints(1)))?,
        "Concat" => concat(inputs, node.attr_int("axis")?)?,
        "Reshape" => reshape(arg(0)?, &ints(1)?, node.attr_int("allowzero").unwrap_or(0) == 1)?,
        "Slice" => slice(arg(0)?, &ints(1)?, &ints(2)?, ints(3), ints(4))?,
        "ConstantOfShape" => constant_of_shape(node, &ints(0)?)?,
        "Expand" => expand(arg(0)?, &ints(1)?)?,
        "Add" | "Sub" | "Mul" | "Div" => binary(node.op(), arg(0)?, arg(1)?)?,
        "Neg" => match arg(0)? {
            Value::F32(a) => Value::F32(-a),
            Value::I64(a) => Value::I64(-a),
        },
        "Transpose" => transpose(arg(0)?, node.attr_ints("perm"))?,
        _ => return None,
    };
    (out.len() <= MAX_FOLDED_ELEMENTS).then_some(vec![out])
}

/// [`eval`] of a single-output `node` from what the caller knows of its
/// inputs: `value` of a tensor, if constant, and `info` its (shape, dtype).
/// Shape reads only its input's shape and CastLike only its second input's
/// type; any other present input without a value leaves the node alone.
pub fn eval_with(node: &Node, value: impl Fn(&str) -> Option<Value>, info: impl Fn(&str) -> (Option<Vec<usize>>, i32)) -> Option<Value> {
    if !FOLDABLE.contains(&node.op()) || node.outputs().len() != 1 {
        return None;
    }
    let inputs: Vec<Option<Value>> = match node.op() {
        "Shape" => vec![None],
        _ => node.inputs().iter().map(|n| if n.is_empty() { None } else { value(n) }).collect(),
    };
    let needed = match node.op() {
        "CastLike" => 1,
        "Shape" => 0,
        _ => node.inputs().len(),
    };
    if node.inputs().iter().zip(&inputs).take(needed).any(|(n, v)| !n.is_empty() && v.is_none()) {
        return None;
    }
    let (shapes, dtypes): (Vec<_>, Vec<_>) = node.inputs().iter().map(|n| info(n)).unzip();
    eval(node, &inputs, &shapes, &dtypes)?.into_iter().next()
}

fn cast(v: Value, to: i32) -> Option<Value> {
    Some(match (v, DataType::try_from(to).ok()?) {
        (Value::F32(a), DataType::Float) => Value::F32(a),
        (Value::I64(a), DataType::Int64) => Value::I64(a),
        (Value::I64(a), DataType::Float) => Value::F32(a.mapv(|x| x as f32)),
        (Value::F32(a), DataType::Int64) => Value::I64(a.mapv(|x| x as i64)),
        _ => return None,
    })
}

fn shape_of(node: &Node, shape: &[usize]) -> Option<Value> {
    let rank = shape.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
    let start = clamp(node.attr_int("start").unwrap_or(0));
    let end = clamp(node.attr_int("end").unwrap_or(rank));
    let dims: Vec<i64> = shape.get(start..end.max(start))?.iter().map(|&d| d as i64).collect();
    Some(Value::I64(ArrayD::from_shape_vec(IxDyn(&[dims.len()]), dims).ok()?))
}

fn axis(raw: i64, rank: usize) -> Option<usize> {
    let a = if raw < 0 { raw + rank as i64 } else { raw };
    (0..rank as i64).contains(&a).then_some(a as usize)
}

fn gather(data: Value, indices: &Value, ax: i64) -> Option<Value> {
    let idx = indices.ints()?;
    let rank = data.shape().len();
    let ax = axis(ax, rank)?;
    let n = data.shape()[ax] as i64;
    let picks: Vec<usize> = idx.iter().map(|&i| axis(i, n as usize)).collect::<Option<_>>()?;
    let mut out_shape: Vec<usize> = data.shape()[..ax].to_vec();
    out_shape.extend(indices.shape());
    out_shape.extend(&data.shape()[ax + 1..]);
    fn pick<T: Clone>(a: &ArrayD<T>, ax: usize, picks: &[usize], shape: &[usize]) -> Option<ArrayD<T>> {
        a.select(Axis(ax), picks).into_shape_with_order(IxDyn(shape)).ok()
    }
    Some(match data {
        Value::F32(a) => Value::F32(pick(&a, ax, &picks, &out_shape)?),
        Value::I64(a) => Value::I64(pick(&a, ax, &picks, &out_shape)?),
    })
}

fn with_shape(v: Value, shape: &[usize]) -> Option<Value> {
    Some(match v {
        Value::F32(a) => Value::F32(a.as_standard_layout().into_owned().into_shape_with_order(IxDyn(shape)).ok()?),
        Value::I64(a) => Value::I64(a.as_standard_layout().into_owned().into_shape_with_order(IxDyn(shape)).ok()?),
    })
}

fn unsqueeze(v: Value, axes: &[i64]) -> Option<Value> {
    let rank = v.shape().len() + axes.len();
    let mut at: Vec<usize> = axes.iter().map(|&a| axis(a, rank)).collect::<Option<_>>()?;
    at.sort_unstable();
    let mut dims = v.shape().iter().copied();
    let shape: Vec<usize> = (0..rank).map(|i| if at.contains(&i) { Some(1) } else { dims.next() }).collect::<Option<_>>()?;
    with_shape(v, &shape)
}

fn squeeze(v: Value, axes: Option<Vec<i64>>) -> Option<Value> {
    let rank = v.shape().len();
    let drop: Vec<usize> = match axes {
        Some(axes) => axes.iter().map(|&a| axis(a, rank)).collect::<Option<_>>()?,
        None => (0..rank).filter(|&i| v.shape()[i] == 1).collect(),
    };
    if drop.iter().any(|&i| v.shape()[i] != 1) {
        return None;
    }
    let shape: Vec<usize> = (0..rank).filter(|i| !drop.contains(i)).map(|i| v.shape()[i]).collect();
    with_shape(v, &shape)
}

fn concat(inputs: &[Option<Value>], ax: i64) -> Option<Value> {
    let values: Vec<&Value> = inputs.iter().map(Option::as_ref).collect::<Option<_>>()?;
    let first = values.first()?;
    let ax = axis(ax, first.shape().len())?;
    Some(match first {
        Value::F32(_) => {
            let parts: Vec<_> = values.iter().map(|v| if let Value::F32(a) = v { Some(a.view()) } else { None }).collect::<Option<_>>()?;
            Value::F32(ndarray::concatenate(Axis(ax), &parts).ok()?)
        }
        Value::I64(_) => {
            let parts: Vec<_> = values.iter().map(|v| if let Value::I64(a) = v { Some(a.view()) } else { None }).collect::<Option<_>>()?;
            Value::I64(ndarray::concatenate(Axis(ax), &parts).ok()?)
        }
    })
}

/// ONNX Reshape's target with its `0` (copy) and `-1` (infer) resolved.
pub fn reshape_target(input: &[usize], target: &[i64], allow_zero: bool) -> Option<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            -1 if infer_at.is_none() => {
                infer_at = Some(i);
                out.push(1);
            }
            0 if !allow_zero => out.push(*input.get(i)?),
            d if d >= 0 => out.push(d as usize),
            _ => return None,
        }
    }
    let known: usize = out.iter().product();
    match infer_at {
        Some(i) if known != 0 && total.is_multiple_of(known) => out[i] = total / known,
        None if known == total => {}
        _ => return None,
    }
    Some(out)
}

fn reshape(v: Value, target: &[i64], allow_zero: bool) -> Option<Value> {
    let shape = reshape_target(v.shape(), target, allow_zero)?;
    with_shape(v, &shape)
}

fn slice(v: Value, starts: &[i64], ends: &[i64], axes: Option<Vec<i64>>, steps: Option<Vec<i64>>) -> Option<Value> {
    let rank = v.shape().len();
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if axes.len() != starts.len() || ends.len() != starts.len() || steps.len() != starts.len() {
        return None;
    }
    let mut out = v;
    for i in 0..starts.len() {
        let ax = axis(axes[i], rank)?;
        let picks = slice_indices(out.shape()[ax] as i64, starts[i], ends[i], steps[i])?;
        out = match out {
            Value::F32(a) => Value::F32(a.select(Axis(ax), &picks)),
            Value::I64(a) => Value::I64(a.select(Axis(ax), &picks)),
        };
    }
    Some(out)
}

/// The indices ONNX Slice picks on an axis of `n` elements (a negative
/// step walks backwards: torch's `F.pad` reverses its pads that way).
fn slice_indices(n: i64, start: i64, end: i64, step: i64) -> Option<Vec<usize>> {
    let norm = |x: i64| if x < 0 { x.saturating_add(n) } else { x };
    let mut picks = vec![];
    match step {
        0 => return None,
        s if s > 0 => {
            let (mut i, e) = (norm(start).clamp(0, n), norm(end).clamp(0, n));
            while i < e {
                picks.push(i as usize);
                i += s;
            }
        }
        s => {
            if n == 0 {
                return Some(picks);
            }
            let (mut i, e) = (norm(start).clamp(0, n - 1), norm(end).clamp(-1, n - 1));
            while i > e {
                picks.push(i as usize);
                i += s;
            }
        }
    }
    Some(picks)
}

fn constant_of_shape(node: &Node, dims: &[i64]) -> Option<Value> {
    let shape: Vec<usize> = dims.iter().map(|&d| usize::try_from(d).ok()).collect::<Option<_>>()?;
    if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))? > MAX_FOLDED_ELEMENTS {
        return None;
    }
    let fill = match node.attr_tensor("value") {
        Some(t) => Value::of_weight(&Weight::decode(t.clone(), None).ok()?)?,
        None => Value::F32(ArrayD::zeros(IxDyn(&[1]))),
    };
    Some(match fill {
        Value::F32(a) => Value::F32(ArrayD::from_elem(IxDyn(&shape), *a.iter().next()?)),
        Value::I64(a) => Value::I64(ArrayD::from_elem(IxDyn(&shape), *a.iter().next()?)),
    })
}

/// The numpy-style broadcast of two shapes, if they broadcast.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let at = |s: &[usize], i: usize| if i + s.len() >= n { s[i + s.len() - n] } else { 1 };
    (0..n)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

fn expand(v: Value, dims: &[i64]) -> Option<Value> {
    let target: Vec<usize> = dims.iter().map(|&d| usize::try_from(d).ok()).collect::<Option<_>>()?;
    let shape = broadcast_shape(v.shape(), &target)?;
    if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))? > MAX_FOLDED_ELEMENTS {
        return None;
    }
    Some(match v {
        Value::F32(a) => Value::F32(a.broadcast(IxDyn(&shape))?.to_owned()),
        Value::I64(a) => Value::I64(a.broadcast(IxDyn(&shape))?.to_owned()),
    })
}

fn binary(op: &str, a: Value, b: Value) -> Option<Value> {
    broadcast_shape(a.shape(), b.shape())?;
    Some(match (a, b) {
        (Value::F32(a), Value::F32(b)) => Value::F32(match op {
            "Add" => &a + &b,
            "Sub" => &a - &b,
            "Mul" => &a * &b,
            _ => &a / &b,
        }),
        (Value::I64(a), Value::I64(b)) => {
            // Overflow (a crafted model) leaves the node to the runtime.
            let f: fn(i64, i64) -> Option<i64> = match op {
                "Add" => i64::checked_add,
                "Sub" => i64::checked_sub,
                "Mul" => i64::checked_mul,
                // ONNX integer division truncates, like Rust's.
                _ => i64::checked_div,
            };
            let shape = broadcast_shape(a.shape(), b.shape())?;
            let (a, b) = (a.broadcast(IxDyn(&shape))?, b.broadcast(IxDyn(&shape))?);
            let out: Option<Vec<i64>> = a.iter().zip(b.iter()).map(|(&x, &y)| f(x, y)).collect();
            Value::I64(ArrayD::from_shape_vec(IxDyn(&shape), out?).ok()?)
        }
        _ => return None,
    })
}

fn transpose(v: Value, perm: Option<&[i64]>) -> Option<Value> {
    let rank = v.shape().len();
    let perm: Vec<usize> = match perm {
        Some(p) => p.iter().map(|&x| axis(x, rank)).collect::<Option<_>>()?,
        None => (0..rank).rev().collect(),
    };
    let mut seen = perm.clone();
    seen.sort_unstable();
    if seen != (0..rank).collect::<Vec<_>>() {
        return None;
    }
    Some(match v {
        Value::F32(a) => Value::F32(a.permuted_axes(IxDyn(&perm)).as_standard_layout().into_owned()),
        Value::I64(a) => Value::I64(a.permuted_axes(IxDyn(&perm)).as_standard_layout().into_owned()),
    })
}
