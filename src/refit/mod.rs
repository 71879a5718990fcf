//! Calibrated recovery: after a lossy pass, refit the weights and bias of
//! chosen conv layers by ridge least squares so that each reproduces the
//! output the graph had *before the pass* at the same tensor, on the
//! compressed graph's own inputs (ThiNet / He et al. 2017 reconstruction,
//! Network Decoupling's pointwise refit). Shared by `prune` and `dw`.
//!
//! Memory stays bounded: per calibration image and layer, `positions`
//! output positions are sampled (seeded); a sample is the input patch
//! (C_in·kh·kw values, zero outside the padded border) and the reference
//! output vector. Layers are refit one at a time in topological order, each
//! on inputs computed by the graph with every earlier layer already refit,
//! so errors do not pile up. To keep that cheap, activations are cached at
//! the last cut point (a tensor all later data flows through: a ResNet
//! block output) and only the graph after it is re-run for the next layer.
//! The images are kept as 8-bit crops; the cached activations and every
//! layer's targets go to a temporary file once they pass
//! `calibration.spill_mb` (512 MB; [`spill`]), and images stream through the graph (never all of their
//! activations at once), so memory grows with the sampled rows of one
//! layer, not with the image count.
//!
//! Solve: min ‖[X 1]·[Wᵀ; bᵀ] − Y‖² + λ‖W‖², λ = `ridge`·tr(XᵀX)/D, by Cholesky.
//!
//! Targets (`calibration.target`): `layer` — each conv's own original
//! output; `block` — a conv whose output is one input of a residual Add
//! (and the last refit layer writing into it) is fitted to the original Add
//! output minus the Add's other input *as the compressed model computes it*,
//! so each block repairs the drift of the residual stream it receives.
mod design;
pub(crate) mod obs;
pub mod settings;
mod solve;
mod spill;

pub(crate) use design::{gram, t_mul, Design, Rows};
pub(crate) use solve::residual;
pub use solve::{solve_layer, Fit};
// The pieces of the solves the factorizing passes build on.
pub(crate) use solve::{
    add_ridge, current_solution, not_definite, regularized_gram, relu_target, relu_target_at, with_ones, write_solution, Problem,
};

use crate::error::{Error, Result};
use crate::ir::{Graph, Model};
use crate::rng::Rng;
use crate::runner::Runner;
use ndarray::{Array3, ArrayD, ArrayView4};
use petgraph::stable_graph::NodeIndex;
use rayon::prelude::*;
use spill::Spill;
use std::sync::Mutex;

/// Calibration images (preprocessed) and sampling settings.
pub struct Calibration {
    pub images: Images,
    pub positions: usize,
    pub ridge: f64,
    pub target: settings::RefitTarget,
    pub reference: settings::RefitReference,
    /// Fit convs read by a ReLU on their post-ReLU outputs.
    pub through_relu: bool,
    /// The image files, `extra` included (the default training data of `distill`).
    pub sources: Vec<std::path::PathBuf>,
    pub preprocessing: crate::data::Preprocessing,
    /// Past this many bytes the refits keep their records in a temporary file ([`spill`]).
    pub spill_bytes: u64,
    /// The whole calibration folder when it is labelled (`classes`): what a
    /// task recipe's `retarget` and `distill` train on, while the refits
    /// take only the first `images` of it (their memory grows per image).
    pub labelled: Option<crate::data::DataSource>,
}

/// Calibration images: 8-bit centre crops made tensors when used (3 bytes
/// a pixel instead of 12: 3,000 photos at 224 px take 450 MB), or tensors
/// given as such.
pub enum Images {
    Tensors(Vec<Array3<f32>>),
    Crops { crops: Vec<image::RgbImage>, preprocessing: crate::data::Preprocessing },
}

impl Images {
    pub fn len(&self) -> usize {
        match self {
            Images::Tensors(t) => t.len(),
            Images::Crops { crops, .. } => crops.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image `i` as the model's input tensor (C, H, W).
    pub fn get(&self, i: usize) -> Array3<f32> {
        match self {
            Images::Tensors(t) => t[i].clone(),
            Images::Crops { crops, preprocessing } => preprocessing.to_tensor(&crops[i]),
        }
    }

    /// Image `i` as a batch of one (N = 1, C, H, W).
    fn batch(&self, i: usize) -> ArrayD<f32> {
        self.get(i).insert_axis(ndarray::Axis(0)).into_dyn()
    }

    /// The (C, H, W) of the first image.
    fn shape(&self) -> Option<Vec<usize>> {
        match self {
            Images::Tensors(t) => t.first().map(|a| a.shape().to_vec()),
            Images::Crops { crops, .. } => crops.first().map(|c| vec![3, c.height() as usize, c.width() as usize]),
        }
    }
}

/// A conv to refit: its output should match the reference tensor of the
/// same name, restricted to `kept` channels (all when None).
#[derive(Debug, Clone)]
pub struct Layer {
    pub node: NodeIndex,
    pub kept: Option<Vec<usize>>,
}

/// Geometry of a dense conv, for patch extraction.
#[derive(Debug, Clone)]
struct Geometry {
    kh: usize,
    kw: usize,
    stride: [usize; 2],
    pad: [usize; 2],
    dilation: [usize; 2],
}

fn geometry(graph: &Graph, ix: NodeIndex) -> Option<Geometry> {
    let node = graph.node(ix);
    let w = graph.constant_f32(node.input(1)?)?;
    if node.op() == "Gemm" {
        // A fully connected layer is a 1x1 conv on a 1x1 map, if its weight is [C_out, C_in].
        let one = |a: &str| node.attr_float(a).unwrap_or(1.0) == 1.0;
        let plain = w.ndim() == 2
            && node.attr_int("transA").unwrap_or(0) == 0
            && node.attr_int("transB").unwrap_or(0) == 1
            && one("alpha")
            && one("beta");
        return plain.then_some(Geometry { kh: 1, kw: 1, stride: [1, 1], pad: [0, 0], dilation: [1, 1] });
    }
    let ok = node.op() == "Conv" && node.attr_int("group").unwrap_or(1) == 1 && w.ndim() == 4 && crate::ir::conv::explicit_pads(node);
    let (kh, kw) = (w.shape().get(2).copied()?, w.shape().get(3).copied()?);
    let (stride, pad, dilation) = crate::ir::conv::Window::of(node, vec![kh, kw]).ok()?.pairs()?;
    ok.then_some(Geometry { kh, kw, stride, pad, dilation })
}

/// The layers of `layers` that the generic refit ([`solve_layer`]) handles: dense 2-d convs with f32 weights. A solver
/// given to [`refit_with`] may also get plain Gemms ([C_out, C_in] weight,
/// transB = 1), whose every image gives one sample.
pub fn refittable(graph: &Graph, layers: Vec<Layer>) -> Vec<Layer> {
    layers.into_iter().filter(|l| graph.node(l.node).op() == "Conv" && geometry(graph, l.node).is_some()).collect()
}

/// Least samples per unknown of a layer's least-squares problem: with fewer,
/// the refit of wide 3x3 layers (4,608 inputs in ResNet-50's last stage)
/// fits the calibration samples and not the data.
const SAMPLES_PER_INPUT: usize = 4;

/// Most sampled rows per layer (1,536 images at 32 positions): the solvers
/// hold a layer's rows in f32 (4 bytes per input: 0.9 GB for a 3x3 conv
/// of ResNet-50's last stage; the f64 products are formed in blocks,
/// `design.rs`), so beyond that many images each gives fewer positions
/// and memory stays bounded.
const MAX_ROWS: usize = 49_152;

/// Positions sampled per image for `layer`: `calib.positions`, lowered so
/// that the layer gets at most MAX_ROWS rows, raised so that it gets
/// SAMPLES_PER_INPUT samples per weight of a filter.
fn samples_per_image(graph: &Graph, layer: &Layer, calib: &Calibration) -> usize {
    let inputs = graph.node(layer.node).input(1).and_then(|w| graph.constant(w)).map_or(1, |w| w.shape()[1..].iter().product::<usize>());
    let images = calib.images.len().max(1);
    let cap = (MAX_ROWS / images).max(1);
    calib.positions.min(cap).max((SAMPLES_PER_INPUT * inputs).div_ceil(images))
}

/// Seeded output positions of one image for one layer.
fn positions(h: usize, w: usize, count: usize, seed: u64) -> Vec<(usize, usize)> {
    let mut rng = Rng::new(seed);
    (0..count).map(|_| (rng.below(h), rng.below(w))).collect()
}

fn seed(image: usize, layer: usize) -> u64 {
    (image as u64) << 20 | layer as u64
}

/// Runs `model` on every calibration image, handing each image's extra outputs to `take`.
fn run_all<T: Send>(
    model: &Model,
    names: &[String],
    calib: &Calibration,
    take: impl Fn(usize, &[ArrayD<f32>]) -> T + Sync,
) -> Result<Vec<T>> {
    let mut shape = vec![1];
    shape.extend(calib.images.shape().unwrap_or_default());
    let runner = if shape.len() == 4 { Runner::truncated_at(model, &shape, names)? } else { Runner::truncated(model, 1, names)? };
    (0..calib.images.len())
        .into_par_iter()
        .map(|i| {
            let outs = runner.run(calib.images.batch(i))?;
            Ok(take(i, &outs[outs.len() - names.len()..]))
        })
        .collect()
}

/// A 4-d activation, or a 2-d one [N, C] (a Gemm's) as [N, C, 1, 1].
fn as4(a: &ArrayD<f32>) -> Result<ArrayView4<'_, f32>> {
    let bad = || Error::Data(format!("expected a 2-d or 4-d activation, got {:?}", a.shape()));
    match *a.shape() {
        [n, c] => a.view().into_shape_with_order((n, c, 1, 1)).map_err(|_| bad()),
        _ => a.view().into_dimensionality().map_err(|_| bad()),
    }
}

/// Reference targets: per layer (a segment of the spill), an N×C matrix
/// (row = one sampled position), one record per image.
fn targets(reference: &Model, graph: &Graph, layers: &[Layer], blocks: &[Option<Block>], calib: &Calibration) -> Result<Spill> {
    let names: Vec<String> = layers
        .iter()
        .zip(blocks)
        .map(|(l, b)| b.as_ref().map_or_else(|| graph.node(l.node).outputs()[0].clone(), |b| b.sum.clone()))
        .collect();
    let c_outs: Vec<usize> = layers.iter().map(|l| output_channels(graph, l.node)).collect();
    let floats = layers.iter().zip(&c_outs).map(|(l, c)| samples_per_image(graph, l, calib) * c).collect();
    let store = Spill::new(calib.images.len(), floats, calib.spill_bytes)?;
    run_all(reference, &names, calib, |i, outs| {
        outs.iter().zip(layers).enumerate().try_for_each(|(li, (y, layer))| {
            let y = as4(y)?;
            let (c, h, w) = (y.shape()[1], y.shape()[2], y.shape()[3]);
            let channels: Vec<usize> = layer.kept.clone().unwrap_or_else(|| (0..c).collect());
            if channels.len() != c_outs[li] || channels.iter().any(|&ch| ch >= c) {
                return Err(Error::Data(format!(
                    "reference tensor `{}` has {c} channels, but layer `{}` writes {}",
                    names[li],
                    graph.node(layer.node).name(),
                    c_outs[li]
                )));
            }
            let count = samples_per_image(graph, layer, calib);
            store.put(li, i, &sampled_rows(y, &channels, (h, w), count, seed(i, li)))
        })
    })?
    .into_iter()
    .collect::<Result<()>>()?;
    Ok(store)
}

/// Output channels of a refit layer (its weight's first dimension).
fn output_channels(graph: &Graph, ix: NodeIndex) -> usize {
    graph.node(ix).input(1).and_then(|w| graph.constant(w)).map_or(0, |w| w.shape().first().copied().unwrap_or(0))
}

/// Input patches of one layer at the positions of its output map.
fn patches(x: ArrayView4<f32>, g: &Geometry, out_hw: (usize, usize), count: usize, seed: u64, out: &mut [f32]) -> Result<()> {
    let (c, h, w) = (x.shape()[1], x.shape()[2] as isize, x.shape()[3] as isize);
    if out.len() != count * c * g.kh * g.kw {
        return Err(Error::Data(format!("{count} patches of {c}x{}x{} values do not fill {} rows", g.kh, g.kw, out.len())));
    }
    let mut values = out.iter_mut();
    for (oy, ox) in positions(out_hw.0, out_hw.1, count, seed) {
        for ch in 0..c {
            for ky in 0..g.kh {
                let iy = (oy * g.stride[0] + ky * g.dilation[0]) as isize - g.pad[0] as isize;
                for kx in 0..g.kw {
                    let ix = (ox * g.stride[1] + kx * g.dilation[1]) as isize - g.pad[1] as isize;
                    let inside = (0..h).contains(&iy) && (0..w).contains(&ix);
                    *values.next().expect("sized above") = if inside { x[[0, ch, iy as usize, ix as usize]] } else { 0.0 };
                }
            }
        }
    }
    Ok(())
}

/// A per-layer solver gets the layer's input patches X (N × C_in·kh·kw,
/// row-major) and reference outputs Y (N × C_out).
/// Refits `layers` of `model` against `reference` (the model before the
/// pass, or as loaded: `calibration.reference`), one layer at a time in
/// topological order, each by `solver`, which
/// may also rewrite the graph around the layer (the `dw` pass replaces the
/// conv by its factorized pair there).
pub fn refit_with<T>(
    reference: &Model,
    model: &mut Model,
    layers: &[Layer],
    calib: &Calibration,
    progress: &dyn crate::progress::Progress,
    mut solver: impl FnMut(&mut Graph, &Layer, &[f32], &[f32]) -> Result<T>,
) -> Result<Vec<T>> {
    let layers: Vec<Layer> = layers.iter().filter(|l| geometry(&model.graph, l.node).is_some()).cloned().collect();
    if layers.is_empty() || calib.images.is_empty() {
        return Ok(vec![]);
    }
    let blocks: Vec<Option<Block>> = (0..layers.len())
        .map(|li| (calib.target == settings::RefitTarget::Block).then(|| block_of(&model.graph, &layers, li)).flatten())
        .collect();
    let ys = targets(reference, &model.graph, &layers, &blocks, calib)?;
    let shapes = crate::shape::infer(&model.graph, &Default::default())?;
    let plans: Vec<(String, Geometry, (usize, usize))> = layers
        .iter()
        .map(|l| {
            let node = model.graph.node(l.node);
            let out = shapes.get(&node.outputs()[0]).and_then(|t| t.shape.clone()).unwrap_or_default();
            (
                node.inputs()[0].clone(),
                geometry(&model.graph, l.node).expect("refittable"),
                (out.get(2).copied().unwrap_or(1), out.get(3).copied().unwrap_or(1)),
            )
        })
        .collect();
    let mut cursor = Cursor { tensor: None, acts: None };
    let mut report = Vec::new();
    // Layers run minutes each on thousands of images: say which and when it ends.
    progress.start(&format!("refit on {} images", calib.images.len()), layers.len() as u64);
    for (li, (layer, (input, geo, out_hw))) in layers.iter().zip(&plans).enumerate() {
        // The solver may restructure the graph: cut points are found anew.
        let cuts = cut_points(&model.graph);
        let count = samples_per_image(&model.graph, layer, calib);
        let mut y = ys.segment(li)?;
        if let Some(block) = &blocks[li] {
            // The other Add input comes first in the graph: advance to it first.
            let other = cursor.advance(model, &shapes, &cuts, &block.other, calib, |i, a| at_samples(a, *out_hw, count, li, i))?;
            subtract_rows(&mut y, &other)?;
        }
        // Every image writes its rows into its own slice of one buffer: no
        // per-image vectors to join (they held a layer's rows twice).
        let per_image = count * input_width(&model.graph, layer.node);
        let mut rows = vec![0f32; calib.images.len() * per_image];
        let slots: Vec<Mutex<&mut [f32]>> = rows.chunks_mut(per_image.max(1)).map(Mutex::new).collect();
        cursor.advance(model, &shapes, &cuts, input, calib, |i, x| {
            let mut slot = slots[i].lock().map_err(|_| Error::Data("a calibration thread panicked".into()))?;
            patches(as4(x)?, geo, *out_hw, count, seed(i, li), &mut slot)
        })?;
        drop(slots);
        let name = model.graph.node(layer.node).name().to_string();
        report.push(solver(&mut model.graph, layer, &rows, &y)?);
        progress.advance(li as u64 + 1, &name);
    }
    progress.finish();
    Ok(report)
}

/// Values per sampled row of conv `ix`: its weight's C_in/group · kh · kw.
fn input_width(graph: &Graph, ix: NodeIndex) -> usize {
    graph.node(ix).input(1).and_then(|w| graph.constant(w)).map_or(0, |w| w.shape()[1..].iter().product())
}

/// A refit conv whose output is one input of a residual Add.
struct Block {
    /// The Add's output (the reference target).
    sum: String,
    /// The Add's other input, taken from the model being refit.
    other: String,
}

/// The block target of layer `li`: its output's sole consumer is a
/// two-input Add, and no later layer of `layers` writes the Add's other
/// input (that one then takes the block target instead).
fn block_of(graph: &Graph, layers: &[Layer], li: usize) -> Option<Block> {
    let y = graph.node(layers[li].node).output(0)?;
    let [(add, _)] = graph.consumers(y)[..] else { return None };
    let node = graph.node(add);
    let inputs: Vec<&String> = node.inputs().iter().filter(|n| !n.is_empty()).collect();
    if node.op() != "Add" || inputs.len() != 2 || inputs.iter().any(|n| graph.weights().contains_key(n.as_str())) {
        return None;
    }
    let other = inputs.into_iter().find(|n| n.as_str() != y)?.clone();
    let later = graph.producer(&other).is_some_and(|(p, _)| layers[li + 1..].iter().any(|l| l.node == p));
    let sum = node.output(0)?.to_string();
    (!later).then_some(Block { sum, other })
}

/// Image `i`'s activation `a` at layer `li`'s sampled output positions,
/// position-major (the layout of the targets).
fn at_samples(a: &ArrayD<f32>, (h, w): (usize, usize), count: usize, li: usize, i: usize) -> Result<Vec<f32>> {
    let a = as4(a)?;
    if a.shape()[2] != h || a.shape()[3] != w {
        return Err(Error::Data(format!("residual input of shape {:?} does not match targets at {h}x{w}", a.shape())));
    }
    let channels: Vec<usize> = (0..a.shape()[1]).collect();
    Ok(sampled_rows(a, &channels, (h, w), count, seed(i, li)))
}

/// `channels` of `a` at `count` seeded positions of its (h, w) map, position-major.
fn sampled_rows(a: ArrayView4<f32>, channels: &[usize], (h, w): (usize, usize), count: usize, seed: u64) -> Vec<f32> {
    let mut out = Vec::with_capacity(count * channels.len());
    for (py, px) in positions(h, w, count, seed) {
        out.extend(channels.iter().map(|&ch| a[[0, ch, py, px]]));
    }
    out
}

/// Subtracts the other Add input at the sampled positions (one vector per image) from the targets.
fn subtract_rows(y: &mut [f32], other: &[Vec<f32>]) -> Result<()> {
    let total: usize = other.iter().map(Vec::len).sum();
    if total != y.len() {
        return Err(Error::Data(format!("residual input has {total} values at the sampled positions, the targets {}", y.len())));
    }
    y.iter_mut().zip(other.iter().flatten()).for_each(|(v, o)| *v -= o);
    Ok(())
}

/// Tensors every later node's data flows through (block outputs of a
/// ResNet), by position in the topological order: the network can be
/// restarted from any of them.
fn cut_points(graph: &Graph) -> Vec<(usize, String)> {
    let order = graph.topo_order().unwrap_or_default();
    let pos: std::collections::HashMap<NodeIndex, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    // For each node, the earliest position its activation inputs come from (graph inputs: before everything).
    let earliest: Vec<Option<usize>> = order
        .iter()
        .map(|&ix| {
            graph
                .node(ix)
                .inputs()
                .iter()
                .filter(|n| !n.is_empty() && !graph.weights().contains_key(n.as_str()))
                .map(|n| graph.producer(n).map(|(p, _)| pos[&p]))
                .min()
                .flatten()
        })
        .collect();
    let reads_input: Vec<bool> = order
        .iter()
        .map(|&ix| graph.node(ix).inputs().iter().any(|n| graph.is_graph_input(n) && !graph.weights().contains_key(n.as_str())))
        .collect();
    let mut cuts = Vec::new();
    for p in 0..order.len() {
        let node = graph.node(order[p]);
        if node.outputs().len() != 1 {
            continue;
        }
        let later_ok = (p + 1..order.len()).all(|q| !reads_input[q] && earliest[q].is_none_or(|e| e >= p));
        if later_ok {
            cuts.push((p, node.outputs()[0].clone()));
        }
    }
    cuts
}

/// Cached activations of every calibration image at one cut point.
struct Cursor {
    /// None = the graph input.
    tensor: Option<String>,
    /// One record per image (None: the images themselves) and its shape.
    acts: Option<(Spill, Vec<usize>)>,
}

impl Cursor {
    /// Image `i` at the cursor.
    fn get(&self, calib: &Calibration, i: usize) -> Result<ArrayD<f32>> {
        match &self.acts {
            None => Ok(calib.images.batch(i)),
            Some((spill, shape)) => ArrayD::from_shape_vec(shape.clone(), spill.get(0, i)?)
                .map_err(|e| Error::Data(format!("cached activation of image {i}: {e}"))),
        }
    }

    /// Moves to the last cut point before `target`'s producer and returns
    /// `take` of each image's `target` activation, running only the graph
    /// between the two, one image at a time per thread.
    fn advance<T: Send>(
        &mut self,
        model: &Model,
        shapes: &crate::shape::Shapes,
        cuts: &[(usize, String)],
        target: &str,
        calib: &Calibration,
        take: impl Fn(usize, &ArrayD<f32>) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let n = calib.images.len();
        let at_input = self.tensor.is_none() && model.graph.is_graph_input(target);
        if self.tensor.as_deref() == Some(target) || at_input {
            return (0..n).into_par_iter().map(|i| take(i, &self.get(calib, i)?)).collect();
        }
        let order = model.graph.topo_order()?;
        let target_pos = model.graph.producer(target).and_then(|(p, _)| order.iter().position(|&n| n == p));
        let from_pos = self.tensor.as_deref().and_then(|t| model.graph.producer(t)).and_then(|(p, _)| order.iter().position(|&n| n == p));
        // The last cut point after the cursor and not after the target.
        let next_cut =
            cuts.iter().rfind(|(p, _)| from_pos.is_none_or(|f| *p > f) && target_pos.is_some_and(|t| *p <= t)).map(|(_, t)| t.clone());
        let mut names = vec![target.to_string()];
        if let Some(cut) = next_cut.as_ref().filter(|c| c.as_str() != target) {
            names.push(cut.clone());
        }
        let sub = sub_model(model, shapes, self.tensor.as_deref(), &names)?;
        // The cursor's activations (the images themselves at first) set the input size.
        let first = self.get(calib, 0)?;
        let runner = Runner::truncated_at(&sub, first.shape(), &names)?;
        // The new cut's shape, from one image, sizes its store.
        let store = match &next_cut {
            Some(_) => {
                let out = runner.run(first)?.pop().expect("an output");
                let shape = out.shape().to_vec();
                Some((Spill::new(n, vec![out.len()], calib.spill_bytes)?, shape))
            }
            None => None,
        };
        let taken = (0..n)
            .into_par_iter()
            .map(|i| {
                let mut outs = runner.run(self.get(calib, i)?)?;
                let cut = if outs.len() > 1 { outs.pop() } else { None };
                let target_act = outs.pop().expect("one output");
                if let Some((spill, _)) = &store {
                    let kept = cut.as_ref().unwrap_or(&target_act).as_standard_layout();
                    spill.put(0, i, kept.as_slice().expect("standard layout"))?;
                }
                take(i, &target_act)
            })
            .collect::<Result<Vec<T>>>()?;
        if let Some(cut) = next_cut {
            self.acts = store;
            self.tensor = Some(cut);
        }
        Ok(taken)
    }
}

/// The part of `model` from tensor `from` (a cut point; None = the graph
/// input) to `outputs`, with `from` as its input.
fn sub_model(model: &Model, shapes: &crate::shape::Shapes, from: Option<&str>, outputs: &[String]) -> Result<Model> {
    let Some(from) = from else { return Ok(model.clone()) };
    let g = &model.graph;
    let order = g.topo_order()?;
    let (producer, _) = g.producer(from).ok_or_else(|| Error::invalid(format!("`{from}` has no producer")))?;
    let cut = order.iter().position(|&n| n == producer).expect("in order");
    // Copy only the nodes after the cut and the weights they read.
    let nodes: Vec<crate::onnx::NodeProto> = order[cut + 1..].iter().map(|&ix| g.node(ix).proto.clone()).collect();
    let weights = nodes.iter().flat_map(|n| n.input.iter()).filter_map(|n| g.weight(n).map(|w| (n.clone(), w.clone()))).collect();
    let mut sub = Model { proto: model.proto.clone(), graph: Graph::new(nodes, weights, g.meta.clone())? };
    let dims: Vec<Option<i64>> =
        shapes.get(from).and_then(|t| t.shape.clone()).unwrap_or_default().iter().map(|&d| Some(d as i64)).collect();
    sub.graph.meta.input = vec![crate::ir::value_info(from, &dims)];
    sub.graph.meta.output = outputs
        .iter()
        .map(|o| {
            let mut vi = crate::ir::value_info(o, &[]);
            if let Some(crate::onnx::type_proto::Value::TensorType(t)) = vi.r#type.as_mut().and_then(|t| t.value.as_mut()) {
                t.shape = None;
            }
            vi
        })
        .collect();
    sub.graph.meta.value_info.clear();
    Ok(sub)
}

impl Calibration {
    /// The first `images` images (sorted by path) of the configured folder, preprocessed.
    pub fn load(cfg: &settings::Calibration) -> Result<Calibration> {
        let pre = crate::data::Preprocessing::from_choice(&cfg.preprocess)?;
        // Labelled (`classes`): the classes in turn, not the first N by path.
        let source = crate::data::DataSource { dir: cfg.data.clone(), images: Some(cfg.images), classes: cfg.classes.clone() };
        let paths = source.paths()?;
        let mut extras = Vec::new();
        for extra in &cfg.extra {
            extras.extend(extra.paths()?);
        }
        let refit_paths: Vec<&std::path::PathBuf> = paths.iter().chain(extras.iter().take(cfg.refit_extra)).collect();
        let crops = refit_paths.par_iter().map(|p| Ok(pre.centre_crop(&crate::data::decode_rgb(p)?))).collect::<Result<Vec<_>>>()?;
        let mut sources = paths;
        sources.extend(extras);
        Ok(Calibration {
            images: Images::Crops { crops, preprocessing: pre.clone() },
            positions: cfg.positions,
            ridge: cfg.ridge,
            target: cfg.target,
            reference: cfg.reference,
            through_relu: cfg.through_relu,
            spill_bytes: cfg.spill_mb << 20,
            sources,
            preprocessing: pre,
            labelled: cfg.classes.as_ref().map(|c| crate::data::DataSource {
                dir: cfg.data.clone(),
                images: None,
                classes: Some(c.clone()),
            }),
        })
    }

    /// Calibration on in-memory images (caffe preprocessing, no source files).
    pub fn from_images(images: Vec<Array3<f32>>, positions: usize, ridge: f64) -> Calibration {
        Calibration {
            images: Images::Tensors(images),
            positions,
            ridge,
            target: Default::default(),
            reference: Default::default(),
            through_relu: true,
            spill_bytes: spill::SPILL_BYTES,
            sources: vec![],
            preprocessing: crate::data::Preprocessing::caffe(),
            labelled: None,
        }
    }
}
