//! A small training engine for the networks our passes emit: Conv (any
//! group, stride, pad, dilation), Relu, Add, MaxPool, GlobalAveragePool,
//! Flatten and Gemm, BN folded. Built from the IR at run time; forward keeps
//! every activation, backward walks the steps in reverse.
//!
//! With `with_batchnorm`, a training-mode BatchNorm is put after every conv
//! (batch statistics forward and backward, running statistics for
//! evaluation), initialized to the identity on the data (`init_batchnorm`)
//! and folded back into the conv on `write_back`. Why: a BN-folded ResNet
//! trains badly — measured on the 1/5-budget student, Adam at lr 1e-5
//! already blows the logits up to ±1000 within 5 steps, while the same
//! network with BN re-inserted trains like the original did.
//!
//! Inside, every value with channels (per-image shape [C, …]) is stored
//! channel-major, `[C][N][H·W]`, so that a conv over the batch is one matrix
//! product per group and a channel is one contiguous run (see `kernels`);
//! flat values ([N, K], after Flatten) stay image-major. The interface
//! speaks image-major: `forward` takes the input as [N][C][H][W],
//! `Activations::value` and the gradient seeds of `backward` are
//! image-major too. The batch is split over rayon's threads by image
//! ranges, so results are reproducible for a fixed thread count. Chosen
//! over burn and candle by measurement (README, `distill`).
pub mod checkpoint;
pub mod distill;
pub mod kernels;
pub mod optim;
pub mod teacher_cache;

use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::shape::Shapes;
use kernels::{ConvGeom, PoolGeom};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A trainable tensor: a weight of the graph, by name.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    /// False for running statistics: kept and checkpointed, not optimized.
    pub trainable: bool,
}

/// How BatchNorm steps behave in a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics (training).
    Train,
    /// Running statistics (evaluation; as training mode, BN is then a
    /// learnable per-channel affine map on frozen statistics).
    Eval,
    /// BN is the identity; batch statistics are still recorded (initialization).
    Bypass,
}

const BN_EPS: f32 = 1e-5;

/// Elementwise activations the engine trains through.
#[derive(Debug, Clone, Copy)]
enum Act {
    Clip { lo: f32, hi: f32 },
    Sigmoid,
    HardSigmoid { alpha: f32, beta: f32 },
    HardSwish,
}

impl Act {
    fn apply(self, x: f32) -> f32 {
        match self {
            Act::Clip { lo, hi } => x.clamp(lo, hi),
            Act::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Act::HardSigmoid { alpha, beta } => (alpha * x + beta).clamp(0.0, 1.0),
            Act::HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
        }
    }
    /// dy/dx at input `x` (output `y`).
    fn slope(self, x: f32, y: f32) -> f32 {
        let inside = |v: f32| if v > 0.0 && v < 1.0 { 1.0 } else { 0.0 };
        match self {
            Act::Clip { lo, hi } => {
                if x > lo && x < hi {
                    1.0
                } else {
                    0.0
                }
            }
            Act::Sigmoid => y * (1.0 - y),
            Act::HardSigmoid { alpha, beta } => alpha * inside(alpha * x + beta),
            Act::HardSwish => (x / 6.0 + 0.5).clamp(0.0, 1.0) + x / 6.0 * inside(x / 6.0 + 0.5),
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Conv {
        x: usize,
        y: usize,
        w: usize,
        b: Option<usize>,
        geom: ConvGeom,
    },
    Relu {
        x: usize,
        y: usize,
    },
    /// With `relu`, y = max(a + b, 0) (the Relu that alone read the sum).
    Add {
        a: usize,
        b: usize,
        y: usize,
        relu: bool,
    },
    MaxPool {
        x: usize,
        y: usize,
        geom: PoolGeom,
    },
    GlobalAvgPool {
        x: usize,
        y: usize,
        hw: usize,
    },
    Flatten {
        x: usize,
        y: usize,
    },
    /// An elementwise activation other than ReLU.
    Act {
        x: usize,
        y: usize,
        f: Act,
    },
    /// y = x · scale[c] + shift[c] per channel (`hw` = H·W): arithmetic
    /// with a constant, such as a baked-in `(x - mean) / std`.
    Affine {
        x: usize,
        y: usize,
        scale: Vec<f32>,
        shift: Vec<f32>,
        hw: usize,
    },
    /// Nearest-neighbour upsampling by integer factors (`F.interpolate`):
    /// y[c, i, j] = x[c, i / fh, j / fw].
    Upsample {
        x: usize,
        y: usize,
        h: usize,
        w: usize,
        fh: usize,
        fw: usize,
    },
    /// Linear resize of H and W (ONNX `Resize`, mode `linear`, half_pixel
    /// coordinates, scales given): each output row (`rows`) and column
    /// (`cols`) reads two input ones, weighted ([`Tap`]).
    Resize {
        x: usize,
        y: usize,
        rows: Vec<Tap>,
        cols: Vec<Tap>,
        h: usize,
        w: usize,
    },
    /// y = a ⊙ b, with `b` per channel (`hw` = H·W, an SE block's scale)
    /// or of `a`'s shape (`hw` = 1, Swish).
    Mul {
        a: usize,
        b: usize,
        y: usize,
        hw: usize,
    },
    /// Per channel of a conv's output: params gamma, beta, running mean,
    /// var; with `relu`, y = max(0, BN(x)) (a Relu that alone read the BN's
    /// output, fused: one pass over the tensor and one tensor fewer kept).
    BatchNorm {
        x: usize,
        y: usize,
        conv: String,
        c: usize,
        p: [usize; 4],
        relu: bool,
    },
    /// y[B,n] = x[B,k]·op(w) + b; w is n×k when `trans_b`, else k×n.
    Gemm {
        x: usize,
        y: usize,
        w: usize,
        b: Option<usize>,
        k: usize,
        n: usize,
        trans_b: bool,
    },
}

/// The trainable network: values (tensors, by per-image length), steps, params.
#[derive(Debug, Clone)]
pub struct Network {
    pub params: Vec<Param>,
    steps: Vec<Step>,
    value_len: Vec<usize>,
    /// (channels, H·W) of the values stored channel-major; None for flat ones.
    dims: Vec<Dims>,
    values: HashMap<String, usize>,
    input: usize,
    output: usize,
    pool: Arc<Pool>,
    times: Arc<StepTimes>,
    /// The matrix products' arithmetic (`set_precision`).
    precision: kernels::Precision,
    /// Conv weights packed for bf16 products, by param (`pack_weights`).
    packed: HashMap<usize, Arc<Vec<kernels::PackedA>>>,
}

/// Wall time summed per kind of step while `Network::profile` is on: where
/// a training step goes, op by op (the bench's `--profile`).
#[derive(Default, Debug)]
struct StepTimes {
    on: std::sync::atomic::AtomicBool,
    sums: Mutex<std::collections::BTreeMap<(String, bool), (f64, usize)>>,
}

impl StepTimes {
    fn start(&self) -> Option<std::time::Instant> {
        self.on.load(std::sync::atomic::Ordering::Relaxed).then(std::time::Instant::now)
    }
    fn add(&self, start: Option<std::time::Instant>, step: &Step, backward: bool) {
        let Some(start) = start else { return };
        // Read the clock before naming the step or waiting for the lock.
        let secs = start.elapsed().as_secs_f64();
        let kind = step.kind();
        let Ok(mut sums) = self.sums.lock() else { return };
        let sum = sums.entry((kind, backward)).or_default();
        (sum.0, sum.1) = (sum.0 + secs, sum.1 + 1);
    }
}

/// Buffers of finished steps, reused by later ones. Why: a training step
/// of ResNet-50 at batch 16 allocates ~2 GB of activations and gradients,
/// and each fresh page costs a fault and a zeroing by the kernel (a third
/// of a step's CPU time for the 1/5 student when every step's gradients
/// came fresh, measured with `perf`).
///
/// Each buffer carries the round (one forward and its backward) that last
/// gave it back; a backward drops the ones its round did not use, and a new
/// round the ones the last round did not, so the pool keeps what one step
/// needs and no stale size (another batch size) lingers.
#[derive(Default)]
struct Pool {
    state: Mutex<PoolState>,
    /// Reused buffers come filled with NaN (a test hook: every kernel must
    /// write all of its outputs).
    poison: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct PoolState {
    round: u64,
    free: Vec<(u64, Vec<f32>)>,
}

impl PoolState {
    /// Frees the buffers the current round neither used nor gave back.
    fn drop_unused(&mut self) {
        let round = self.round;
        self.free.retain(|(r, _)| *r == round);
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pool")
    }
}

impl Pool {
    /// The smallest pooled buffer that holds `len` values (and not more
    /// than twice that), with what it held.
    fn find(&self, len: usize) -> Option<Vec<f32>> {
        let mut state = self.state.lock().ok()?;
        let fits = |v: &Vec<f32>| v.capacity() >= len && v.capacity() <= 2 * len + 1024;
        let best = state.free.iter().enumerate().filter(|(_, (_, v))| fits(v)).min_by_key(|(_, (_, v))| v.capacity()).map(|(i, _)| i)?;
        Some(state.free.swap_remove(best).1)
    }

    /// `len` values for a kernel that writes every one of them (all the
    /// steps' kernels do): a pooled buffer keeps what an earlier step left
    /// in it, because zeroing it first was one more pass over the memory.
    fn take(&self, len: usize) -> Vec<f32> {
        match self.find(len) {
            Some(mut v) => {
                v.resize(len, 0.0);
                if self.poison.load(std::sync::atomic::Ordering::Relaxed) {
                    v.fill(f32::NAN);
                }
                v
            }
            None => vec![0.0; len],
        }
    }

    /// A copy of `v`, in a pooled buffer when one fits.
    fn copy(&self, v: &[f32]) -> Vec<f32> {
        match self.find(v.len()) {
            Some(mut out) => {
                out.clear();
                out.extend_from_slice(v);
                out
            }
            None => v.to_vec(),
        }
    }

    /// Frees every pooled buffer.
    fn clear(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.free.clear();
        }
    }

    /// Starts a round (a forward, and the backward that may follow), and
    /// drops what the last round neither used nor gave back: without a
    /// backward to trim it (forward-only loops), the values built outside
    /// the pool (the input's copy, say) would pile up a buffer per round.
    fn next_round(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.drop_unused();
            state.round += 1;
        }
    }

    /// Frees the buffers that sat unused through the current round.
    fn drop_unused(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.drop_unused();
        }
    }

    /// Keeps `v` for a later `take` (small buffers are not worth it).
    fn give(&self, v: Vec<f32>) {
        if v.capacity() >= PARALLEL_LEN {
            if let Ok(mut state) = self.state.lock() {
                let round = state.round;
                state.free.push((round, v));
            }
        }
    }
}

/// (channels, H·W) of a value stored channel-major, None if flat.
type Dims = Option<(usize, usize)>;

/// What forward keeps for backward.
pub struct Activations {
    pub batch: usize,
    pub mode: Mode,
    values: Vec<Vec<f32>>,
    dims: Vec<Dims>,
    pool: Arc<Pool>,
    argmax: HashMap<usize, Vec<u32>>,
    /// Per BN step: batch mean and variance per channel.
    bn_batch: HashMap<usize, (Vec<f32>, Vec<f32>)>,
}

impl Activations {
    /// The batch of value `v`, image-major (batch × per-image length).
    /// After `Network::backward` only the input is left (the others went
    /// back to the pool): read what you need before.
    pub fn value(&self, v: usize) -> std::borrow::Cow<'_, [f32]> {
        match self.dims[v] {
            Some((c, hw)) => std::borrow::Cow::Owned(transpose_blocks(&self.values[v], c, self.batch, hw)),
            None => std::borrow::Cow::Borrowed(&self.values[v]),
        }
    }
}

impl Drop for Activations {
    fn drop(&mut self) {
        for v in self.values.drain(..) {
            self.pool.give(v);
        }
    }
}

/// [A][B][hw] blocks to [B][A][hw]: image-major [N][C][hw] to
/// channel-major [C][N][hw] with (a, b) = (N, C), and back with (C, N).
fn transpose_blocks(v: &[f32], a: usize, b: usize, hw: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    if hw == 0 || a == 0 || b == 0 {
        return out;
    }
    out.par_chunks_mut(a * hw).enumerate().for_each(|(j, row)| {
        for (i, block) in row.chunks_mut(hw).enumerate() {
            block.copy_from_slice(&v[(i * b + j) * hw..][..hw]);
        }
    });
    out
}

/// One output row (or column) of a linear resize: `w0 · x[i0] + w1 · x[i1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tap {
    i0: usize,
    i1: usize,
    w0: f32,
    w1: f32,
}

/// The taps of `out` outputs resized from `len` inputs by `scale`, as ONNX's
/// linear mode with half_pixel coordinates computes them: position
/// `(o + 0.5) / scale − 0.5`, neighbours clamped to the edge.
fn linear_taps(len: usize, out: usize, scale: f32) -> Vec<Tap> {
    (0..out)
        .map(|o| {
            let x = ((o as f32 + 0.5) / scale - 0.5).max(0.0);
            let i0 = (x.floor() as usize).min(len - 1);
            let i1 = (i0 + 1).min(len - 1);
            let w1 = if i1 == i0 { 0.0 } else { x - i0 as f32 };
            Tap { i0, i1, w0: 1.0 - w1, w1 }
        })
        .collect()
}

fn unsupported(node: &str, op: &str, why: &str) -> Error {
    Error::Unsupported(format!("distill: node `{node}` ({op}): {why}"))
}

fn pair(v: Option<&[i64]>, default: usize, node: &str, op: &str, what: &str) -> Result<[usize; 2]> {
    match v {
        None => Ok([default; 2]),
        Some([a, b, ..]) if *a >= 0 && *b >= 0 => Ok([*a as usize, *b as usize]),
        Some(_) => Err(unsupported(node, op, &format!("`{what}` must hold two non-negative values"))),
    }
}

struct Builder<'a> {
    graph: &'a Graph,
    shapes: &'a Shapes,
    net: Network,
    param_ix: HashMap<String, usize>,
    with_bn: bool,
}

impl Builder<'_> {
    fn shape(&self, tensor: &str) -> Result<Vec<usize>> {
        match self.shapes.get(tensor).and_then(|t| t.shape.clone()) {
            Some(s) if !s.is_empty() => Ok(s[1..].to_vec()),
            _ => Err(Error::invalid(format!("distill: tensor `{tensor}` has no known shape"))),
        }
    }

    fn value(&mut self, tensor: &str) -> Result<usize> {
        if let Some(&v) = self.net.values.get(tensor) {
            return Ok(v);
        }
        let shape = self.shape(tensor)?;
        self.net.value_len.push(shape.iter().product());
        self.net.dims.push(dims_of(&shape));
        let v = self.net.value_len.len() - 1;
        self.net.values.insert(tensor.to_string(), v);
        Ok(v)
    }

    fn param(&mut self, tensor: &str, node: &str, op: &str) -> Result<usize> {
        if let Some(&p) = self.param_ix.get(tensor) {
            return Ok(p);
        }
        let w = self
            .graph
            .constant_f32(tensor)
            .ok_or_else(|| unsupported(node, op, &format!("weight `{tensor}` is not an f32 initializer")))?;
        self.net.params.push(Param {
            name: tensor.to_string(),
            shape: w.shape().to_vec(),
            data: w.iter().copied().collect(),
            trainable: true,
        });
        self.param_ix.insert(tensor.to_string(), self.net.params.len() - 1);
        Ok(self.net.params.len() - 1)
    }

    fn input_value(&mut self, tensor: &str, node: &str, op: &str) -> Result<usize> {
        match self.net.values.get(tensor) {
            Some(&v) => Ok(v),
            None => Err(unsupported(node, op, &format!("input `{tensor}` is neither the graph input nor computed by a supported op"))),
        }
    }

    fn step(&mut self, ix: petgraph::stable_graph::NodeIndex) -> Result<()> {
        let node = self.graph.node(ix);
        let (name, op) = (node.name(), node.op());
        let out = node.output(0).unwrap_or_default().to_string();
        let x_name = node.input(0).unwrap_or_default().to_string();
        let x = self.input_value(&x_name, name, op)?;
        let step = match op {
            "Conv" if self.with_bn => return self.conv_bn(ix, x, &x_name, &out),
            "Conv" => self.conv(ix, x, &x_name, &out)?,
            "Relu" => Step::Relu { x, y: self.value(&out)? },
            "Add" | "Sub" | "Mul" | "Div" if self.constant_operand(ix).is_some() => self.affine(ix, &out)?,
            "Add" => {
                let b_name = node.input(1).unwrap_or_default().to_string();
                let b = self.input_value(&b_name, name, op)?;
                if self.shape(&x_name)? != self.shape(&b_name)? {
                    return Err(unsupported(name, op, "inputs of different shapes (broadcasting) are not supported"));
                }
                Step::Add { a: x, b, y: self.value(&out)?, relu: false }
            }
            "MaxPool" => self.maxpool(ix, x, &x_name, &out)?,
            "GlobalAveragePool" => {
                let hw = self.shape(&x_name)?[1..].iter().product();
                if hw == 0 {
                    return Err(unsupported(name, op, "an empty input (a dimension of size 0)"));
                }
                Step::GlobalAvgPool { x, y: self.value(&out)?, hw }
            }
            "Flatten" if node.attr_int("axis").unwrap_or(1) == 1 => Step::Flatten { x, y: self.value(&out)? },
            "Gemm" => self.gemm(ix, x, &x_name, &out)?,
            "Clip" | "Sigmoid" | "HardSigmoid" | "HardSwish" => Step::Act { x, y: self.value(&out)?, f: self.act(ix)? },
            "Mul" => self.mul(ix, &out)?,
            "Resize" | "Upsample" => self.upsample(ix, x, &x_name, &out)?,
            "BatchNormalization" => return Err(unsupported(name, op, "fold it first (put `fold` before `distill`)")),
            _ => return Err(unsupported(name, op, "op not supported by the training engine")),
        };
        self.net.steps.push(step);
        Ok(())
    }

    fn act(&self, ix: petgraph::stable_graph::NodeIndex) -> Result<Act> {
        let node = self.graph.node(ix);
        let bound = |slot: usize, attr: &str, default: f32| -> Result<f32> {
            match node.input(slot) {
                Some(t) => match self.graph.constant_f32(t) {
                    Some(a) if a.len() == 1 => Ok(a.iter().next().copied().unwrap_or(default)),
                    _ => Err(unsupported(node.name(), node.op(), &format!("bound `{t}` is not a constant scalar"))),
                },
                None => Ok(node.attr_float(attr).unwrap_or(default)),
            }
        };
        Ok(match node.op() {
            "Clip" => Act::Clip { lo: bound(1, "min", f32::MIN)?, hi: bound(2, "max", f32::MAX)? },
            "Sigmoid" => Act::Sigmoid,
            "HardSigmoid" => {
                Act::HardSigmoid { alpha: node.attr_float("alpha").unwrap_or(0.2), beta: node.attr_float("beta").unwrap_or(0.5) }
            }
            _ => Act::HardSwish,
        })
    }

    /// The constant operand of a binary op: (its slot, its values).
    fn constant_operand(&self, ix: petgraph::stable_graph::NodeIndex) -> Option<(usize, Vec<f32>)> {
        let node = self.graph.node(ix);
        (0..2).find_map(|slot| node.input(slot).and_then(|t| self.graph.constant_f32(t)).map(|w| (slot, w.iter().copied().collect())))
    }

    /// Add/Sub/Mul/Div of an activation and a scalar or per-channel constant.
    fn affine(&mut self, ix: petgraph::stable_graph::NodeIndex, out: &str) -> Result<Step> {
        let node = self.graph.node(ix);
        let (name, op) = (node.name().to_string(), node.op().to_string());
        let (slot, k) = self.constant_operand(ix).expect("checked by the caller");
        let x_name = node.input(1 - slot).unwrap_or_default().to_string();
        let x = self.input_value(&x_name, &name, &op)?;
        let sy = self.shape(out)?;
        let c = sy.first().copied().unwrap_or(1);
        let k: Vec<f32> = match k.len() {
            1 => vec![k[0]; c],
            n if n == c && self.graph.constant_f32(node.input(slot).unwrap_or("")).is_some_and(|w| per_channel_shape(w.shape(), c)) => k,
            _ => return Err(unsupported(&name, &op, "a constant operand must be a scalar or per channel ([C,1,1])")),
        };
        if self.shape(&x_name)? != sy {
            return Err(unsupported(&name, &op, "the activation operand is broadcast"));
        }
        let ones = vec![1.0; c];
        let zeros = vec![0.0; c];
        let (scale, shift) = match (op.as_str(), slot) {
            ("Add", _) => (ones, k),
            ("Sub", 1) => (ones, k.iter().map(|v| -v).collect()),
            ("Sub", _) => (ones.iter().map(|v| -v).collect(), k),
            ("Mul", _) => (k, zeros),
            ("Div", 1) => (k.iter().map(|v| 1.0 / v).collect(), zeros),
            _ => return Err(unsupported(&name, &op, "dividing a constant by an activation is not supported")),
        };
        Ok(Step::Affine { x, y: self.value(out)?, scale, shift, hw: sy.iter().skip(1).product() })
    }

    fn upsample(&mut self, ix: petgraph::stable_graph::NodeIndex, x: usize, x_name: &str, out: &str) -> Result<Step> {
        let node = self.graph.node(ix);
        let (name, op) = (node.name(), node.op());
        if op == "Resize" && node.attr_str("mode").as_deref() == Some("linear") {
            return self.linear_resize(ix, x, x_name, out);
        }
        if node.attr_str("mode").is_some_and(|m| m != "nearest") {
            return Err(unsupported(name, op, "only modes `nearest` and `linear` are supported"));
        }
        // Integer upsampling picks x[i / f] only for these coordinate/rounding pairs.
        let coord = node.attr_str("coordinate_transformation_mode").unwrap_or_else(|| "half_pixel".into());
        let round = node.attr_str("nearest_mode").unwrap_or_else(|| "round_prefer_floor".into());
        let plain = match coord.as_str() {
            "half_pixel" | "pytorch_half_pixel" => matches!(round.as_str(), "round_prefer_floor" | "round_prefer_ceil"),
            "asymmetric" | "tf_half_pixel_for_nn" => round == "floor",
            _ => false,
        };
        if op == "Resize" && !plain {
            return Err(unsupported(name, op, &format!("nearest mode `{round}` with coordinates `{coord}` is not supported")));
        }
        let (xs, ys) = (self.shape(x_name)?, self.shape(out)?);
        let whole = xs.len() == 3 && ys.len() == 3 && xs[0] == ys[0] && ys[1] % xs[1] == 0 && ys[2] % xs[2] == 0;
        if !whole {
            return Err(unsupported(name, op, "only upsampling of H and W by integer factors is supported"));
        }
        Ok(Step::Upsample { x, y: self.value(out)?, h: xs[1], w: xs[2], fh: ys[1] / xs[1], fw: ys[2] / xs[2] })
    }

    /// A linear `Resize` by constant scales of H and W (half_pixel coordinates).
    fn linear_resize(&mut self, ix: petgraph::stable_graph::NodeIndex, x: usize, x_name: &str, out: &str) -> Result<Step> {
        let node = self.graph.node(ix);
        let (name, op) = (node.name(), node.op());
        let coord = node.attr_str("coordinate_transformation_mode").unwrap_or_else(|| "half_pixel".into());
        if coord != "half_pixel" || node.attr_int("antialias").is_some_and(|a| a != 0) || node.input(3).is_some_and(|t| !t.is_empty()) {
            return Err(unsupported(name, op, "linear mode is supported with half_pixel coordinates, constant scales and no antialias"));
        }
        let scales: Vec<f32> =
            node.input(2).and_then(|t| self.graph.constant_f32(t)).map(|a| a.iter().copied().collect()).unwrap_or_default();
        let (xs, ys) = (self.shape(x_name)?, self.shape(out)?);
        if scales.len() != 4 || scales[0] != 1.0 || scales[1] != 1.0 || xs.len() != 3 || ys.len() != 3 || xs[0] != ys[0] {
            return Err(unsupported(name, op, "only constant scales [1, 1, sh, sw] of an NxCxHxW tensor are supported"));
        }
        let expected = |d: usize, s: f32| (d as f32 * s) as usize;
        if xs[1..].contains(&0) || ys[1..].contains(&0) || ys[1] != expected(xs[1], scales[2]) || ys[2] != expected(xs[2], scales[3]) {
            return Err(unsupported(name, op, &format!("resizing {xs:?} by {scales:?} to {ys:?} is not supported")));
        }
        let (rows, cols) = (linear_taps(xs[1], ys[1], scales[2]), linear_taps(xs[2], ys[2], scales[3]));
        Ok(Step::Resize { x, y: self.value(out)?, rows, cols, h: xs[1], w: xs[2] })
    }

    /// Mul of two activations: same shape, or one per channel ([C,1,1]).
    fn mul(&mut self, ix: petgraph::stable_graph::NodeIndex, out: &str) -> Result<Step> {
        let node = self.graph.node(ix);
        let (name, op) = (node.name().to_string(), node.op().to_string());
        let (a_name, b_name) = (node.input(0).unwrap_or_default().to_string(), node.input(1).unwrap_or_default().to_string());
        let (a, b) = (self.input_value(&a_name, &name, &op)?, self.input_value(&b_name, &name, &op)?);
        let (sa, sb, sy) = (self.shape(&a_name)?, self.shape(&b_name)?, self.shape(out)?);
        let per_channel = |s: &[usize]| s.len() == sy.len() && s.first() == sy.first() && s.iter().skip(1).all(|&d| d == 1);
        let hw = sy.iter().skip(1).product();
        let y = self.value(out)?;
        match () {
            _ if sa == sy && sb == sy => Ok(Step::Mul { a, b, y, hw: 1 }),
            _ if sa == sy && per_channel(&sb) => Ok(Step::Mul { a, b, y, hw }),
            _ if sb == sy && per_channel(&sa) => Ok(Step::Mul { a: b, b: a, y, hw }),
            _ => Err(unsupported(&name, &op, "only same-shape or per-channel ([C,1,1]) products are supported")),
        }
    }

    fn conv(&mut self, ix: petgraph::stable_graph::NodeIndex, x: usize, x_name: &str, out: &str) -> Result<Step> {
        let node = self.graph.node(ix);
        let (name, op) = (node.name(), node.op());
        if !crate::ir::conv::explicit_pads(node) {
            return Err(unsupported(name, op, "auto_pad is not supported (explicit pads only)"));
        }
        let w_name = node.input(1).unwrap_or_default().to_string();
        let b_name = node.input(2).filter(|b| !b.is_empty()).map(str::to_string);
        let w = self.param(&w_name, name, op)?;
        let b = b_name.map(|b| self.param(&b, name, op)).transpose()?;
        let ws = self.net.params[w].shape.clone();
        let (xs, ys) = (self.shape(x_name)?, self.shape(out)?);
        if ws.len() != 4 || xs.len() != 3 || ys.len() != 3 {
            return Err(unsupported(name, op, "only 2-d convolutions are supported"));
        }
        let window = crate::ir::conv::Window::of(node, ws[2..].to_vec()).map_err(|e| unsupported(name, op, &e))?;
        let (stride, pad, dilation) = window.pairs().ok_or_else(|| unsupported(name, op, "only 2-d convolutions are supported"))?;
        let geom = ConvGeom {
            c_in: xs[0],
            c_out: ys[0],
            group: node.attr_int("group").unwrap_or(1).max(1) as usize,
            kh: ws[2],
            kw: ws[3],
            stride,
            pad,
            dilation,
            h: xs[1],
            w: xs[2],
            ho: ys[1],
            wo: ys[2],
        };
        Ok(Step::Conv { x, y: self.value(out)?, w, b, geom })
    }

    /// A conv writing to an internal value, then a BN writing `out`.
    fn conv_bn(&mut self, ix: petgraph::stable_graph::NodeIndex, x: usize, x_name: &str, out: &str) -> Result<()> {
        let inner = format!("{out}\u{0}pre-bn");
        let shape = self.shape(out)?;
        self.net.values.insert(inner.clone(), self.net.value_len.len());
        self.net.value_len.push(shape.iter().product());
        self.net.dims.push(dims_of(&shape));
        let mut conv = self.conv(ix, x, x_name, out)?;
        let z = self.net.values[&inner];
        if let Step::Conv { y, .. } = &mut conv {
            *y = z;
        }
        self.net.steps.push(conv);
        let name = self.graph.node(ix).name().to_string();
        let c = shape[0];
        let mut p = [0; 4];
        for (k, (suffix, value, trainable)) in
            [("gamma", 1.0, true), ("beta", 0.0, true), ("mean", 0.0, false), ("var", 1.0, false)].into_iter().enumerate()
        {
            self.net.params.push(Param { name: format!("{name}\u{0}bn.{suffix}"), shape: vec![c], data: vec![value; c], trainable });
            p[k] = self.net.params.len() - 1;
        }
        let y = self.value(out)?;
        self.net.steps.push(Step::BatchNorm { x: z, y, conv: name, c, p, relu: false });
        Ok(())
    }

    fn maxpool(&mut self, ix: petgraph::stable_graph::NodeIndex, x: usize, x_name: &str, out: &str) -> Result<Step> {
        let node = self.graph.node(ix);
        let (name, op) = (node.name(), node.op());
        let k = pair(node.attr_ints("kernel_shape"), 1, name, op, "kernel_shape")?;
        let window = crate::ir::conv::Window::of(node, k.to_vec()).map_err(|e| unsupported(name, op, &e))?;
        if window.dilations.iter().any(|&v| v != 1) || !crate::ir::conv::explicit_pads(node) {
            return Err(unsupported(name, op, "dilated or auto-padded pooling is not supported"));
        }
        let (stride, pad, _) = window.pairs().ok_or_else(|| unsupported(name, op, "only 2-d pooling is supported"))?;
        let (xs, ys) = (self.shape(x_name)?, self.shape(out)?);
        let geom = PoolGeom { c: xs[0], kh: k[0], kw: k[1], stride, pad, h: xs[1], w: xs[2], ho: ys[1], wo: ys[2] };
        Ok(Step::MaxPool { x, y: self.value(out)?, geom })
    }

    fn gemm(&mut self, ix: petgraph::stable_graph::NodeIndex, x: usize, x_name: &str, out: &str) -> Result<Step> {
        let node = self.graph.node(ix);
        let (name, op) = (node.name(), node.op());
        let one = |a: &str| node.attr_float(a).unwrap_or(1.0) == 1.0;
        if node.attr_int("transA").unwrap_or(0) != 0 || !one("alpha") || !one("beta") {
            return Err(unsupported(name, op, "only transA = 0, alpha = beta = 1 are supported"));
        }
        let w = self.param(node.input(1).unwrap_or_default(), name, op)?;
        let b = node.input(2).filter(|b| !b.is_empty()).map(str::to_string).map(|b| self.param(&b, name, op)).transpose()?;
        if self.shape(x_name)?.len() != 1 {
            return Err(unsupported(name, op, "the input must be 2-d ([N, K]): put a Flatten before"));
        }
        let (k, n) = (self.shape(x_name)?.iter().product(), self.shape(out)?.iter().product());
        if let Some(b) = b {
            if self.net.params[b].data.len() != n {
                return Err(unsupported(name, op, "a broadcast bias is not supported"));
            }
        }
        Ok(Step::Gemm { x, y: self.value(out)?, w, b, k, n, trans_b: node.attr_int("transB").unwrap_or(0) != 0 })
    }
}

impl Network {
    /// Builds the trainable network of `graph` (shapes from `validate`).
    pub fn from_graph(graph: &Graph, shapes: &Shapes) -> Result<Network> {
        Self::build(graph, shapes, false)
    }

    /// Like `from_graph`, with a training-mode BatchNorm after every conv.
    pub fn with_batchnorm(graph: &Graph, shapes: &Shapes) -> Result<Network> {
        Self::build(graph, shapes, true)
    }

    fn build(graph: &Graph, shapes: &Shapes, with_bn: bool) -> Result<Network> {
        let input = graph
            .meta
            .input
            .iter()
            .map(|i| i.name())
            .find(|n| !graph.weights().contains_key(*n))
            .ok_or_else(|| Error::invalid("distill: the model has no input"))?
            .to_string();
        let output =
            graph.meta.output.first().map(|o| o.name().to_string()).ok_or_else(|| Error::invalid("distill: the model has no output"))?;
        let net = Network {
            params: vec![],
            steps: vec![],
            value_len: vec![],
            dims: vec![],
            values: HashMap::new(),
            input: 0,
            output: 0,
            pool: Default::default(),
            times: Default::default(),
            precision: Default::default(),
            packed: HashMap::new(),
        };
        let mut b = Builder { graph, shapes, net, param_ix: HashMap::new(), with_bn };
        b.net.input = b.value(&input)?;
        for ix in graph.topo_order()? {
            b.step(ix)?;
        }
        b.net.output = *b.net.values.get(&output).ok_or_else(|| Error::invalid(format!("distill: output `{output}` is not computed")))?;
        b.net.fuse_relus();
        Ok(b.net)
    }

    /// Fuses every BN and every Add with the Relu that alone reads its
    /// output: the step then writes the Relu's output (one pass over the
    /// values fewer each way, and one buffer). The BN's or Add's own output
    /// is no longer computed, so it stops being a value one can ask for by
    /// name.
    fn fuse_relus(&mut self) {
        let mut reads = vec![0usize; self.value_len.len()];
        for v in self.steps.iter().flat_map(step_inputs) {
            reads[v] += 1;
        }
        let mut i = 0;
        while i < self.steps.len() {
            if let Step::BatchNorm { y, relu: false, .. } | Step::Add { y, relu: false, .. } = self.steps[i] {
                let relu = self.steps[i + 1..].iter().position(|s| matches!(s, Step::Relu { x, .. } if *x == y));
                let fused = relu.filter(|_| reads[y] == 1 && y != self.output).map(|j| self.steps.remove(i + 1 + j));
                if let (Some(Step::Relu { y: r, .. }), Step::BatchNorm { y: out, relu, .. } | Step::Add { y: out, relu, .. }) =
                    (fused, &mut self.steps[i])
                {
                    (*out, *relu) = (r, true);
                    self.values.retain(|_, v| *v != y);
                }
            }
            i += 1;
        }
    }

    /// Runs the matrix products (convs, fully connected layers) in
    /// `precision` from now on. bf16 needs AVX512-BF16.
    pub fn set_precision(&mut self, precision: kernels::Precision) -> Result<()> {
        if precision == kernels::Precision::Bf16 && !kernels::bf16_available() {
            return Err(Error::Config("bf16 products need a CPU with AVX512-BF16 (AVX-512 F and BW too); this one has not".into()));
        }
        if precision != self.precision {
            // Packed weights are bf16 operands: an f32 network must not use them.
            self.packed.clear();
        }
        self.precision = precision;
        Ok(())
    }

    /// For a network whose weights will not change again (a teacher): packs
    /// the convs' weights for bf16 products once, so that forward passes
    /// skip it. Call after the last change of the weights (a forward pass
    /// reads the packed copy, not `params`); with f32 products it does
    /// nothing, and `set_precision` drops them.
    pub fn pack_weights(&mut self) {
        if self.precision != kernels::Precision::Bf16 {
            return;
        }
        for step in &self.steps {
            if let Step::Conv { w, geom, .. } = step {
                if !geom.is_depthwise() {
                    self.packed.insert(*w, Arc::new(kernels::pack_conv_weights(geom, &self.params[*w].data)));
                }
            }
        }
    }

    /// Per-image length of the input and the output.
    pub fn input_len(&self) -> usize {
        self.value_len[self.input]
    }
    pub fn output_len(&self) -> usize {
        self.value_len[self.output]
    }
    pub fn output(&self) -> usize {
        self.output
    }
    /// Values per image of value `v`.
    pub fn value_len(&self, v: usize) -> usize {
        self.value_len[v]
    }
    /// The value carrying tensor `name`, with its per-image length.
    pub fn value_of(&self, name: &str) -> Option<(usize, usize)> {
        self.values.get(name).map(|&v| (v, self.value_len[v]))
    }

    /// Appends a trainable 1x1 conv (`weight`: c_out × c_in, `bias`) reading
    /// value `x` (c_in channels of `hw` positions), for feature distillation;
    /// returns its output value. It is not part of the graph: `write_back`
    /// leaves it out.
    pub fn add_adapter(&mut self, name: &str, x: usize, c_in: usize, hw: (usize, usize), weight: Vec<f32>, bias: Vec<f32>) -> usize {
        let c_out = bias.len();
        for (suffix, shape, data) in [("w", vec![c_out, c_in, 1, 1], weight), ("b", vec![c_out], bias)] {
            self.params.push(Param { name: format!("{name}\u{0}adapter.{suffix}"), shape, data, trainable: true });
        }
        let (w, b) = (self.params.len() - 2, self.params.len() - 1);
        self.value_len.push(c_out * hw.0 * hw.1);
        self.dims.push(Some((c_out, hw.0 * hw.1)));
        let y = self.value_len.len() - 1;
        let geom = ConvGeom {
            c_in,
            c_out,
            group: 1,
            kh: 1,
            kw: 1,
            stride: [1, 1],
            pad: [0, 0],
            dilation: [1, 1],
            h: hw.0,
            w: hw.1,
            ho: hw.0,
            wo: hw.1,
        };
        self.steps.push(Step::Conv { x, y, w, b: Some(b), geom });
        y
    }

    /// Writes the params back into the graph's weights, folding each BN
    /// (running statistics) into its conv: W' = W·s, b' = (b − μ)·s + β,
    /// s = γ / sqrt(σ² + ε).
    pub fn write_back(&self, graph: &mut Graph) {
        let mut data: HashMap<&str, Vec<f32>> =
            self.params.iter().filter(|p| p.trainable).map(|p| (p.name.as_str(), p.data.clone())).collect();
        let mut biases = Vec::new();
        for step in &self.steps {
            let Step::BatchNorm { conv, c, p, .. } = step else { continue };
            let Some(ix) = graph.find_node(conv) else { continue };
            let node = graph.node(ix);
            let w_name = node.input(1).unwrap_or_default();
            let mut bias = match node.input(2).filter(|b| !b.is_empty()) {
                Some(b) => data.get(b).cloned().unwrap_or_else(|| vec![0.0; *c]),
                None => vec![0.0; *c],
            };
            let [g, b, m, v] = p.map(|i| &self.params[i].data);
            let s: Vec<f32> = crate::ir::batchnorm::scale(&g[..*c], &v[..*c], BN_EPS);
            if let Some(w) = data.get_mut(w_name) {
                let per = w.len() / c;
                w.chunks_mut(per).zip(&s).for_each(|(row, s)| row.iter_mut().for_each(|x| *x *= s));
            }
            for k in 0..*c {
                bias[k] = (bias[k] - m[k]) * s[k] + b[k];
            }
            biases.push((ix, bias));
        }
        // Params that are not graph weights (BN statistics, adapters) stay out.
        for p in self.params.iter().filter(|p| data.contains_key(p.name.as_str())) {
            let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&p.shape), data[p.name.as_str()].clone())
                .expect("param length matches its shape");
            if let Some(w) = graph.weight_mut(&p.name) {
                w.set_data(crate::ir::Data::F32(a));
            }
        }
        for (ix, bias) in biases {
            graph.set_bias(ix, bias);
        }
    }

    /// Sets every BN to the identity on the data: runs `batches` with BN
    /// bypassed, takes the mean of the batch statistics as running
    /// statistics, then γ = sqrt(σ² + ε), β = μ.
    pub fn init_batchnorm(&mut self, batches: impl Iterator<Item = (Vec<f32>, usize)>) -> Result<()> {
        let mut sums: HashMap<usize, (Vec<f32>, Vec<f32>, usize)> = HashMap::new();
        for (x, batch) in batches {
            let mut acts = self.forward_mode(x, batch, Mode::Bypass)?;
            for (i, (m, v)) in std::mem::take(&mut acts.bn_batch) {
                let e = sums.entry(i).or_insert_with(|| (vec![0.0; m.len()], vec![0.0; m.len()], 0));
                add_into(&mut e.0, &m);
                add_into(&mut e.1, &v);
                e.2 += 1;
            }
        }
        for (i, (m, v, n)) in sums {
            let Step::BatchNorm { p, .. } = &self.steps[i] else { continue };
            let [g, b, rm, rv] = *p;
            let (m, v): (Vec<f32>, Vec<f32>) = (m.iter().map(|x| x / n as f32).collect(), v.iter().map(|x| x / n as f32).collect());
            self.params[g].data = v.iter().map(|v| (v + BN_EPS).sqrt()).collect();
            self.params[b].data = m.clone();
            self.params[rm].data = m;
            self.params[rv].data = v;
        }
        Ok(())
    }

    /// Moves the running statistics towards a training batch's.
    pub fn update_running_stats(&mut self, acts: &Activations, momentum: f32) {
        for (i, (m, v)) in &acts.bn_batch {
            let Step::BatchNorm { p, .. } = &self.steps[*i] else { continue };
            for (slot, batch) in [(p[2], m), (p[3], v)] {
                self.params[slot].data.iter_mut().zip(batch).for_each(|(r, b)| *r = (1.0 - momentum) * *r + momentum * b);
            }
        }
    }

    /// Runs the network on `x` (batch × input length), BN in training mode.
    pub fn forward<'x>(&self, x: impl Into<std::borrow::Cow<'x, [f32]>>, batch: usize) -> Result<Activations> {
        self.forward_mode(x, batch, Mode::Train)
    }

    /// Runs the network on `x` with BN in `mode`. `x` by value or borrowed:
    /// an image input is rearranged channel-major into a new buffer either
    /// way, so a borrowed batch is not copied first.
    pub fn forward_mode<'x>(&self, x: impl Into<std::borrow::Cow<'x, [f32]>>, batch: usize, mode: Mode) -> Result<Activations> {
        let x = x.into();
        if batch == 0 {
            return Err(Error::Data("distill: an empty batch".into()));
        }
        if x.len() != batch * self.input_len() {
            return Err(Error::Data(format!("distill: input holds {} values, expected {batch} × {}", x.len(), self.input_len())));
        }
        self.pool.next_round();
        let values = vec![Vec::new(); self.value_len.len()];
        let mut acts = Activations {
            batch,
            mode,
            values,
            dims: self.dims.clone(),
            pool: self.pool.clone(),
            argmax: HashMap::new(),
            bn_batch: HashMap::new(),
        };
        acts.values[self.input] = self.channel_major(self.input, x, batch);
        for (i, step) in self.steps.iter().enumerate() {
            let start = self.times.start();
            let (y, out) = self.forward_step(i, step, &mut acts);
            self.times.add(start, step, false);
            acts.values[y] = out;
        }
        Ok(acts)
    }

    fn forward_step(&self, i: usize, step: &Step, acts: &mut Activations) -> (usize, Vec<f32>) {
        let batch = acts.batch;
        let vals = &acts.values;
        match step {
            Step::Conv { x, y, w, b, geom } => {
                let mut out = self.pool.take(batch * geom.output_len());
                let packed = self.packed.get(w).map(|p| p.as_slice());
                let (w, b) = (&self.params[*w].data, b.map(|b| self.params[b].data.as_slice()));
                kernels::conv_forward(geom, batch, &vals[*x], w, b, &mut out, self.precision, packed);
                (*y, out)
            }
            Step::Relu { x, y } => {
                let mut out = self.pool.take(vals[*x].len());
                out.par_iter_mut().zip(&vals[*x]).for_each(|(o, v)| *o = v.max(0.0));
                (*y, out)
            }
            Step::Add { a, b, y, relu } => {
                let mut out = self.pool.take(vals[*a].len());
                let sums = out.par_iter_mut().zip(vals[*a].par_iter().zip(&vals[*b]));
                if *relu {
                    sums.for_each(|(o, (p, q))| *o = (p + q).max(0.0));
                } else {
                    sums.for_each(|(o, (p, q))| *o = p + q);
                }
                (*y, out)
            }
            Step::MaxPool { x, y, geom } => {
                let mut out = self.pool.take(batch * geom.output_len());
                let mut arg = vec![0u32; batch * geom.output_len()];
                out.par_chunks_mut(geom.output_len())
                    .zip(arg.par_chunks_mut(geom.output_len()))
                    .zip(vals[*x].par_chunks(geom.input_len()))
                    .for_each(|((yn, an), xn)| kernels::maxpool_forward(geom, xn, yn, an));
                acts.argmax.insert(i, arg);
                (*y, out)
            }
            Step::GlobalAvgPool { x, y, hw, .. } => (*y, vals[*x].par_chunks(*hw).map(|p| p.iter().sum::<f32>() / *hw as f32).collect()),
            Step::Flatten { x, y } => match self.dims[*x] {
                Some((c, hw)) => (*y, transpose_blocks(&vals[*x], c, batch, hw)),
                None => (*y, vals[*x].clone()),
            },
            Step::Act { x, y, f } => (*y, vals[*x].par_iter().map(|&v| f.apply(v)).collect()),
            Step::Affine { x, y, scale, shift, hw } => {
                let channel = self.channel_of(*x, scale.len(), batch);
                let out = vals[*x]
                    .par_chunks(*hw)
                    .enumerate()
                    .flat_map_iter(|(i, chunk)| chunk.iter().map(move |&v| v * scale[channel(i)] + shift[channel(i)]))
                    .collect();
                (*y, out)
            }
            Step::Upsample { x, y, h, w, fh, fw } => {
                let (h, w, fh, fw) = (*h, *w, *fh, *fw);
                let out = vals[*x]
                    .par_chunks(h * w)
                    .flat_map_iter(|plane| (0..h * fh).flat_map(move |i| (0..w * fw).map(move |j| plane[(i / fh) * w + j / fw])))
                    .collect();
                (*y, out)
            }
            Step::Resize { x, y, rows, cols, h, w } => {
                let (h, w, ow) = (*h, *w, cols.len());
                let out = vals[*x]
                    .par_chunks(h * w)
                    .flat_map_iter(|plane| {
                        rows.iter().flat_map(move |r| {
                            cols.iter().map(move |c| {
                                let at = |i: usize, j: usize| plane[i * w + j];
                                // H first, then W, as tract sums them.
                                c.w0 * (r.w0 * at(r.i0, c.i0) + r.w1 * at(r.i1, c.i0))
                                    + c.w1 * (r.w0 * at(r.i0, c.i1) + r.w1 * at(r.i1, c.i1))
                            })
                        })
                    })
                    .collect::<Vec<f32>>();
                debug_assert_eq!(out.len(), vals[*x].len() / (h * w) * rows.len() * ow);
                (*y, out)
            }
            Step::Mul { a, b, y, hw } => {
                let bv = &vals[*b];
                (*y, vals[*a].par_chunks(*hw).zip(bv.par_iter()).flat_map_iter(|(chunk, &s)| chunk.iter().map(move |&v| v * s)).collect())
            }
            Step::BatchNorm { x, y, c, p, relu, .. } => {
                let mut out = self.pool.take(vals[*x].len());
                if let Some(stats) = self.batchnorm_forward(&vals[*x], *c, p, acts.mode, *relu, &mut out) {
                    acts.bn_batch.insert(i, stats);
                }
                (*y, out)
            }
            Step::Gemm { x, y, w, b, k, n, trans_b } => {
                let mut out = vec![0.0; batch * n];
                if let Some(b) = b {
                    out.chunks_mut(*n).for_each(|row| row.copy_from_slice(&self.params[*b].data));
                }
                kernels::gemm(
                    batch,
                    *k,
                    *n,
                    &vals[*x],
                    false,
                    &self.params[*w].data,
                    *trans_b,
                    &mut out,
                    if b.is_some() { 1.0 } else { 0.0 },
                    self.precision,
                );
                (*y, out)
            }
        }
    }

    /// An image-major batch of value `v` in the value's stored layout
    /// (borrowed data is copied only when it keeps its layout).
    fn channel_major(&self, v: usize, data: std::borrow::Cow<'_, [f32]>, batch: usize) -> Vec<f32> {
        match self.dims[v] {
            Some((c, hw)) => transpose_blocks(&data, batch, c, hw),
            None => data.into_owned(),
        }
    }

    /// The channel (of `c`) that plane `i` (of H·W values) of value `v` belongs to.
    fn channel_of(&self, v: usize, c: usize, batch: usize) -> impl Fn(usize) -> usize + Sync + Send + Copy {
        let channel_major = self.dims[v].is_some();
        move |i| if channel_major { i / batch.max(1) } else { i % c.max(1) }
    }

    /// Adds gradient `g` into `slot` (or puts it there); a buffer added is
    /// kept for reuse.
    fn accumulate(&self, slot: &mut Option<Vec<f32>>, g: Vec<f32>) {
        match slot {
            Some(s) => {
                add_into(s, &g);
                self.pool.give(g);
            }
            None => *slot = Some(g),
        }
    }

    /// BN of channel-major `x` into `out` (then the Relu, if fused). In
    /// Train each channel's batch statistics are taken and applied while
    /// its run of N·H·W values is still in cache — one pass over the tensor
    /// from memory instead of two; Bypass takes them and passes x through
    /// (to the Relu); Eval applies the running ones. Returns the batch
    /// statistics (None in Eval).
    fn batchnorm_forward(
        &self,
        x: &[f32],
        c: usize,
        p: &[usize; 4],
        mode: Mode,
        relu: bool,
        out: &mut [f32],
    ) -> Option<(Vec<f32>, Vec<f32>)> {
        let run = (x.len() / c.max(1)).max(1);
        let [gamma, beta, mean, var] = p.map(|i| self.params[i].data.as_slice());
        let floor = if relu { 0.0 } else { f32::NEG_INFINITY };
        let stats: Vec<(f32, f32)> = out
            .par_chunks_mut(run)
            .zip(x.par_chunks(run))
            .enumerate()
            .map(|(k, (o, xr))| {
                let stats = (mode != Mode::Eval).then(|| run_stats(xr));
                let (scale, shift) = match (stats, mode) {
                    (Some((m, v)), Mode::Train) => bn_affine(gamma[k], beta[k], m, v),
                    (_, Mode::Eval) => bn_affine(gamma[k], beta[k], mean[k], var[k]),
                    _ => (1.0, 0.0),
                };
                o.iter_mut().zip(xr).for_each(|(v, &xv)| *v = (xv * scale + shift).max(floor));
                stats.unwrap_or_default()
            })
            .collect();
        (mode != Mode::Eval).then(|| stats.into_iter().unzip())
    }

    /// Gradients of every param, given dL/d(value) seeds (e.g. the logits').
    /// The activations go back to the pool as the walk passes their step
    /// (nothing reads them after it), where the gradients of the earlier
    /// steps, and the next forward, find them: `acts` keeps only the batch
    /// statistics and the input.
    pub fn backward(&self, acts: &mut Activations, seeds: Vec<(usize, Vec<f32>)>) -> Vec<Vec<f32>> {
        let mut grads: Vec<Option<Vec<f32>>> = vec![None; self.value_len.len()];
        for (v, g) in seeds {
            self.accumulate(&mut grads[v], self.channel_major(v, g.into(), acts.batch));
        }
        let mut pgrads: Vec<Vec<f32>> = self.params.iter().map(|p| vec![0.0; p.data.len()]).collect();
        for (i, step) in self.steps.iter().enumerate().rev() {
            let y = step_output(step);
            if let Some(mut dy) = grads[y].take() {
                let start = self.times.start();
                let outs = self.backward_step(i, step, acts, &mut dy, &mut pgrads);
                self.times.add(start, step, true);
                self.pool.give(dy);
                for (v, g) in outs {
                    if v != self.input {
                        self.accumulate(&mut grads[v], g);
                    }
                }
            }
            // Steps run in topological order: every reader of `y` comes after
            // its producer, and the walk has passed them all.
            self.pool.give(std::mem::take(&mut acts.values[y]));
        }
        // Buffers no step of this round used (an earlier batch size's) go:
        // the pool keeps one step's worth for the next forward.
        self.pool.drop_unused();
        pgrads
    }

    /// Fills every reused buffer with NaN before a kernel writes it: a test
    /// hook (a kernel that leaves a value unwritten then shows as NaN).
    #[doc(hidden)]
    pub fn poison_reused_buffers(&self) {
        self.pool.poison.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The values the pool holds for later steps: a test hook (it must not
    /// grow from step to step).
    #[doc(hidden)]
    pub fn pooled_values(&self) -> usize {
        self.pool.state.lock().map(|state| state.free.iter().map(|(_, v)| v.capacity()).sum()).unwrap_or(0)
    }

    /// Starts (or stops) summing the wall time of each kind of step.
    pub fn profile(&self, on: bool) {
        self.times.on.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The sums since the last call, per kind of step: (kind, seconds
    /// forward, seconds backward, steps run forward), in kind order.
    pub fn step_times(&self) -> Vec<(String, f64, f64, usize)> {
        let Ok(mut sums) = self.times.sums.lock() else { return vec![] };
        let mut rows: Vec<(String, f64, f64, usize)> = Vec::new();
        for ((kind, backward), (secs, count)) in std::mem::take(&mut *sums) {
            if rows.last().is_none_or(|r| r.0 != kind) {
                rows.push((kind, 0.0, 0.0, 0));
            }
            let row = rows.last_mut().expect("pushed above");
            if backward {
                row.2 += secs;
            } else {
                (row.1, row.3) = (row.1 + secs, row.3 + count);
            }
        }
        rows
    }

    /// Frees the activation buffers kept for the next step: a network set
    /// aside (another input size trains meanwhile) should not hold them.
    pub fn release_buffers(&self) {
        self.pool.clear();
    }

    /// Param gradients (into `pgrads`) and input gradients (returned) of one step.
    /// Arms that pass `dy` on take it (leaving it empty); the caller keeps
    /// what is left for reuse.
    fn backward_step(
        &self,
        i: usize,
        step: &Step,
        acts: &Activations,
        dy: &mut Vec<f32>,
        pgrads: &mut [Vec<f32>],
    ) -> Vec<(usize, Vec<f32>)> {
        let vals = &acts.values;
        match step {
            Step::Conv { x, w, b, geom, .. } => {
                let batch = acts.batch;
                kernels::conv_weight_grad(geom, batch, &vals[*x], dy, &mut pgrads[*w], self.precision);
                if let Some(b) = b {
                    kernels::add_channel_sums(dy, &mut pgrads[*b]);
                }
                if *x == self.input {
                    return vec![];
                }
                let mut dx = self.pool.take(vals[*x].len());
                kernels::conv_input_grad(geom, batch, &self.params[*w].data, dy, &mut dx, self.precision);
                vec![(*x, dx)]
            }
            Step::Relu { x, y } => {
                relu_backward(dy, &vals[*y]);
                vec![(*x, std::mem::take(dy))]
            }
            Step::Add { a, b, relu: false, .. } => vec![(*a, self.pool.copy(dy)), (*b, std::mem::take(dy))],
            Step::Add { a, b, y, relu: true } => {
                // The Relu's backward and the copy for the second input in one pass.
                let mut other = self.pool.take(dy.len());
                let chunks = other.par_chunks_mut(PARALLEL_LEN).zip(dy.par_chunks_mut(PARALLEL_LEN));
                chunks.zip(vals[*y].par_chunks(PARALLEL_LEN)).for_each(|((o, g), out)| {
                    for ((o, g), &out) in o.iter_mut().zip(g.iter_mut()).zip(out) {
                        if out <= 0.0 {
                            *g = 0.0;
                        }
                        *o = *g;
                    }
                });
                vec![(*a, other), (*b, std::mem::take(dy))]
            }
            Step::MaxPool { x, geom, .. } => {
                let arg = &acts.argmax[&i];
                let mut dx = self.pool.take(vals[*x].len());
                dx.par_chunks_mut(geom.input_len())
                    .zip(dy.par_chunks(geom.output_len()).zip(arg.par_chunks(geom.output_len())))
                    .for_each(|(dxn, (dyn_, an))| kernels::maxpool_backward(geom, dyn_, an, dxn));
                vec![(*x, dx)]
            }
            Step::GlobalAvgPool { x, hw, .. } => {
                // A pooled buffer filled in parallel (a fresh one page-faulted
                // in every step).
                let mut dx = self.pool.take(dy.len() * hw);
                dx.par_chunks_mut(*hw).zip(dy.par_iter()).for_each(|(plane, &g)| plane.fill(g / *hw as f32));
                vec![(*x, dx)]
            }
            Step::Flatten { x, .. } => vec![(*x, self.channel_major(*x, std::mem::take(dy).into(), acts.batch))],
            Step::Act { x, y, f } => {
                let dx = dy.par_iter().zip(vals[*x].par_iter().zip(&vals[*y])).map(|(g, (&xv, &yv))| g * f.slope(xv, yv)).collect();
                vec![(*x, dx)]
            }
            Step::Affine { x, scale, hw, .. } => {
                if *x == self.input {
                    return vec![];
                }
                let channel = self.channel_of(*x, scale.len(), acts.batch);
                vec![(*x, dy.par_chunks(*hw).enumerate().flat_map_iter(|(i, g)| g.iter().map(move |&v| v * scale[channel(i)])).collect())]
            }
            Step::Upsample { x, h, w, fh, fw, .. } => {
                let (h, w, fh, fw) = (*h, *w, *fh, *fw);
                let mut dx = vec![0.0; vals[*x].len()];
                dx.par_chunks_mut(h * w).zip(dy.par_chunks(h * fh * w * fw)).for_each(|(dxp, dyp)| {
                    for i in 0..h * fh {
                        for j in 0..w * fw {
                            dxp[(i / fh) * w + j / fw] += dyp[i * w * fw + j];
                        }
                    }
                });
                vec![(*x, dx)]
            }
            Step::Resize { x, rows, cols, h, w, .. } => {
                if *x == self.input {
                    return vec![];
                }
                let (h, w, ow) = (*h, *w, cols.len());
                let mut dx = vec![0.0; vals[*x].len()];
                dx.par_chunks_mut(h * w).zip(dy.par_chunks(rows.len() * ow)).for_each(|(dxp, dyp)| {
                    for (r, g_row) in rows.iter().zip(dyp.chunks(ow)) {
                        for (c, &g) in cols.iter().zip(g_row) {
                            dxp[r.i0 * w + c.i0] += r.w0 * c.w0 * g;
                            dxp[r.i0 * w + c.i1] += r.w0 * c.w1 * g;
                            dxp[r.i1 * w + c.i0] += r.w1 * c.w0 * g;
                            dxp[r.i1 * w + c.i1] += r.w1 * c.w1 * g;
                        }
                    }
                });
                vec![(*x, dx)]
            }
            Step::Mul { a, b, hw, .. } => {
                let (av, bv) = (&vals[*a], &vals[*b]);
                let da: Vec<f32> =
                    dy.par_chunks(*hw).zip(bv.par_iter()).flat_map_iter(|(chunk, &s)| chunk.iter().map(move |&g| g * s)).collect();
                let db: Vec<f32> =
                    dy.par_chunks(*hw).zip(av.par_chunks(*hw)).map(|(g, x)| g.iter().zip(x).map(|(g, x)| g * x).sum()).collect();
                vec![(*a, da), (*b, db)]
            }
            Step::BatchNorm { x, y, c, p, relu, .. } => {
                let stats = match acts.bn_batch.get(&i) {
                    Some((m, v)) => (m.as_slice(), v.as_slice(), true),
                    None => (self.params[p[2]].data.as_slice(), self.params[p[3]].data.as_slice(), false),
                };
                let mut dx = self.pool.take(dy.len());
                let relu = relu.then(|| vals[*y].as_slice());
                let (dg, db) = batchnorm_backward(&vals[*x], dy, relu, *c, &self.params[p[0]].data, stats, &mut dx);
                add_into(&mut pgrads[p[0]], &dg);
                add_into(&mut pgrads[p[1]], &db);
                vec![(*x, dx)]
            }
            Step::Gemm { x, w, b, k, n, trans_b, .. } => {
                let batch = acts.batch;
                let xv = &vals[*x];
                if *trans_b {
                    kernels::gemm(*n, batch, *k, dy, true, xv, false, &mut pgrads[*w], 1.0, self.precision);
                } else {
                    kernels::gemm(*k, batch, *n, xv, true, dy, false, &mut pgrads[*w], 1.0, self.precision);
                }
                if let Some(b) = b {
                    for row in dy.chunks(*n) {
                        add_into(&mut pgrads[*b], row);
                    }
                }
                let mut dx = vec![0.0; batch * k];
                kernels::gemm(batch, *n, *k, dy, false, &self.params[*w].data, !*trans_b, &mut dx, 0.0, self.precision);
                vec![(*x, dx)]
            }
        }
    }
}

impl Step {
    /// A step's kind for `Network::step_times`: the op, and for a conv its
    /// kernel, stride and whether it is depthwise or pointwise.
    fn kind(&self) -> String {
        match self {
            Step::Conv { geom: g, .. } => {
                let form = if g.group > 1 && g.group == g.c_in {
                    " depthwise"
                } else if g.kh * g.kw == 1 {
                    " pointwise"
                } else {
                    ""
                };
                let stride = if g.stride[0] == g.stride[1] { g.stride[0].to_string() } else { format!("{}x{}", g.stride[0], g.stride[1]) };
                format!("Conv {}x{}{} stride {}", g.kh, g.kw, form, stride)
            }
            Step::BatchNorm { relu: true, .. } => "BatchNorm+Relu".into(),
            Step::Add { relu: true, .. } => "Add+Relu".into(),
            other => format!("{other:?}").split([' ', '{']).next().unwrap_or_default().to_string(),
        }
    }
}

/// How a value of per-image `shape` is stored: channel-major when it has
/// channels (rank ≥ 2), flat otherwise.
fn dims_of(shape: &[usize]) -> Dims {
    (shape.len() >= 2).then(|| (shape[0], shape[1..].iter().product()))
}

/// dL/dx of a ReLU from dL/dy, in place: zero where the output `y` is not positive.
fn relu_backward(dy: &mut [f32], y: &[f32]) {
    dy.par_chunks_mut(PARALLEL_LEN).zip(y.par_chunks(PARALLEL_LEN)).for_each(|(g, o)| mask_by_relu(g, o));
}

/// Zeroes the gradient `g` where the Relu's output `out` is not positive.
fn mask_by_relu(g: &mut [f32], out: &[f32]) {
    g.iter_mut().zip(out).for_each(|(g, &o)| {
        if o <= 0.0 {
            *g = 0.0
        }
    })
}

/// Whether a constant of `shape` holds one value per channel of `c` (`[C]`
/// broadcast as `[C,1,1]`, or `[1,C,1,1]`).
fn per_channel_shape(shape: &[usize], c: usize) -> bool {
    matches!(shape, [n, 1, 1] | [1, n, 1, 1] if *n == c)
}

/// The values a step reads.
fn step_inputs(step: &Step) -> Vec<usize> {
    match step {
        Step::Add { a, b, .. } | Step::Mul { a, b, .. } => vec![*a, *b],
        Step::Conv { x, .. }
        | Step::Relu { x, .. }
        | Step::MaxPool { x, .. }
        | Step::GlobalAvgPool { x, .. }
        | Step::Flatten { x, .. }
        | Step::Act { x, .. }
        | Step::Affine { x, .. }
        | Step::Upsample { x, .. }
        | Step::Resize { x, .. }
        | Step::BatchNorm { x, .. }
        | Step::Gemm { x, .. } => vec![*x],
    }
}

fn step_output(step: &Step) -> usize {
    match step {
        Step::Conv { y, .. }
        | Step::Relu { y, .. }
        | Step::Add { y, .. }
        | Step::MaxPool { y, .. }
        | Step::GlobalAvgPool { y, .. }
        | Step::Flatten { y, .. }
        | Step::Act { y, .. }
        | Step::Affine { y, .. }
        | Step::Upsample { y, .. }
        | Step::Resize { y, .. }
        | Step::Mul { y, .. }
        | Step::BatchNorm { y, .. }
        | Step::Gemm { y, .. } => *y,
    }
}

/// acc += g, elementwise; large tensors (the gradients that meet at a
/// residual stream) on every core.
fn add_into(acc: &mut [f32], g: &[f32]) {
    if acc.len() < PARALLEL_LEN {
        acc.iter_mut().zip(g).for_each(|(a, b)| *a += b);
    } else {
        acc.par_chunks_mut(PARALLEL_LEN).zip(g.par_chunks(PARALLEL_LEN)).for_each(|(a, g)| a.iter_mut().zip(g).for_each(|(a, b)| *a += b));
    }
}

/// Elementwise work below this many values stays on the calling thread.
const PARALLEL_LEN: usize = 1 << 15;

/// Mean and (biased) variance of one channel's run, summed in f64.
fn run_stats(x: &[f32]) -> (f32, f32) {
    let (s, q) = sums(x, x);
    let n = x.len().max(1) as f64;
    let mean = s / n;
    (mean as f32, ((q / n) - mean * mean).max(0.0) as f32)
}

/// The scale and shift of one BN channel on statistics (`mean`, `var`).
fn bn_affine(gamma: f32, beta: f32, mean: f32, var: f32) -> (f32, f32) {
    let scale = crate::ir::batchnorm::channel_scale(gamma, var, BN_EPS);
    (scale, beta - mean * scale)
}

/// (Σ a, Σ a·b) over paired runs, in f64, with eight partial sums per
/// lane so that the additions vectorize (one running f64 sum waits on
/// every add: it made BN a quarter of a training step).
fn sums(a: &[f32], b: &[f32]) -> (f64, f64) {
    const L: usize = 8;
    let (mut s, mut q) = ([0.0f64; L], [0.0f64; L]);
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..L {
            s[l] += xa[l] as f64;
            q[l] += xa[l] as f64 * xb[l] as f64;
        }
    }
    for (l, (&va, &vb)) in ra.iter().zip(rb).enumerate() {
        s[l] += va as f64;
        q[l] += va as f64 * vb as f64;
    }
    (s.iter().sum(), q.iter().sum())
}

/// Backward of a BN step given the statistics its forward used: with batch
/// statistics dx = s/N·(N·dy − Σdy − x̂·Σ(dy·x̂)), s = γ/σ; with running
/// (frozen) statistics dx = s·dy. Per channel that is dx = A·dy + B·x + C,
/// its coefficients formed in f64. With a fused Relu (its output `relu`),
/// dy is masked first. Each channel's run is masked, summed and turned
/// into dx while it is in cache: one pass over the tensors from memory.
fn batchnorm_backward(
    x: &[f32],
    dy: &mut [f32],
    relu: Option<&[f32]>,
    c: usize,
    gamma: &[f32],
    (mean, var, train): (&[f32], &[f32], bool),
    dx: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let run = (x.len() / c.max(1)).max(1);
    let n = run as f64;
    let channel = |k: usize, dc: &mut [f32], xc: &[f32], gc: &mut [f32]| -> (f32, f32) {
        if let Some(y) = relu {
            let len = gc.len();
            mask_by_relu(gc, &y[k * run..][..len]);
        }
        let inv = 1.0 / ((var[k] + BN_EPS) as f64).sqrt();
        // Σdy and Σ(dy·x̂) = (Σ(dy·x) − μ·Σdy)/σ.
        let (sdy, sdyx) = {
            let (g, gx) = sums(gc, xc);
            (g, (gx - mean[k] as f64 * g) * inv)
        };
        let s = gamma[k] as f64 * inv;
        let (a, b, c0) = if train {
            let b = -s * inv * sdyx / n;
            (s as f32, b as f32, (-s * sdy / n - b * mean[k] as f64) as f32)
        } else {
            (s as f32, 0.0, 0.0)
        };
        dc.iter_mut().zip(xc).zip(&*gc).for_each(|((d, &xv), &g)| *d = a * g + b * xv + c0);
        (sdyx as f32, sdy as f32)
    };
    dx.par_chunks_mut(run)
        .zip(x.par_chunks(run))
        .zip(dy.par_chunks_mut(run))
        .enumerate()
        .map(|(k, ((dc, xc), gc))| channel(k, dc, xc, gc))
        .unzip()
}
