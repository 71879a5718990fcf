//! The `calibration:` section of a pipeline file.
use crate::data::{DataSource, Preprocess};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Images for the data-aware passes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    pub data: PathBuf,
    pub classes: Option<PathBuf>,
    #[serde(default = "default_images")]
    pub images: usize,
    #[serde(default = "default_preprocess")]
    pub preprocess: Preprocess,
    /// Output positions sampled per image and layer for the refits.
    #[serde(default = "default_positions")]
    pub positions: usize,
    /// Relative ridge strength λ / (tr(XᵀX)/D).
    #[serde(default = "default_ridge")]
    pub ridge: f64,
    /// What a refit conv reproduces; see [`RefitTarget`].
    #[serde(default)]
    pub target: RefitTarget,
    /// Which model's activations the refits reproduce; see [`RefitReference`].
    #[serde(default)]
    pub reference: RefitReference,
    /// Fit a conv that a ReLU reads on its post-ReLU outputs (negative
    /// targets only need a negative prediction). Measured on ResNet-50 dw
    /// rank 1: top-1 0.519 → 0.585; prune at 70 % MACs: 0.702 / 0.696.
    #[serde(default = "yes")]
    pub through_relu: bool,
    /// More (unlabelled) images for `distill`, beside the calibration images.
    #[serde(default)]
    pub extra: Vec<DataSource>,
    /// How many of the `extra` images (in order) also feed the refits of
    /// `prune`, `dw` and `lowrank` (each costs time; their cached
    /// activations go to disk past `spill_mb`).
    #[serde(default)]
    pub refit_extra: usize,
    /// Past this many MB, the refits' cached activations and targets go to
    /// an unnamed temporary file (in TMPDIR) instead of memory.
    #[serde(default = "default_spill_mb")]
    pub spill_mb: u64,
}

fn yes() -> bool {
    true
}

fn default_positions() -> usize {
    32
}
fn default_ridge() -> f64 {
    // Measured on ResNet-50 pruned to 70 % MACs (inner): 1e-3 with 32
    // positions overfits wide 3x3 refits (top-1 0.005); 1e-2 with 96: 0.099.
    1e-2
}

fn default_spill_mb() -> u64 {
    512
}

fn default_images() -> usize {
    256
}
fn default_preprocess() -> Preprocess {
    Preprocess::Caffe
}

/// What each refit conv is fitted to reproduce.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefitTarget {
    /// Its own original output.
    #[default]
    Layer,
    /// For the last conv into a residual Add: the original Add output minus
    /// the Add's other (drifted) input, so the block output is repaired and
    /// errors do not pile up along the residual stream.
    Block,
}

/// Which model the refits of a lossy pass reproduce.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefitReference {
    /// The model as the previous pass left it: each pass repairs only its
    /// own damage.
    #[default]
    Previous,
    /// The model as it was loaded: each refit also tries to absorb what
    /// earlier lossy passes broke upstream of the layer. A pass falls back
    /// to `previous` when earlier passes changed the shape of a tensor both
    /// models have (pruned channels), since the targets would not line up.
    /// Measured on the 1/5 pipeline (ResNet-50, 1,256 calibration images):
    /// top-1 0.332 against 0.367 with `previous` — the corrections fit the
    /// calibration photos, not ImageNet.
    Original,
}
