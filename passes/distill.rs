//! Pass `distill`: trains the student (the graph as the earlier passes left
//! it) to reproduce the teacher (the model as it was loaded), by knowledge
//! distillation (Hinton et al. 2015). No labels needed; with labelled
//! images (`data: [{dir, classes}]`) and `label_weight: w` the loss adds
//! w × the cross-entropy on the labels, the hold-out is stratified by
//! class, and the epoch kept is the one with the best hold-out top-1
//! against the labels (then agreement, then KL). `resolution: r` trains
//! (and scores the hold-out) on r×r crops; the student keeps its input size.
//! With `teacher_at_model_size` the teacher labels the same views scaled to
//! the model's own size (where it is more accurate); with `batchnorm: train`
//! the BN statistics are re-estimated at the model's size after training
//! (`recalibrate`: FixRes, Touvron et al. 2019), kept unless the hold-out,
//! scored at that size, gets worse. `resolution_from: s` (with
//! `resolution: r`) is progressive resizing (fast.ai's, FFCV's): epoch 1
//! trains at s px, the size grows linearly to r by 3/4 of the epochs, in
//! steps of 16 px, then stays at r; a smaller epoch costs about (size/r)²
//! of a full one, so the same hour buys more epochs. The teacher labels
//! each view (crop and flip) at r whatever size the student sees it at,
//! so cached views serve every size; the hold-out is scored at r.
//!
//! Before: a compressed graph of Conv (any group) / Relu / Add / MaxPool /
//!         GlobalAveragePool / Flatten / Gemm, BN folded.
//! After:  the same graph and shapes with trained weights and biases.
//!
//! Applies to the whole graph or not at all: an op outside the engine's set
//! (`crate::train`) is an error naming the node, and the graph is untouched.
//!
//! Loss per batch of student logits s and teacher logits t, temperature T:
//!   L = T²·mean_batch KL(softmax(t/T) ‖ softmax(s/T))
//!     + feature_weight · Σ_k mean((s_k − t_k)²)
//! where k runs over the stage outputs (the last residual block output at
//! each resolution) whose shapes agree in student and teacher, or with
//! `features: pooled` over the one globally pooled feature vector the
//! classifier reads (the last GlobalAveragePool's output); s_k goes
//! through a training-only 1x1 adapter (C_s → C_t channels, ridge-fitted
//! first, left out of the output) and the mean is relative to mean(t_k²).
//! ∂L/∂s = T·(softmax(s/T) − softmax(t/T)) / batch. Why pooled: a 6-class
//! teacher's logits are 6 numbers per view, its pooled features 2,048 —
//! the signal its linear head was fitted on — and unlike stage outputs (3
//! MB per view at 160 px) they are cached per view with `views`.
//!
//! Conditioning: a BN-folded, heavily compressed student is very sharp
//! (gradient norm ~1e4 at loss ~13). Measured on the 1/5 ResNet-50 student
//! (README): Adam diverges even at lr 1e-5, SGD at 1e-3; LAMB (per-tensor
//! trust ratio) is stable up to lr 1e-3, hence the default optimizer. The
//! default lr 1e-4 is the one that improved a rank-1 dw student (1e-3 made it
//! worse first); the 1/5 pipeline uses 1e-3. `batchnorm: train`
//! re-inserts a training-mode BN after every conv (folded back at the end);
//! `frozen` a BN on fixed statistics.
//!
//! Data: random resized crops + flips of the training images (`data`, else
//! the calibration images), and with `mixup: p` a share p of them blended
//! with another image of the batch; the teacher (tract, or this engine with
//! `precision: bf16`) sees the same augmented batch. Schedule: cosine from `lr` to 0 over all steps (after
//! `warmup` epochs of linear warm-up, when given); LAMB, Adam with
//! decoupled weight decay, or SGD with momentum 0.9. A seeded share
//! (`holdout`) of the images is never trained on: after every epoch the
//! student's top-1 agreement with the teacher and KL (T = 1) on their centre
//! crops are measured and the epoch with the highest agreement (then lowest
//! KL) is kept (epoch 0 = the student before training). With `ema: d` an
//! exponential moving average of the weights (decay min(d, (1+t)/(10+t))
//! at step t) is updated after every step; the hold-out scores the average,
//! and the epoch kept is the average at that epoch (Polyak averaging: the
//! noise of small batches averaged out).
//!
//! Teacher outputs: with `views: k` they are kept in memory per (image,
//! view) and the teacher runs in the first k epochs only; with
//! `teacher_cache: DIR` they are also kept on disk, keyed by the SHA-256
//! of the input tensor (`src/train/teacher_cache.rs`), so a later run on
//! the same teacher, photos and seed (another student, lr) reuses them and
//! writes the same bytes as a run without the cache. Stage features (MBs
//! per view) with a cache are refused at validation.
//!
//! Precision: with `precision: bf16` every matrix product (convs, fully
//! connected layers) of the student's training and of the teacher takes
//! bf16 operands and sums in f32 (`src/train/kernels/bf16.rs`; AVX512-BF16,
//! twice the f32 FMA rate: refused at validation on a CPU without it).
//! Weights, gradients, optimizer state, BN, losses stay f32. The teacher
//! then runs in this engine (BN folded, a batch per forward) instead of
//! tract. Its outputs differ from f32's by ~2^-8 relative (the shared
//! ResNet-50's top-1 on the 744 evaluation photos: README); the same seed
//! still gives the same bytes on the same CPU.
//!
//! The engine is `src/train/distill.rs`; this pass picks the teacher and
//! the images and reports what training did.
use super::{Pass, PassContext, PassReport};
use crate::error::{Error, Result};
use crate::ir::Model;
use crate::train::distill::{distill, DefaultImages};
pub use crate::train::distill::{BatchNormMode, DistillOptions, FeatureSet};
use std::path::Path;

/// The `distill` pass.
pub struct Distill;

impl Pass for Distill {
    const NAME: &'static str = "distill";
    type Options = DistillOptions;

    fn validate(o: &DistillOptions) -> Result<()> {
        let positive = [("lr", o.lr), ("temperature", o.temperature)];
        if let Some((key, v)) = positive.iter().find(|(_, v)| !(*v > 0.0 && v.is_finite())) {
            return Err(Error::Config(format!("`distill.{key}` is {v}, but must be positive")));
        }
        if o.epochs == 0 || o.batch == 0 || o.threads == Some(0) {
            return Err(Error::Config("`distill.epochs`, `distill.batch` and `distill.threads` must be at least 1".into()));
        }
        if !(o.weight_decay >= 0.0 && o.feature_weight >= 0.0) {
            return Err(Error::Config("`distill.weight_decay` and `distill.feature_weight` must be >= 0".into()));
        }
        if !(0.0..1.0).contains(&o.ema) {
            return Err(Error::Config(format!("`distill.ema` is {}, but must lie in [0, 1) (0: off)", o.ema)));
        }
        if !(0.0..=1.0).contains(&o.mixup) {
            return Err(Error::Config(format!("`distill.mixup` is {}, but must lie in [0, 1]", o.mixup)));
        }
        if !(o.label_weight >= 0.0 && o.label_weight.is_finite()) {
            return Err(Error::Config(format!("`distill.label_weight` is {}, but must be >= 0", o.label_weight)));
        }
        if o.label_weight > 0.0 && o.mixup > 0.0 {
            return Err(Error::Config("`distill.label_weight` and `distill.mixup` do not combine (a blend has no one label)".into()));
        }
        if !(o.warmup >= 0.0 && o.warmup <= o.epochs as f64) {
            return Err(Error::Config(format!("`distill.warmup` is {} epochs, but must lie in [0, epochs]", o.warmup)));
        }
        if o.features != FeatureSet::default() && o.feature_weight == 0.0 {
            return Err(Error::Config("`distill.features` names what `distill.feature_weight` weighs: give that a weight > 0".into()));
        }
        if o.teacher_cache.is_some() && o.feature_weight > 0.0 && o.features == FeatureSet::Stages {
            return Err(Error::Config(
                "`distill.teacher_cache` keeps logits and pooled features, not stage outputs (MBs per view): use `features: pooled`".into(),
            ));
        }
        if o.precision == crate::train::kernels::Precision::Bf16 && !crate::train::kernels::bf16_available() {
            return Err(Error::Config(
                "`distill.precision: bf16` needs a CPU with AVX512-BF16 (and AVX-512 F, BW); this one has not: use `f32`".into(),
            ));
        }
        if o.views == Some(0) {
            return Err(Error::Config("`distill.views` must be at least 1".into()));
        }
        if o.resolution.is_some_and(|r| r < 8) {
            return Err(Error::Config("`distill.resolution` must be at least 8 pixels".into()));
        }
        if let Some(from) = o.resolution_from {
            let Some(to) = o.resolution else {
                return Err(Error::Config("`distill.resolution_from` needs `distill.resolution` (the size it grows to)".into()));
            };
            if !(8..=to).contains(&from) {
                return Err(Error::Config(format!("`distill.resolution_from` is {from}, but must lie in [8, resolution = {to}]")));
            }
            if o.feature_weight > 0.0 {
                return Err(Error::Config(
                    "`distill.resolution_from` and `distill.feature_weight` do not combine (stage outputs change size)".into(),
                ));
            }
        }
        if !(0.0..1.0).contains(&o.holdout) {
            return Err(Error::Config(format!("`distill.holdout` is {}, but must lie in [0, 1)", o.holdout)));
        }
        super::check_unit("distill", "min_scale", Some(o.min_scale).filter(|&m| m != 1.0))
    }

    fn resolve_paths(o: &mut DistillOptions, dir: &Path) {
        o.data.iter_mut().for_each(|d| {
            d.dir = dir.join(&d.dir);
            d.classes = d.classes.as_ref().map(|c| dir.join(c));
        });
        o.checkpoint = o.checkpoint.as_ref().map(|c| dir.join(c));
        if let Some(p) = o.preprocess.as_mut() {
            p.resolve(dir);
        }
        o.teacher = o.teacher.as_ref().map(|c| dir.join(c));
        o.teacher_cache = o.teacher_cache.as_ref().map(|c| dir.join(c));
    }

    /// The default teacher is the model as loaded.
    fn needs_original(o: &DistillOptions) -> bool {
        o.teacher.is_none()
    }

    fn run(model: &mut Model, ctx: &PassContext, o: &DistillOptions) -> Result<PassReport> {
        let mut report = PassReport::default();
        // A shipped pipeline must also run data-free (`--pipeline cresnet` with
        // no `calibration:`): with no images at all the student stays as it is.
        if o.data.is_empty() && ctx.calibration.is_none() {
            report.decline("(graph)", NO_IMAGES);
            return Ok(report);
        }
        let loaded = o.teacher.as_ref().map(|p| crate::io::load(p)).transpose()?;
        let teacher = loaded
            .as_ref()
            .or(ctx.original)
            .ok_or_else(|| Error::Pass { pass: "distill".into(), reason: "the pipeline kept no teacher model".into() })?;
        let defaults =
            ctx.calibration.map(|c| DefaultImages { sources: &c.sources, preprocessing: &c.preprocessing, labelled: c.labelled.as_ref() });
        for line in distill(&mut model.graph, ctx.shapes, teacher, defaults, o, ctx.progress)? {
            report.change("student", line);
        }
        Ok(report)
    }
}

const NO_IMAGES: &str =
    "no training images, the student is left untrained: give a `calibration:` folder or `distill: {data: [{dir: DIR}]}`";
