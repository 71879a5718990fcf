//! The distillation engine behind the `distill` pass (`passes/distill.rs`
//! holds its specification): trains a student [`Network`] to reproduce a
//! teacher model on augmented images, keeping the best epoch on a hold-out.
//! Progress goes to a [`Progress`] the caller renders.
use super::checkpoint::{self, State};
use super::kernels::Precision;
use super::optim::{ema_update, warm_cosine, Optimizer};
use super::{Mode, Network, Param};
use crate::data::augment::ImagePool;
use crate::data::Preprocessing;
use crate::data::{DataSource, Preprocess};
use crate::error::{Error, Result};
use crate::ir::{Graph, Model};
use crate::progress::Progress;
use crate::rng::Rng;
use crate::runner::Runner;
use crate::shape::Shapes;
use serde::{Deserialize, Serialize};

/// Options of `distill`; see `passes/distill.rs`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillOptions {
    /// Training images; empty = the pipeline's calibration images.
    pub data: Vec<DataSource>,
    /// Preprocessing; default: the calibration's, else caffe.
    pub preprocess: Option<Preprocess>,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub optimizer: super::optim::Kind,
    pub weight_decay: f64,
    pub temperature: f64,
    /// Weight of the MSE on the features `features` names (0 = logits only).
    pub feature_weight: f64,
    /// Which features the MSE compares (with `feature_weight`).
    pub features: FeatureSet,
    /// Share of the training images held back to pick the best epoch.
    pub holdout: f64,
    /// Smallest area share of a random resized crop.
    pub min_scale: f64,
    /// Share of the training images blended with another image of their
    /// batch (mixup, weight drawn uniformly; student and teacher see the
    /// same blend): new inputs for the teacher to label.
    pub mixup: f64,
    pub seed: u64,
    /// Threads (default: all cores).
    pub threads: Option<usize>,
    /// Resume from / write to this file after every epoch.
    pub checkpoint: Option<PathBuf>,
    /// The teacher model; default: the model as loaded, before any pass.
    pub teacher: Option<PathBuf>,
    /// BatchNorm after every conv during training, folded back at the end.
    pub batchnorm: BatchNormMode,
    /// Weight of the cross-entropy on the labels of labelled images
    /// (`data` entries with `classes`), beside the KD loss.
    pub label_weight: f64,
    /// Epochs of linear learning-rate warm-up before the cosine decay.
    pub warmup: f64,
    /// Augmented views per image: epoch e shows image i its view
    /// (e − 1) mod `views` (fixed crops and flips), so the teacher's logits
    /// of a view are computed once and reused from then on (without feature
    /// distillation or mixup, whose targets are not per view). None: a new
    /// crop every epoch, the teacher run on every batch.
    pub views: Option<usize>,
    /// Train (and pick the epoch) at this input size instead of the model's:
    /// a ResNet is convolutional up to its global pooling, so a student
    /// trained on 160-px crops of 150-px photos runs at 224 px afterwards.
    pub resolution: Option<usize>,
    /// With `resolution`: progressive resizing (fast.ai, FFCV): epoch 1
    /// trains at this size, the size grows linearly to `resolution` by 3/4
    /// of the epochs (in steps of 16 px) and stays there. The teacher labels
    /// every view at `resolution` (the same crop and flip), so its cached
    /// logits serve every size; the hold-out is scored at `resolution`.
    pub resolution_from: Option<usize>,
    /// With `resolution` and `batchnorm: train`: after training, the BN
    /// running statistics are re-estimated at the model's own input size on
    /// the centre crops of up to this many training images (FixRes, Touvron
    /// et al. 2019: statistics gathered on 160-px crops misdescribe the
    /// activations of 224-px ones), and kept unless the hold-out, scored at
    /// that size, gets worse. 0: off.
    pub recalibrate: usize,
    /// With `resolution`: the teacher sees each training view (the same
    /// crop and flip) at the model's own input size rather than the
    /// training size. Its logits are better there (the 6-class task model,
    /// on training photos: top-1 0.949 on 160-px centre crops, 0.964 at 224),
    /// at about twice the teacher's time per view.
    pub teacher_at_model_size: bool,
    /// Keep an exponential moving average of the weights with this decay
    /// per step (0: off; e.g. 0.998 averages over the last ~500 steps): the
    /// hold-out scores it, and the epoch kept is its weights at that epoch.
    pub ema: f64,
    /// Keep the teacher's outputs in this directory, keyed by the SHA-256
    /// of each input it saw, and reuse them in later runs (another student,
    /// lr, epoch count on the same teacher, photos and `seed`):
    /// see `src/train/teacher_cache.rs`. Logits and pooled features only.
    pub teacher_cache: Option<PathBuf>,
    /// The arithmetic of the matrix products of the student's training and
    /// of the teacher: `f32`, or `bf16` operands with f32 sums (needs
    /// AVX512-BF16; the teacher then runs in this engine, not tract).
    pub precision: super::kernels::Precision,
}

/// The feature maps feature distillation compares, student against teacher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureSet {
    /// Per spatial size, the last residual stage output (FitNets' hints).
    #[default]
    Stages,
    /// The globally pooled features the classifier reads: one vector per
    /// image, so the teacher's are cached per view like its logits.
    Pooled,
}

/// How `distill` trains: see `passes/distill.rs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchNormMode {
    /// No BN: the folded convs are trained as they are.
    #[default]
    Off,
    /// BN with frozen (running) statistics: a learnable per-channel affine map.
    Frozen,
    /// BN with batch statistics (running statistics for evaluation).
    Train,
}

impl Default for DistillOptions {
    fn default() -> Self {
        DistillOptions {
            data: vec![],
            preprocess: None,
            epochs: 1,
            batch: 16,
            // Measured (README): LAMB 1e-4 improves a rank-1 dw student
            // (agreement 0.511 -> 0.533, KL 2.41 -> 1.65 in 25 steps); 1e-3 harms it.
            lr: 1e-4,
            optimizer: super::optim::Kind::Lamb,
            weight_decay: 0.0,
            temperature: 2.0,
            feature_weight: 0.0,
            features: FeatureSet::default(),
            holdout: 0.1,
            min_scale: 0.35,
            mixup: 0.0,
            seed: 0,
            threads: None,
            checkpoint: None,
            teacher: None,
            batchnorm: BatchNormMode::default(),
            label_weight: 0.0,
            views: None,
            warmup: 0.0,
            resolution: None,
            resolution_from: None,
            recalibrate: 1024,
            teacher_at_model_size: false,
            ema: 0.0,
            teacher_cache: None,
            precision: Default::default(),
        }
    }
}

/// Weight of a training batch in the BN running statistics.
const BN_MOMENTUM: f32 = 0.1;
use super::teacher_cache::{self, Key, TeacherCache};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// Where the training images come from when `distill.data` is empty: the
/// pipeline's calibration images and their preprocessing.
pub struct DefaultImages<'a> {
    pub sources: &'a [PathBuf],
    pub preprocessing: &'a Preprocessing,
    /// The whole calibration folder with its labels, when it is labelled:
    /// trained on in full (the refits take only `images` of it).
    pub labelled: Option<&'a DataSource>,
}

/// Trains `graph` (the student, with `shapes`) to reproduce `teacher`;
/// returns the log of what it did (epochs, the epoch kept).
pub fn distill(
    graph: &mut Graph,
    shapes: &Shapes,
    teacher_model: &Model,
    defaults: Option<DefaultImages>,
    o: &DistillOptions,
    progress: &dyn Progress,
) -> Result<Vec<String>> {
    let mut log = Vec::new();
    if o.precision == Precision::Bf16 {
        log.push("matrix products in bf16 with f32 sums (AVX512-BF16): the student's training, and the teacher in this engine".into());
    }
    let (paths, mut labels, mut pre) = training_images(defaults, o)?;
    let (model_shapes, model_pre) = (shapes, pre.clone());
    let resized;
    let shapes = match o.resolution {
        Some(r) => {
            resized = shapes_at(graph, shapes, r)?;
            // Same crop share as the preprocessing's (e.g. 224 of 256).
            pre.resize = ((r as f64) * pre.resize as f64 / pre.crop.max(1) as f64).round() as u32;
            pre.crop = r as u32;
            log.push(format!("training at {r}x{r} px (resize {}, crop {r})", pre.resize));
            &resized
        }
        None => shapes,
    };
    let network = |shapes: &Shapes| {
        let mut net = match o.batchnorm {
            BatchNormMode::Off => Network::from_graph(graph, shapes),
            _ => Network::with_batchnorm(graph, shapes),
        }?;
        net.set_precision(o.precision)?;
        Ok::<_, Error>(net)
    };
    let mut net = network(shapes)?;
    // Progressive resizing: the student at an epoch's smaller size.
    let at_size = |r: usize| network(&shapes_at(graph, model_shapes, r)?);
    if let (Some(from), Some(to)) = (o.resolution_from, o.resolution) {
        let sizes: Vec<String> = (1..=o.epochs).map(|e| epoch_size(from, to, e, o.epochs).to_string()).collect();
        log.push(format!("progressive resizing, px by epoch: {}", sizes.join(" ")));
    }
    let outputs = net.output_len();
    if let Some(l) = labels.iter().flatten().find(|&&l| l >= outputs) {
        return Err(fail(format!("a label is line {} of the class list, but the student has {outputs} outputs", l + 1)));
    }
    // Labels only count where they are trained on: otherwise the teacher decides.
    if o.label_weight == 0.0 {
        labels.iter_mut().for_each(|l| *l = None);
    }
    let threads = o.threads.unwrap_or_else(rayon::current_num_threads);
    let pool =
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(|e| fail(format!("cannot start {threads} threads: {e}")))?;
    pool.install(|| -> Result<()> {
        let images = ImagePool::load(&paths, pre)?;
        let (train, hold) = split(&labels, o.holdout, o.seed);
        let teacher_shapes = crate::validate::validate(&teacher_model.graph, &Default::default())?;
        // KD compares the logits class by class: a head refit to another class list cannot learn from this teacher.
        if let Some(k) = crate::config::class_count(&teacher_model.graph, &teacher_shapes).filter(|&k| k != outputs) {
            return Err(fail(format!("the teacher has {k} outputs, the student {outputs}: KD needs the same classes in the same order")));
        }
        let features = match o.features {
            _ if o.feature_weight == 0.0 => vec![],
            FeatureSet::Stages => stage_outputs(graph, shapes, &teacher_shapes),
            FeatureSet::Pooled => pooled_output(graph, shapes, &teacher_shapes)?,
        };
        let names = features.iter().map(|f| f.name.clone()).collect();
        // The teacher sees the views at the model's size when asked to (it
        // is most accurate there) and the student trains at another one.
        let (model_size, training_size) = (student_input(graph, model_shapes)?, student_input(graph, shapes)?);
        let teacher_input = if o.teacher_at_model_size { &model_size } else { &training_size };
        let teacher_size = (teacher_input != &training_size).then_some(teacher_input[2] as u32);
        let teacher = Teacher::new(teacher_model, o.batch.min(train.len()), names, teacher_input, o.teacher_cache.as_deref(), o.precision)?;
        Trainer {
            net: &mut net,
            teacher: &teacher,
            images: &images,
            labels: &labels,
            o,
            log: &mut log,
            progress,
            features,
            adapters: vec![],
            cached: Default::default(),
            teacher_size,
            at_size: &at_size,
            smaller: None,
            swapped: false,
        }
        .run(&train, &hold)?;
        if let Some(line) = teacher.cache_note() {
            progress.log("distill", &line);
            log.push(line);
        }
        drop(images);
        if o.batchnorm == BatchNormMode::Train && o.recalibrate > 0 && o.resolution.is_some_and(|r| r != model_size[2]) {
            let at = AtModelSize { graph, shapes: model_shapes, teacher: teacher_model, paths: &paths, pre: model_pre, labels: &labels };
            at.recalibrate(&mut net, &train, &hold, o, &mut log, progress)?;
        }
        Ok(())
    })?;
    net.write_back(graph);
    Ok(log)
}

/// What BN recalibration needs of the model at its own input size.
struct AtModelSize<'a> {
    graph: &'a Graph,
    shapes: &'a Shapes,
    teacher: &'a Model,
    paths: &'a [PathBuf],
    pre: Preprocessing,
    labels: &'a [Option<usize>],
}

impl AtModelSize<'_> {
    /// Re-estimates the BN running statistics of `net` (trained at another
    /// size) on centre crops at the model's size: a training-mode forward
    /// pass per batch, the statistics averaged over the batches (as
    /// PyTorch's BN with `momentum=None`). Keeps them unless the hold-out
    /// at this size scores worse than with the training-size statistics.
    fn recalibrate(
        &self,
        net: &mut Network,
        train: &[usize],
        hold: &[usize],
        o: &DistillOptions,
        log: &mut Vec<String>,
        progress: &dyn Progress,
    ) -> Result<()> {
        let started = Instant::now();
        let batch = o.batch.min(train.len()).max(1);
        // Evenly spread over the (class-shuffled) training images, then the hold-out.
        let stride = train.len().div_ceil(o.recalibrate).max(1);
        let chosen: Vec<usize> = train.iter().step_by(stride).copied().collect();
        let picked: Vec<usize> = chosen.iter().chain(hold).copied().collect();
        let paths: Vec<PathBuf> = picked.iter().map(|&i| self.paths[i].clone()).collect();
        let labels: Vec<Option<usize>> = picked.iter().map(|&i| self.labels[i]).collect();
        let images = ImagePool::load(&paths, self.pre.clone())?;
        let (local_train, local_hold): (Vec<usize>, Vec<usize>) = ((0..chosen.len()).collect(), (chosen.len()..picked.len()).collect());
        let mut full = Network::with_batchnorm(self.graph, self.shapes)?;
        full.set_precision(o.precision)?;
        copy_params(net, &mut full, |_| true);
        let input = student_input(self.graph, self.shapes)?;
        let teacher = Teacher::new(self.teacher, batch, vec![], &input, o.teacher_cache.as_deref(), o.precision)?;
        let mut notes = Vec::new();
        let t = Trainer {
            net: &mut full,
            teacher: &teacher,
            images: &images,
            labels: &labels,
            o,
            log: &mut notes,
            progress,
            features: vec![],
            adapters: vec![],
            cached: Default::default(),
            teacher_size: None,
            at_size: &|_| Err(fail("no progressive resizing while re-estimating BN statistics")),
            smaller: None,
            swapped: false,
        };
        let hold_teacher = t.teacher_logits(&local_hold)?;
        log.extend(teacher.cache_note());
        let before = t.holdout(&local_hold, &hold_teacher)?;
        let steps = local_train.len() / batch;
        progress.start("distill: BN statistics at the model's size", steps as u64);
        for (k, chunk) in local_train.chunks_exact(batch).enumerate() {
            let x = images.batch(chunk, |_, i| images.centred(i));
            let acts = t.net.forward_mode(x, batch, Mode::Train)?;
            t.net.update_running_stats(&acts, 1.0 / (k + 1) as f32);
            progress.advance(k as u64 + 1, "");
        }
        progress.finish();
        let after = t.holdout(&local_hold, &hold_teacher)?;
        let keep = !before.better_than(&after);
        if keep {
            copy_params(&full, net, |p| !p.trainable);
        }
        let size = self.pre.crop;
        let line = format!(
            "BN statistics re-estimated at {size}x{size} px on {} training images ({:.0} s): at that size, before: {before}; after: {after}; {}",
            steps * batch,
            started.elapsed().as_secs_f64(),
            if keep { "kept" } else { "not kept (the hold-out got worse)" }
        );
        progress.log("distill", &line);
        log.push(line);
        Ok(())
    }
}

/// Exchanges the network's weights with the moving average's (a no-op
/// without one); twice restores them.
fn swap_weights(net: &mut Network, ema: &mut Option<Vec<Vec<f32>>>) {
    for (p, e) in net.params.iter_mut().zip(ema.iter_mut().flatten()) {
        std::mem::swap(&mut p.data, e);
    }
}

/// Copies into `to` the params of `from` with the same name for which
/// `which` holds (the networks of one graph at two input sizes).
fn copy_params(from: &Network, to: &mut Network, which: impl Fn(&Param) -> bool) {
    let by_name: std::collections::HashMap<&str, &Param> = from.params.iter().filter(|p| which(p)).map(|p| (p.name.as_str(), p)).collect();
    for p in &mut to.params {
        if let Some(src) = by_name.get(p.name.as_str()).filter(|s| s.data.len() == p.data.len()) {
            p.data.clone_from(&src.data);
        }
    }
}

fn fail(reason: impl Into<String>) -> Error {
    Error::Pass { pass: "distill".into(), reason: reason.into() }
}

/// The image files and preprocessing to train on.
#[allow(clippy::type_complexity)]
fn training_images(defaults: Option<DefaultImages>, o: &DistillOptions) -> Result<(Vec<PathBuf>, Vec<Option<usize>>, Preprocessing)> {
    let pre = match (&o.preprocess, &defaults) {
        (Some(p), _) => Preprocessing::from_choice(p)?,
        (None, Some(d)) => d.preprocessing.clone(),
        (None, None) => Preprocessing::caffe(),
    };
    let mut samples = Vec::new();
    for source in &o.data {
        samples.extend(source.samples()?);
    }
    if o.data.is_empty() {
        samples = default_samples(defaults)?;
    }
    if samples.len() < 2 {
        return Err(fail("needs at least 2 training images: give `distill: {data: [{dir: DIR}]}` or a `calibration:` folder"));
    }
    if o.label_weight > 0.0 && samples.iter().all(|(_, l)| l.is_none()) {
        return Err(fail("`label_weight` needs labelled images: give a `data` entry with `classes`"));
    }
    let lists: std::collections::BTreeSet<_> = o.data.iter().filter_map(|d| d.classes.as_ref()).collect();
    if lists.len() > 1 {
        return Err(fail("labelled `data` entries must share one `classes` list (labels are its line numbers)"));
    }
    let (paths, labels) = samples.into_iter().unzip();
    Ok((paths, labels, pre))
}

/// The calibration's images: with a labelled calibration folder, every
/// photo of it with its label, then the (unlabelled) `extra` images.
fn default_samples(defaults: Option<DefaultImages>) -> Result<Vec<(PathBuf, Option<usize>)>> {
    let Some(d) = defaults else { return Ok(vec![]) };
    let mut samples = match d.labelled {
        Some(source) => source.samples()?,
        None => vec![],
    };
    let known: std::collections::HashSet<PathBuf> = samples.iter().map(|(p, _)| p.clone()).collect();
    samples.extend(d.sources.iter().filter(|p| !known.contains(*p)).map(|p| (p.clone(), None)));
    Ok(samples)
}

/// A stage output matched between student and teacher.
struct Feature {
    name: String,
    student_c: usize,
    teacher_c: usize,
    hw: (usize, usize),
}

/// Stage outputs for feature distillation: per spatial size, the last
/// tensor written by a residual Add (or the Relu right after it), when the
/// teacher has a tensor of that name at the same resolution (its channel
/// count may differ: a 1x1 adapter maps the student's onto the teacher's).
fn stage_outputs(graph: &Graph, student: &Shapes, teacher: &Shapes) -> Vec<Feature> {
    let mut last: Vec<(Vec<usize>, String)> = Vec::new();
    for ix in graph.topo_order().unwrap_or_default() {
        let node = graph.node(ix);
        let Some(out) = node.output(0).filter(|_| node.op() == "Add") else { continue };
        let consumers = graph.consumers(out);
        let tensor = match consumers.as_slice() {
            [(c, _)] if graph.node(*c).op() == "Relu" => graph.node(*c).output(0).unwrap_or(out).to_string(),
            _ => out.to_string(),
        };
        let Some(shape) = student.get(&tensor).and_then(|t| t.shape.clone()).filter(|s| s.len() == 4) else { continue };
        let spatial = shape[2..].to_vec();
        last.retain(|(s, _)| *s != spatial);
        last.push((spatial, tensor));
    }
    let shape = |shapes: &Shapes, t: &str| shapes.get(t).and_then(|s| s.shape.clone()).filter(|s| s.len() == 4);
    last.into_iter()
        .filter_map(|(_, name)| {
            let (s, t) = (shape(student, &name)?, shape(teacher, &name)?);
            (s[2..] == t[2..]).then(|| Feature { student_c: s[1], teacher_c: t[1], hw: (s[2], s[3]), name })
        })
        .collect()
}

/// The output of the last GlobalAveragePool (N×C×1×1), when the teacher
/// has a tensor of that name and shape (its C may differ: an adapter maps
/// the student's onto it).
fn pooled_output(graph: &Graph, student: &Shapes, teacher: &Shapes) -> Result<Vec<Feature>> {
    let order = graph.topo_order().unwrap_or_default();
    let name = order
        .iter()
        .rev()
        .map(|&ix| graph.node(ix))
        .find(|n| n.op() == "GlobalAveragePool")
        .and_then(|n| n.output(0))
        .ok_or_else(|| fail("`features: pooled` needs a GlobalAveragePool in the student".to_string()))?
        .to_string();
    let shape = |shapes: &Shapes| shapes.get(&name).and_then(|s| s.shape.clone()).filter(|s| s.len() == 4 && s[2..] == [1, 1]);
    match (shape(student), shape(teacher)) {
        (Some(s), Some(t)) => Ok(vec![Feature { student_c: s[1], teacher_c: t[1], hw: (1, 1), name }]),
        _ => Err(fail(format!("`features: pooled`: the teacher has no N×C×1×1 tensor `{name}` to match the student's pooled features"))),
    }
}

/// The graph's shapes with its data input resized to `r`x`r` px.
fn shapes_at(graph: &Graph, shapes: &Shapes, r: usize) -> Result<Shapes> {
    let mut input = student_input(graph, shapes)?;
    (input[2], input[3]) = (r, r);
    let name = graph.data_input().map(|i| i.name().to_string());
    let overrides: crate::shape::InputShapes = name.into_iter().map(|n| (n, input.clone())).collect();
    crate::shape::infer(graph, &overrides)
}

/// The training size of `epoch` (1-based) of `epochs` when progressive
/// resizing grows it from `from` to `to` px: linear up to epoch 3/4 of the
/// way, rounded down to a multiple of 16 px (never below `from`), then `to`.
fn epoch_size(from: usize, to: usize, epoch: usize, epochs: usize) -> usize {
    let ramp = (epochs * 3).div_ceil(4).max(1);
    if epoch >= ramp || from >= to {
        return to;
    }
    let linear = from + (to - from) * (epoch - 1) / (ramp - 1).max(1);
    (linear / 16 * 16).clamp(from, to)
}

/// The shape of the graph's (first non-weight) input, as the pipeline inferred it.
fn student_input(graph: &Graph, shapes: &Shapes) -> Result<Vec<usize>> {
    graph
        .data_input()
        .and_then(|i| shapes.get(i.name()))
        .and_then(|t| t.shape.clone())
        .filter(|s| s.len() == 4)
        .ok_or_else(|| fail("the student's input has no 4-d shape".to_string()))
}

/// The teacher, compiled by tract for batch 1 with the stage outputs
/// exposed. A batch runs image by image, one image per thread: measured on
/// ResNet-50, tract takes ~55 ms per image that way, against ~200 ms per
/// image at batch 4 or 16 (`cargo bench --bench pipeline -- --train`).
struct Teacher {
    backend: Backend,
    /// The shape of one input image (batch 1).
    input_shape: Vec<usize>,
    batch: usize,
    /// Outputs kept between runs (`teacher_cache`).
    cache: Option<Mutex<Cache>>,
    /// Images the teacher ran on (the others came from `cache`).
    ran: AtomicUsize,
}

/// What computes the teacher's outputs.
enum Backend {
    /// tract, for f32 (its products are faster than ours at batch 1).
    Tract(Runner),
    /// This engine on the folded teacher, for bf16 products: a whole batch
    /// per forward, the outputs read from these values.
    Engine { net: Box<Network>, outputs: Vec<usize> },
}

/// The teacher's cache, the length of each of its outputs (a stored view
/// of other lengths is not used), and why it was given up, if it was.
struct Cache {
    store: TeacherCache,
    lens: Vec<usize>,
    failed: Option<String>,
}

impl Cache {
    /// The stored outputs of view `key`, if they have the teacher's lengths.
    fn get(&mut self, key: &Key) -> Option<Vec<Vec<f32>>> {
        let lens = &self.lens;
        self.store.get(key).filter(|o| o.len() == lens.len() && o.iter().zip(lens).all(|(v, &l)| v.len() == l))
    }

    /// Stores computed views. A failed write gives the cache up rather
    /// than the run: a full disk ends the caching, not hours of training.
    fn add(&mut self, views: impl IntoIterator<Item = (Key, Vec<Vec<f32>>)>) {
        if let Err(e) = self.store.add(views) {
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why += &format!(": {s}");
                source = s.source();
            }
            self.failed = Some(why);
        }
    }
}

impl Teacher {
    /// `input` is the student's input shape: both see the same images.
    fn new(
        model: &Model,
        batch: usize,
        features: Vec<String>,
        input: &[usize],
        cache: Option<&Path>,
        precision: Precision,
    ) -> Result<Teacher> {
        let mut shape = input.to_vec();
        shape[0] = 1;
        let (backend, lens) = match precision {
            Precision::F32 => {
                let runner = Runner::at(model, &shape, &features)?;
                let lens = runner.output_lens();
                (Backend::Tract(runner), lens)
            }
            Precision::Bf16 => {
                let (net, outputs) = engine_teacher(model, &shape, &features)?;
                let lens = Some(outputs.iter().map(|&v| net.value_len(v)).collect());
                (Backend::Engine { net: Box::new(net), outputs }, lens)
            }
        };
        let cache = match (cache, lens) {
            (Some(dir), Some(lens)) => {
                Some(Mutex::new(Cache { store: open_cache(dir, model, &shape, &features, precision)?, lens, failed: None }))
            }
            (Some(_), None) => return Err(fail("`teacher_cache`: the teacher's output shapes are not fixed")),
            (None, _) => None,
        };
        Ok(Teacher { backend, input_shape: shape, batch, cache, ran: AtomicUsize::new(0) })
    }

    /// Images the teacher has run on so far.
    fn ran(&self) -> usize {
        self.ran.load(Ordering::Relaxed)
    }

    /// What the cache did, for the log.
    fn cache_note(&self) -> Option<String> {
        let cache = self.cache.as_ref()?.lock().unwrap_or_else(PoisonError::into_inner);
        let c = &cache.store;
        let cut = if c.cut > 0 { format!("; cut {} bytes of torn or corrupt records", c.cut) } else { String::new() };
        let failed = cache.failed.as_ref().map(|e| format!("; given up, the run went on without it: {e}")).unwrap_or_default();
        Some(format!(
            "teacher cache {}: {} views reused, {} computed by the teacher, {} stored ({} views indexed{cut}){failed}",
            c.path().display(),
            c.hits,
            self.ran(),
            c.added,
            c.len()
        ))
    }

    fn batch(&self) -> usize {
        self.batch
    }

    /// Values per input image.
    fn input_len(&self) -> usize {
        self.input_shape.iter().product()
    }

    /// Per image of a batch, its logits and feature outputs: from the
    /// cache when it has them, else computed (and stored there).
    fn run_each(&self, x: &[f32]) -> Result<Vec<Vec<Vec<f32>>>> {
        let Some(cache) = &self.cache else { return self.compute(x) };
        let lock = || cache.lock().unwrap_or_else(PoisonError::into_inner);
        if lock().failed.is_some() {
            return self.compute(x);
        }
        let images: Vec<&[f32]> = x.chunks(self.input_len().max(1)).collect();
        let keys: Vec<Key> = images.par_iter().map(|xi| teacher_cache::key(xi)).collect();
        let mut found: Vec<Option<Vec<Vec<f32>>>> = {
            let mut c = lock();
            keys.iter().map(|k| c.get(k)).collect()
        };
        let missing = first_of_each(&keys, &found);
        if !missing.is_empty() {
            let sub: Vec<f32> = missing.iter().flat_map(|&s| images[s].iter().copied()).collect();
            let computed = self.compute(&sub)?;
            lock().add(missing.iter().map(|&s| keys[s]).zip(computed.iter().cloned()));
            for (&s, outputs) in missing.iter().zip(computed) {
                found[s] = Some(outputs);
            }
            // Repeats take the outputs of their first occurrence.
            for s in 0..found.len() {
                if found[s].is_none() {
                    found[s] = keys.iter().position(|k| *k == keys[s]).and_then(|first| found[first].clone());
                }
            }
        }
        found.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| fail("teacher cache: a view was left without outputs"))
    }

    /// Per image of a batch, its logits and feature outputs, by tract (an
    /// image per thread) or by this engine (the batch at once).
    fn compute(&self, x: &[f32]) -> Result<Vec<Vec<Vec<f32>>>> {
        let n = self.input_len().max(1);
        let images = x.len() / n;
        self.ran.fetch_add(images, Ordering::Relaxed);
        match &self.backend {
            Backend::Tract(runner) => x
                .par_chunks(n)
                .map(|xi| {
                    let input = ndarray::ArrayD::from_shape_vec(self.input_shape.clone(), xi.to_vec())
                        .map_err(|e| fail(format!("teacher input: {e}")))?;
                    Ok(runner.run(input)?.iter().map(|o| o.iter().copied().collect()).collect())
                })
                .collect(),
            Backend::Engine { net, outputs } => {
                let acts = net.forward_mode(x, images, Mode::Eval)?;
                let values: Vec<_> = outputs.iter().map(|&v| (acts.value(v), net.value_len(v))).collect();
                Ok((0..images).map(|i| values.iter().map(|(all, len)| all[i * len..(i + 1) * len].to_vec()).collect()).collect())
            }
        }
    }

    /// Logits and feature outputs of a batch, each concatenated over the images.
    fn run(&self, x: &[f32]) -> Result<Vec<Vec<f32>>> {
        Ok(concat_outputs(self.run_each(x)?.iter()))
    }
}

/// The slots of the views not `found`, each input once: a batch padded
/// with blank images holds the same input several times.
fn first_of_each<T>(keys: &[Key], found: &[Option<T>]) -> Vec<usize> {
    (0..keys.len()).filter(|&s| found[s].is_none() && keys.iter().position(|k| *k == keys[s]) == Some(s)).collect()
}

/// tract's version, as `Cargo.toml` pins it (a test checks the two agree).
const TRACT_VERSION: &str = "0.23.9";

/// The cache of `model`'s outputs at input `shape` with the extra outputs
/// `features`: a file per teacher and question (see `teacher_cache`). The
/// identity names what can change the bits of an output: the model, the
/// question, tract (its kernels differ by version and by CPU features) and
/// our runner (its code changes only with our version).
fn open_cache(dir: &Path, model: &Model, shape: &[usize], features: &[String], precision: Precision) -> Result<TeacherCache> {
    let onnx = crate::io::to_bytes(model)?;
    let engine = match precision {
        Precision::F32 => format!("cresnet-opt {} / tract {TRACT_VERSION} / {}", env!("CARGO_PKG_VERSION"), cpu()),
        Precision::Bf16 => format!("cresnet-opt {} / engine bf16 / {}", env!("CARGO_PKG_VERSION"), cpu()),
    };
    let (shape, features) = (format!("{shape:?}"), features.join("\n"));
    TeacherCache::open(dir, &[engine.as_bytes(), &onnx, shape.as_bytes(), features.as_bytes()])
}

/// The teacher in this engine at input `shape` (batch 1): BN folded into
/// its convs (the engine trains folded graphs), products in bf16; and the
/// values of its output and of `features`, in that order.
fn engine_teacher(model: &Model, shape: &[usize], features: &[String]) -> Result<(Network, Vec<usize>)> {
    let mut folded = model.clone();
    let fold = crate::passes::PassSpec::Fold(Default::default());
    crate::passes::run_pipeline(&mut folded, &[fold], &Default::default(), |_| {})?;
    let shapes = crate::validate::validate(&folded.graph, &Default::default())?;
    let shapes = shapes_at(&folded.graph, &shapes, shape[2])?;
    let mut net = Network::from_graph(&folded.graph, &shapes).map_err(|e| fail(format!("the bf16 teacher: {e}")))?;
    net.set_precision(Precision::Bf16)?;
    net.pack_weights();
    let mut outputs = vec![net.output()];
    for name in features {
        let (v, _) = net.value_of(name).ok_or_else(|| fail(format!("the bf16 teacher does not compute `{name}` (a feature to match)")))?;
        outputs.push(v);
    }
    Ok((net, outputs))
}

/// The architecture and the CPU features tract picks its kernels by.
fn cpu() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let has = [
            ("fma", is_x86_feature_detected!("fma")),
            ("avx2", is_x86_feature_detected!("avx2")),
            ("avx512f", is_x86_feature_detected!("avx512f")),
            ("avx512vnni", is_x86_feature_detected!("avx512vnni")),
            ("f16c", is_x86_feature_detected!("f16c")),
        ];
        let on: Vec<&str> = has.iter().filter(|(_, on)| *on).map(|(name, _)| *name).collect();
        format!("x86_64 {}", on.join(","))
    }
    #[cfg(not(target_arch = "x86_64"))]
    std::env::consts::ARCH.to_string()
}

/// Per output, its values for each image in turn (`per_image`: per image,
/// its outputs).
fn concat_outputs<'a>(per_image: impl Iterator<Item = &'a Vec<Vec<f32>>> + Clone) -> Vec<Vec<f32>> {
    let count = per_image.clone().next().map_or(0, Vec::len);
    (0..count).map(|k| per_image.clone().flat_map(|o| o[k].iter().copied()).collect()).collect()
}

/// T²-scaled KL divergence of softened logits, averaged over the batch, and
/// its gradient with respect to the student logits.
pub fn kd_loss(student: &[f32], teacher: &[f32], classes: usize, temperature: f32) -> (f64, Vec<f32>) {
    let batch = student.len() / classes.max(1);
    let t = temperature as f64;
    let mut loss = 0.0;
    let mut grad = vec![0.0; student.len()];
    for ((s, tc), g) in student.chunks(classes).zip(teacher.chunks(classes)).zip(grad.chunks_mut(classes)) {
        let (q, p) = (softmax(s, t), softmax(tc, t));
        loss += p.iter().zip(&q).filter(|(p, _)| **p > 0.0).map(|(p, q)| p * (p.ln() - q.max(1e-300).ln())).sum::<f64>();
        for ((g, q), p) in g.iter_mut().zip(&q).zip(&p) {
            *g = (t * (q - p) / batch as f64) as f32;
        }
    }
    (t * t * loss / batch as f64, grad)
}

/// `weight` × mean cross-entropy of the labelled rows (unlabelled rows add
/// nothing), averaged over the whole batch like the KD term, and its gradient.
pub fn label_loss(logits: &[f32], labels: &[Option<usize>], classes: usize, weight: f64) -> (f64, Vec<f32>) {
    let batch = labels.len().max(1) as f64;
    let mut loss = 0.0;
    let mut grad = vec![0.0; logits.len()];
    for ((row, g), label) in logits.chunks(classes).zip(grad.chunks_mut(classes)).zip(labels) {
        let Some(&y) = label.as_ref() else { continue };
        let p = softmax(row, 1.0);
        loss -= p[y].max(1e-300).ln();
        for (c, (g, p)) in g.iter_mut().zip(&p).enumerate() {
            *g = (weight * (p - f64::from(u8::from(c == y))) / batch) as f32;
        }
    }
    (weight * loss / batch, grad)
}

/// What the hold-out says of the student after an epoch.
#[derive(Debug, Clone, Copy, Default)]
struct Score {
    agreement: f64,
    kl: f64,
    /// Top-1 against labels, when the hold-out has labelled images.
    top1: Option<f64>,
    /// Hold-out images scored (0: no hold-out, nothing to show).
    images: usize,
}

impl Score {
    fn better_than(&self, other: &Score) -> bool {
        (self.top1.unwrap_or(0.0), self.agreement, -self.kl) > (other.top1.unwrap_or(0.0), other.agreement, -other.kl)
    }
}

impl std::fmt::Display for Score {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        if self.images == 0 {
            return write!(f, "no hold-out (`holdout: 0`; the last epoch is kept)");
        }
        if let Some(t) = self.top1 {
            write!(f, "hold-out top-1 {t:.3}, ")?;
        }
        write!(f, "hold-out agreement {:.3}, KL {:.4}", self.agreement, self.kl)
    }
}

fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = logits.iter().map(|&v| ((v as f64 - max) / t).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|v| v / sum).collect()
}

fn mean_square(t: &[f32]) -> f64 {
    (t.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / t.len().max(1) as f64).max(1e-12)
}

/// Mean squared error × weight, and its gradient.
fn mse(student: &[f32], teacher: &[f32], weight: f64) -> (f64, Vec<f32>) {
    let n = student.len().max(1) as f64;
    let loss = student.iter().zip(teacher).map(|(s, t)| ((s - t) as f64).powi(2)).sum::<f64>() * weight / n;
    (loss, student.iter().zip(teacher).map(|(s, t)| (2.0 * weight * (s - t) as f64 / n) as f32).collect())
}

/// Blends a share `p` of the `batch` images in `x` each with another image
/// of the batch: x_i ← λ·x_i + (1 − λ)·x_j, λ uniform in [0, 1).
fn mixup(x: &mut [f32], batch: usize, p: f64, seed: u64) {
    if p <= 0.0 || batch < 2 {
        return;
    }
    let len = x.len() / batch;
    let original = x.to_vec();
    let mut rng = Rng::new(seed);
    for (i, xi) in x.chunks_mut(len).enumerate() {
        if (rng.uniform() as f64) >= p {
            continue;
        }
        let j = (i + 1 + rng.below(batch - 1)) % batch;
        let lambda = rng.uniform();
        for (v, o) in xi.iter_mut().zip(&original[j * len..(j + 1) * len]) {
            *v = lambda * *v + (1.0 - lambda) * o;
        }
    }
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) }).0
}

struct Trainer<'a> {
    net: &'a mut Network,
    teacher: &'a Teacher,
    images: &'a ImagePool,
    /// Per image, its class when its source is labelled.
    labels: &'a [Option<usize>],
    o: &'a DistillOptions,
    log: &'a mut Vec<String>,
    progress: &'a dyn Progress,
    features: Vec<Feature>,
    /// Per feature, the adapter's output value.
    adapters: Vec<usize>,
    /// Teacher logits (and pooled features) per (image, view), with `views`.
    cached: std::collections::HashMap<(usize, usize), Vec<Vec<f32>>>,
    /// The teacher's input size when it is not the student's (`teacher_at_model_size`).
    teacher_size: Option<u32>,
    /// The student at another input size (progressive resizing).
    at_size: &'a dyn Fn(usize) -> Result<Network>,
    /// The last student built by `at_size`, with its size.
    smaller: Option<(usize, Network)>,
    /// Whether `smaller` holds the full-size student (during an epoch at a smaller size).
    swapped: bool,
}

impl Trainer<'_> {
    fn run(&mut self, train: &[usize], hold: &[usize]) -> Result<()> {
        let batch = self.teacher.batch();
        let steps_per_epoch = train.len() / batch;
        let total = steps_per_epoch * self.o.epochs;
        let hold_teacher = self.teacher_logits(hold)?;
        // BN and adapters first: a checkpoint then overwrites them.
        if self.o.batchnorm != BatchNormMode::Off {
            self.init_batchnorm(train)?;
        }
        self.init_adapters(train)?;
        let sizes: Vec<usize> = self.net.params.iter().map(|p| p.data.len()).collect();
        let resumed = match &self.o.checkpoint {
            Some(path) => checkpoint::load(path, self.net, self.o.optimizer, self.o.weight_decay as f32)?,
            None => None,
        };
        let mut state = match resumed {
            Some(s) => {
                self.log.push(format!("resumed from checkpoint after epoch {}", s.epoch));
                s
            }
            None => {
                let score = self.holdout(hold, &hold_teacher)?;
                self.note(format!("epoch 0 (before training): {score}"));
                let best_params = self.net.params.iter().map(|p| p.data.clone()).collect();
                State {
                    epoch: 0,
                    best_epoch: 0,
                    best_agreement: score.agreement,
                    best_kl: score.kl,
                    best_top1: score.top1,
                    best_params,
                    optimizer: Optimizer::new(self.o.optimizer, self.o.weight_decay as f32, &sizes),
                    ema: None,
                }
            }
        };
        self.start_ema(&mut state);
        for epoch in state.epoch + 1..=self.o.epochs {
            let started = Instant::now();
            let (loss, [data, teach, student], taught) = self.epoch(epoch, train, &mut state.optimizer, &mut state.ema, total)?;
            let secs = started.elapsed().as_secs_f64();
            // With EMA the averaged weights are the ones scored (and kept);
            // the live ones are back in place before any error returns.
            swap_weights(self.net, &mut state.ema);
            let scored = self.holdout(hold, &hold_teacher);
            let best = Score { agreement: state.best_agreement, kl: state.best_kl, top1: state.best_top1, images: hold.len() };
            // Top-1 against labels first (when the hold-out has labels), then
            // agreement, then KL. Measured: keeping the lowest KL picked a dw
            // rank-1 student with KL 2.36 / agreement 0.397 over its start
            // (2.67 / 0.452), and top-1 fell 0.426 -> 0.310.
            // Without a hold-out there is nothing to choose by: the last epoch stays.
            let kept = scored
                .as_ref()
                .is_ok_and(|s| hold.is_empty() || s.better_than(&best))
                .then(|| self.net.params.iter().map(|p| p.data.clone()).collect::<Vec<_>>());
            swap_weights(self.net, &mut state.ema);
            let score = scored?;
            let of = if state.ema.is_some() { " (EMA weights)" } else { "" };
            self.note(format!(
                "epoch {epoch}/{}: loss {loss:.4}, {score}{of}; {secs:.0} s, {:.1} img/s (data {data:.0} s, teacher {teach:.0} s on {taught} images, student {student:.0} s)",
                self.o.epochs,
                (steps_per_epoch * batch) as f64 / secs
            ));
            if let Some(weights) = kept {
                (state.best_epoch, state.best_agreement, state.best_kl, state.best_top1) = (epoch, score.agreement, score.kl, score.top1);
                state.best_params = weights;
            }
            state.epoch = epoch;
            if let Some(path) = &self.o.checkpoint {
                checkpoint::save(path, self.net, &state)?;
            }
        }
        for (p, best) in self.net.params.iter_mut().zip(state.best_params) {
            p.data = best;
        }
        let best = Score { agreement: state.best_agreement, kl: state.best_kl, top1: state.best_top1, images: hold.len() };
        self.log.push(format!("kept epoch {} ({best}; {} training / {} hold-out images)", state.best_epoch, train.len(), hold.len()));
        Ok(())
    }

    /// Starts the moving average of the weights from the current ones when
    /// `ema` asks for one and a checkpoint brought none (then says so).
    fn start_ema(&mut self, state: &mut State) {
        if self.o.ema == 0.0 {
            state.ema = None;
        } else if state.ema.is_none() {
            if state.epoch > 0 {
                self.log.push(format!("the checkpoint holds no EMA weights: the average starts at epoch {}", state.epoch + 1));
            }
            state.ema = Some(self.net.params.iter().map(|p| p.data.clone()).collect());
        }
    }

    /// BN statistics from up to 8 batches of augmented training images: the
    /// distribution training sees (centre crops differ enough to make the
    /// first training batches of a compressed student diverge).
    fn init_batchnorm(&mut self, train: &[usize]) -> Result<()> {
        let batch = self.teacher.batch();
        let (images, o) = (self.images, self.o);
        let draw = |k: usize, slot: usize, i: usize| images.augmented(i, o.seed ^ 0x5eed ^ ((k * batch + slot) as u64) << 8, o.min_scale);
        let batches =
            train.chunks_exact(batch).take(8).enumerate().map(|(k, chunk)| (images.batch(chunk, |slot, i| draw(k, slot, i)), chunk.len()));
        self.net.init_batchnorm(batches)
    }

    /// One 1x1 adapter per feature, initialized by a ridge fit of the
    /// teacher's feature on the student's over batches of training images
    /// (up to 64 sampled positions per image; at least 2 batches, and up to
    /// 32 until there are twice as many samples as student channels: a
    /// pooled feature gives one sample per image).
    fn init_adapters(&mut self, train: &[usize]) -> Result<()> {
        if self.features.is_empty() {
            return Ok(());
        }
        let batch = self.teacher.batch();
        let mode = if self.o.batchnorm == BatchNormMode::Train { Mode::Train } else { Mode::Eval };
        let mut samples: Vec<(Vec<f32>, Vec<f32>)> = vec![(vec![], vec![]); self.features.len()];
        let per_batch = self.features.iter().map(|f| batch * positions(f)).min().unwrap_or(1).max(1);
        let wanted = self.features.iter().map(|f| 2 * f.student_c).max().unwrap_or(0);
        for chunk in train.chunks_exact(batch).take(wanted.div_ceil(per_batch).clamp(2, 32)) {
            let x = self.images.batch(chunk, |_, i| self.images.centred(i));
            let targets = self.teacher.run(&x)?;
            let acts = self.net.forward_mode(x, batch, mode)?;
            for (k, f) in self.features.iter().enumerate() {
                let v = self.net.value_of(&f.name).ok_or_else(|| fail(format!("stage output `{}` is not computed", f.name)))?.0;
                sample_positions(&acts.value(v), &targets[k + 1], f, batch, &mut samples[k]);
            }
        }
        for (k, f) in self.features.iter().enumerate() {
            let (xs, ys) = &samples[k];
            let n = xs.len() / f.student_c;
            let xa = crate::refit::with_ones(xs, n, f.student_c);
            let ya = faer::Mat::<f64>::from_fn(n, f.teacher_c, |r, c| ys[r * f.teacher_c + c] as f64);
            let sol = crate::refit::Fit { ridge: 1e-2, relu: false }
                .solve(&xa, &ya)
                .ok_or_else(|| fail(format!("cannot fit the adapter of `{}`", f.name)))?;
            let weight = (0..f.teacher_c).flat_map(|o| (0..f.student_c).map(move |i| (o, i))).map(|(o, i)| sol[(i, o)] as f32).collect();
            let bias = (0..f.teacher_c).map(|o| sol[(f.student_c, o)] as f32).collect();
            let fit = crate::refit::residual(&xa, &sol, &ya);
            let v = self.net.value_of(&f.name).map(|v| v.0).unwrap_or_default();
            self.adapters.push(self.net.add_adapter(&f.name, v, f.student_c, f.hw, weight, bias));
            self.log.push(format!(
                "feature `{}`: adapter {} -> {} channels, initial relative error {fit:.3}",
                f.name, f.student_c, f.teacher_c
            ));
        }
        Ok(())
    }

    /// A report line, also printed: a training run is long enough to want a log.
    fn note(&mut self, line: String) {
        self.progress.log("distill", &line);
        self.log.push(line);
    }

    /// One pass over the training images; returns the mean loss, the
    /// seconds spent on data, teacher and student, and how many images the
    /// teacher ran on (fewer than the epoch's when views are cached, in
    /// memory with `views` or on disk with `teacher_cache`).
    fn epoch(
        &mut self,
        epoch: usize,
        train: &[usize],
        opt: &mut Optimizer,
        ema: &mut Option<Vec<Vec<f32>>>,
        total: usize,
    ) -> Result<(f64, [f64; 3], usize)> {
        let batch = self.teacher.batch();
        let mut order = train.to_vec();
        shuffle(&mut order, self.o.seed ^ (epoch as u64) << 32);
        let steps = order.len() / batch;
        self.progress.start(&format!("distill epoch {epoch}"), steps as u64);
        let (mut sum, mut times, ran) = (0.0, [0.0f64; 3], self.teacher.ran());
        let view = self.cacheable().then(|| (epoch - 1) % self.o.views.unwrap_or(1));
        let full = self.images.preprocessing.crop;
        let size = self.resize_for(epoch)?;
        // The teacher labels views at its own size, else at the full training size.
        let teacher_size = self.teacher_size.or((size != full).then_some(full));
        for (k, chunk) in order.chunks_exact(batch).enumerate() {
            let seed = |slot: usize, i: usize| match view {
                Some(v) => view_seed(self.o.seed, i, v),
                None => self.o.seed ^ ((epoch as u64) << 40) ^ ((k * batch + slot) as u64) << 8,
            };
            let t = Instant::now();
            let mut x = self.images.batch(chunk, |slot, i| self.images.augmented_to(i, seed(slot, i), self.o.min_scale, size));
            mixup(&mut x, batch, self.o.mixup, seed(batch, 0));
            // The same views at the teacher's size, when it has another one
            // (only when the teacher is to run: cached logits need none).
            let needed = view.is_none_or(|v| chunk.iter().any(|&i| !self.cached.contains_key(&(i, v))));
            let resized = teacher_size.filter(|_| needed).map(|size| {
                let mut xt = self.images.batch(chunk, |slot, i| self.images.augmented_to(i, seed(slot, i), self.o.min_scale, size));
                mixup(&mut xt, batch, self.o.mixup, seed(batch, 0));
                xt
            });
            let xt = resized.as_deref().unwrap_or(&x);
            times[0] += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let targets = match view {
                Some(v) => self.cached_teacher(xt, chunk, v)?,
                None => self.teacher.run(xt)?,
            };
            times[1] += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let labels: Vec<Option<usize>> = chunk.iter().map(|&i| self.labels[i]).collect();
            let lr = warm_cosine(self.o.lr, (epoch - 1) * steps + k, total, (self.o.warmup * steps as f64).round() as usize);
            sum += self.step(x, &targets, &labels, opt, lr)?;
            if let Some(ema) = ema {
                ema_update(ema, &self.net.params, self.o.ema, opt.step);
            }
            times[2] += t.elapsed().as_secs_f64();
            self.progress.advance(k as u64 + 1, &format!("loss {:.4}", sum / (k + 1) as f64));
        }
        self.progress.finish();
        self.restore_size();
        Ok((sum / steps.max(1) as f64, times, self.teacher.ran() - ran))
    }

    /// With progressive resizing, puts the student at `epoch`'s size in
    /// place of the full-size one (same weights, BN statistics and param
    /// order, so the optimizer's state and the moving average carry over);
    /// returns the size the epoch trains at.
    fn resize_for(&mut self, epoch: usize) -> Result<u32> {
        let full = self.images.preprocessing.crop;
        let (Some(from), Some(to)) = (self.o.resolution_from, self.o.resolution) else { return Ok(full) };
        let size = epoch_size(from, to, epoch, self.o.epochs);
        if size as u32 == full {
            // Sizes only grow: the smaller student (and its buffers, ~1.5 GB
            // for ResNet-50 at 144 px) is not needed again.
            self.smaller = None;
            return Ok(full);
        }
        let mut small = match self.smaller.take() {
            Some((s, net)) if s == size => net,
            _ => (self.at_size)(size)?,
        };
        copy_params(self.net, &mut small, |_| true);
        std::mem::swap(self.net, &mut small);
        small.release_buffers();
        // `smaller` now holds the full-size student until `restore_size`.
        self.smaller = Some((size, small));
        self.swapped = true;
        Ok(size as u32)
    }

    /// Undoes `resize_for`: the full-size student back in place, with the
    /// weights and BN statistics the epoch trained.
    fn restore_size(&mut self) {
        if !self.swapped {
            return;
        }
        let Some((size, mut full)) = self.smaller.take() else { return };
        std::mem::swap(self.net, &mut full);
        full.release_buffers();
        copy_params(&full, self.net, |_| true);
        self.smaller = Some((size, full));
        self.swapped = false;
    }

    /// Whether teacher targets can be kept per view: no image is blended
    /// with another, and the features are pooled ones (a few KB per view;
    /// ResNet-50's stage outputs at 160 px are 3 MB per view, 50 GB for
    /// 6 views of 2,700 photos).
    fn cacheable(&self) -> bool {
        self.o.views.is_some() && self.features.iter().all(|f| f.hw == (1, 1)) && self.o.mixup == 0.0
    }

    /// The teacher's logits and features for a batch of views `v` of
    /// `chunk`'s images (`x`): those seen before from the cache, the others
    /// computed now.
    fn cached_teacher(&mut self, x: &[f32], chunk: &[usize], v: usize) -> Result<Vec<Vec<f32>>> {
        let per_image = x.len() / chunk.len().max(1);
        let missing: Vec<usize> = (0..chunk.len()).filter(|&slot| !self.cached.contains_key(&(chunk[slot], v))).collect();
        if !missing.is_empty() {
            let sub: Vec<f32> = missing.iter().flat_map(|&slot| x[slot * per_image..(slot + 1) * per_image].iter().copied()).collect();
            for (&slot, outputs) in missing.iter().zip(self.teacher.run_each(&sub)?) {
                self.cached.insert((chunk[slot], v), outputs);
            }
        }
        Ok(concat_outputs(chunk.iter().map(|&i| &self.cached[&(i, v)])))
    }

    /// Forward, loss, backward, update; returns the loss.
    fn step(&mut self, x: Vec<f32>, targets: &[Vec<f32>], labels: &[Option<usize>], opt: &mut Optimizer, lr: f32) -> Result<f64> {
        let batch = self.teacher.batch();
        let mode = if self.o.batchnorm == BatchNormMode::Train { Mode::Train } else { Mode::Eval };
        let mut acts = self.net.forward_mode(x, batch, mode)?;
        let out = self.net.output();
        let (mut loss, mut g) = kd_loss(&acts.value(out), &targets[0], self.net.output_len(), self.o.temperature as f32);
        if self.o.label_weight > 0.0 {
            let (l, gl) = label_loss(&acts.value(out), labels, self.net.output_len(), self.o.label_weight);
            loss += l;
            g.iter_mut().zip(gl).for_each(|(a, b)| *a += b);
        }
        let mut seeds = vec![(out, g)];
        for (&v, t) in self.adapters.iter().zip(&targets[1..]) {
            let (l, g) = mse(&acts.value(v), t, self.o.feature_weight / mean_square(t));
            loss += l;
            seeds.push((v, g));
        }
        if !loss.is_finite() {
            return Err(fail("the loss diverged (not finite): lower `lr`"));
        }
        let grads = self.net.backward(&mut acts, seeds);
        opt.update(&mut self.net.params, &grads, lr);
        self.net.update_running_stats(&acts, BN_MOMENTUM);
        Ok(loss)
    }

    /// Teacher logits of the hold-out centre crops (computed once).
    fn teacher_logits(&self, hold: &[usize]) -> Result<Vec<f32>> {
        let batch = self.teacher.batch();
        let mut out = Vec::new();
        let size = self.teacher_size.unwrap_or(self.images.preprocessing.crop);
        for chunk in hold.chunks(batch) {
            let mut x = self.images.batch(chunk, |_, i| self.images.centred_to(i, size));
            x.resize(batch * self.teacher.input_len(), 0.0);
            let logits = self.teacher.run(&x)?.swap_remove(0);
            out.extend_from_slice(&logits[..chunk.len() * self.net.output_len()]);
        }
        Ok(out)
    }

    /// Top-1 agreement and KL (T = 1) of the student with the teacher on
    /// the hold-out images, and top-1 against the labels of the labelled ones.
    fn holdout(&self, hold: &[usize], teacher: &[f32]) -> Result<Score> {
        if hold.is_empty() {
            return Ok(Score::default());
        }
        let (batch, classes) = (self.teacher.batch(), self.net.output_len());
        let (mut agree, mut kl, mut right, mut labelled) = (0usize, 0.0, 0usize, 0usize);
        for (chunk, t) in hold.chunks(batch).zip(teacher.chunks(batch * classes)) {
            let x = self.images.batch(chunk, |_, i| self.images.centred(i));
            let acts = self.net.forward_mode(x, chunk.len(), Mode::Eval)?;
            let s = acts.value(self.net.output());
            agree += s.chunks(classes).zip(t.chunks(classes)).filter(|(a, b)| argmax(a) == argmax(b)).count();
            kl += kd_loss(&s, t, classes, 1.0).0 * chunk.len() as f64;
            for (row, &i) in s.chunks(classes).zip(chunk) {
                if let Some(label) = self.labels[i] {
                    labelled += 1;
                    right += usize::from(argmax(row) == label);
                }
            }
        }
        let n = hold.len() as f64;
        let top1 = (labelled > 0).then(|| right as f64 / labelled as f64);
        Ok(Score { agreement: agree as f64 / n, kl: kl / n, top1, images: hold.len() })
    }
}

/// Positions sampled per image of a feature map to fit its adapter.
fn positions(f: &Feature) -> usize {
    (f.hw.0 * f.hw.1).min(64)
}

/// Appends `positions(f)` seeded positions per image of a student (C_s
/// channels) and teacher (C_t channels) feature map to `out` (row-major
/// sample matrices).
fn sample_positions(student: &[f32], teacher: &[f32], f: &Feature, batch: usize, out: &mut (Vec<f32>, Vec<f32>)) {
    let hw = f.hw.0 * f.hw.1;
    let mut rng = Rng::new(hw as u64);
    for n in 0..batch {
        for _ in 0..positions(f) {
            let p = rng.below(hw);
            out.0.extend((0..f.student_c).map(|c| student[(n * f.student_c + c) * hw + p]));
            out.1.extend((0..f.teacher_c).map(|c| teacher[(n * f.teacher_c + c) * hw + p]));
        }
    }
}

/// Seeded split into training and hold-out image indices; stratified by
/// label when the images are labelled (the unlabelled ones as one more group).
fn split(labels: &[Option<usize>], holdout: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let n = labels.len();
    if labels.iter().all(Option::is_none) {
        let mut all: Vec<usize> = (0..n).collect();
        shuffle(&mut all, seed);
        let hold = ((n as f64 * holdout).round() as usize).min(n.saturating_sub(1));
        let train = all.split_off(hold);
        all.sort_unstable();
        return (train, all);
    }
    let mut groups: std::collections::BTreeMap<Option<usize>, Vec<usize>> = Default::default();
    for (i, l) in labels.iter().enumerate() {
        groups.entry(*l).or_default().push(i);
    }
    // round(n · holdout) in all, spread over the groups by largest remainder
    // (rounding each small group alone could hold out nothing).
    let total = ((n as f64 * holdout).round() as usize).min(n.saturating_sub(1));
    let mut groups: Vec<Vec<usize>> = groups.into_values().collect();
    let exact: Vec<f64> = groups.iter().map(|g| g.len() as f64 * holdout).collect();
    let mut take: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut by_remainder: Vec<usize> = (0..groups.len()).collect();
    by_remainder.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    for &g in &by_remainder {
        if take.iter().sum::<usize>() < total && take[g] < groups[g].len() {
            take[g] += 1;
        }
    }
    let (mut train, mut hold) = (vec![], vec![]);
    for (k, members) in groups.iter_mut().enumerate() {
        shuffle(members, seed ^ (k as u64) << 16);
        hold.extend_from_slice(&members[..take[k]]);
        train.extend_from_slice(&members[take[k]..]);
    }
    shuffle(&mut train, seed);
    hold.sort_unstable();
    (train, hold)
}

/// The augmentation seed of view `v` of image `i`: the same in every epoch
/// that shows that view, whatever the batch it falls in.
fn view_seed(seed: u64, i: usize, v: usize) -> u64 {
    seed ^ 0x7669_6577_0000_0000 ^ ((i as u64) << 16) ^ v as u64
}

fn shuffle(v: &mut [usize], seed: u64) {
    let mut rng = Rng::new(seed);
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::{epoch_size, mixup};

    /// The teacher cache's identity names tract's version: it must be the pinned one.
    #[test]
    fn the_cache_names_the_pinned_tract() {
        let pin = format!("tract-onnx = \"={}\"", super::TRACT_VERSION);
        assert!(include_str!("../../Cargo.toml").contains(&pin), "Cargo.toml does not pin {pin}");
    }

    #[test]
    fn progressive_sizes_grow_in_steps_of_16_px_to_the_full_size_by_three_quarters() {
        let sizes: Vec<usize> = (1..=40).map(|e| epoch_size(96, 160, e, 40)).collect();
        let count = |px: usize| sizes.iter().filter(|&&s| s == px).count();
        assert_eq!([96, 112, 128, 144, 160].map(count), [8, 7, 7, 7, 11], "{sizes:?}");
        assert!(sizes.windows(2).all(|w| w[0] <= w[1]), "{sizes:?}");
        assert_eq!(sizes[29..], [160; 11]);
        // Never below the start, even when it is no multiple of 16; one epoch is a full-size one.
        assert_eq!((1..=4).map(|e| epoch_size(24, 48, e, 4)).collect::<Vec<_>>(), [24, 32, 48, 48]);
        assert_eq!(epoch_size(96, 160, 1, 1), 160);
        assert_eq!(epoch_size(160, 160, 1, 10), 160);
    }

    /// A batch of 4 constant images of values 0, 1, 2, 3 (5 values each).
    fn batch() -> Vec<f32> {
        (0..4).flat_map(|i| [i as f32; 5]).collect()
    }

    #[test]
    fn mixup_blends_each_chosen_image_with_another_one() {
        let mut x = batch();
        mixup(&mut x, 4, 1.0, 7);
        for (i, img) in x.chunks(5).enumerate() {
            // A blend of two constant images is constant, and not image i itself.
            assert!(img.iter().all(|&v| v == img[0]), "{img:?}");
            assert!(img[0] != i as f32 && (0.0..=3.0).contains(&img[0]), "image {i}: {}", img[0]);
        }
        let mut untouched = batch();
        mixup(&mut untouched, 4, 0.0, 7);
        assert_eq!(untouched, batch());
    }
}
