//! The pipeline file (YAML) and the pass options it carries. Unknown keys
//! are rejected with the key named; ratios are checked to lie in (0, 1).
//!
//! ```yaml
//! pipeline: cresnet            # optional: a named recipe shipped with the tool
//! passes:                      # optional: ordered; a name, or {name: {options}}
//!   - fold
//!   - prune: { target_macs: 0.5, importance: l1 }
//!   - dw: { rank: 1 }
//! calibration:                 # optional: images for data-aware passes
//!   { data: DIR, classes: FILE, images: 256, preprocess: caffe }
//! ```
use crate::error::{Error, Result};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The passes this build knows, by their pipeline names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PassName {
    Fold,
    Prune,
    Dw,
    Lowrank,
    Distill,
}

pub const PASS_NAMES: &[&str] = &["fold", "prune", "dw", "lowrank", "distill"];

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FoldOptions {}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Importance {
    #[default]
    L1,
    L2,
    /// Data-driven: per layer, drop the input channels whose loss the
    /// refit compensates best (needs calibration; see `src/reconstruct.rs`).
    Reconstruction,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    All,
    Inner,
}

/// How `target_macs`/`target_params` spread the removals over the groups.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    /// Remove the globally least important channels (normalized scores).
    #[default]
    Global,
    /// Remove the same share of every group's channels.
    Uniform,
}

/// Which convs the calibrated recovery of `prune` refits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Refit {
    /// Only the convs that lost input or output channels.
    #[default]
    Changed,
    /// Every conv after the first change too: they see drifted inputs.
    All,
}

/// Options of `prune`; see `passes/prune_channels.rs` for their meaning.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PruneOptions {
    pub ratio: Option<f64>,
    pub target_macs: Option<f64>,
    pub target_params: Option<f64>,
    pub importance: Importance,
    pub allocation: Allocation,
    pub refit: Refit,
    pub scope: Scope,
    pub round_to: usize,
    pub min_channels: usize,
    pub ignore: Vec<String>,
    pub compensate: bool,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions { ratio: None, target_macs: None, target_params: None, importance: Importance::L1, allocation: Allocation::Global, refit: Refit::Changed, scope: Scope::All, round_to: 1, min_channels: 1, ignore: vec![], compensate: true }
    }
}

/// Options of `dw`; see `passes/factorize_depthwise.rs`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DwOptions {
    pub rank: Option<usize>,
    pub energy: Option<f64>,
    pub min_gain: f64,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Only convs whose output is at least / at most this many pixels high.
    pub min_resolution: Option<usize>,
    pub max_resolution: Option<usize>,
    /// Calibrated only: rounds of alternating least squares (depthwise
    /// filters, then pointwise weights) after the first pointwise fit.
    /// Default 2 (ResNet-50 rank 1: top-1 0.423 → 0.519; rank 2 0.809 → 0.821).
    pub alternate: usize,
    /// Calibrated only: `all` also refits every other conv (they see drifted inputs).
    pub refit: Refit,
    /// How a rank r > 1 factorization is written.
    pub layout: DwLayout,
}

/// The ONNX form of a rank-r factorization.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DwLayout {
    /// One depthwise conv with channel multiplier r (group C_in, C_in·r outputs), one pointwise conv.
    Grouped,
    /// r depthwise convs (group C_in, C_in outputs) each with its pointwise slice, summed by Adds.
    /// The default: tract runs these with its depthwise kernels (ResNet-50 rank 2, batch 1,
    /// 1 thread: 76.9 ms split vs 93.0 ms grouped; README).
    #[default]
    Split,
}

impl Default for DwOptions {
    fn default() -> Self {
        DwOptions { rank: None, energy: None, min_gain: 0.1, include: vec![], exclude: vec![], min_resolution: None, max_resolution: None, alternate: 2, refit: Refit::Changed, layout: DwLayout::Split }
    }
}

/// Options of `lowrank`; see `passes/factorize_lowrank.rs`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LowrankOptions {
    pub rank: Option<usize>,
    /// Kept share of each layer's weights (default 0.5 when no other size option is set).
    pub ratio: Option<f64>,
    pub energy: Option<f64>,
    /// Share of the graph's weights kept after the pass: one energy level for all layers, found by bisection.
    pub target_params: Option<f64>,
    pub min_gain: f64,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Only layers whose output is at least / at most this many pixels high
    /// (a Gemm's output counts as 1): budgets per stage, whatever the names.
    pub min_resolution: Option<usize>,
    pub max_resolution: Option<usize>,
    /// Calibrated only: rounds of alternating refits (A with B fixed, then B).
    pub alternate: usize,
    /// Calibrated only: factorize Gemm layers on data too. Off by default:
    /// a classifier's data-aware factorization needs images of all its
    /// classes; on ResNet-50 with the 1,256 calibration images here (1,000
    /// of them photos of few subjects) it scored top-1 0.333 against 0.367
    /// data-free (README "Where to spend the budget").
    pub fit_gemm: bool,
}

impl Default for LowrankOptions {
    fn default() -> Self {
        LowrankOptions { rank: None, ratio: None, energy: None, target_params: None, min_gain: 0.1, include: vec![], exclude: vec![], min_resolution: None, max_resolution: None, alternate: 2, fit_gemm: false }
    }
}

/// An image folder for training: every image below `dir` (sorted by path),
/// or the first `images` of them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    pub dir: PathBuf,
    pub images: Option<usize>,
}

impl DataSource {
    /// The images of `dir` sorted by path, the first `images` of them.
    pub fn paths(&self) -> Result<Vec<PathBuf>> {
        let mut found = crate::imagedata::list_images(&self.dir)?;
        found.truncate(self.images.unwrap_or(usize::MAX));
        Ok(found)
    }
}

/// Options of `distill`; see `passes/distill_model.rs`.
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
    pub optimizer: crate::train::optim::Kind,
    pub weight_decay: f64,
    pub temperature: f64,
    /// Weight of the MSE on stage outputs (0 = logits only).
    pub feature_weight: f64,
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
}

/// How `distill` trains: see `passes/distill_model.rs`.
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
            optimizer: crate::train::optim::Kind::Lamb,
            weight_decay: 0.0,
            temperature: 2.0,
            feature_weight: 0.0,
            holdout: 0.1,
            min_scale: 0.35,
            mixup: 0.0,
            seed: 0,
            threads: None,
            checkpoint: None,
            teacher: None,
            batchnorm: BatchNormMode::default(),
        }
    }
}

/// One step of a pipeline with its options.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum PassSpec {
    Fold(FoldOptions),
    Prune(PruneOptions),
    Dw(DwOptions),
    Lowrank(LowrankOptions),
    Distill(DistillOptions),
}

impl PassSpec {
    pub fn name(&self) -> &'static str {
        match self {
            PassSpec::Fold(_) => "fold",
            PassSpec::Prune(_) => "prune",
            PassSpec::Dw(_) => "dw",
            PassSpec::Lowrank(_) => "lowrank",
            PassSpec::Distill(_) => "distill",
        }
    }

    /// The pass with its default options (the `--passes` shortcut).
    pub fn default_for(name: PassName) -> PassSpec {
        match name {
            PassName::Fold => PassSpec::Fold(FoldOptions::default()),
            PassName::Prune => PassSpec::Prune(PruneOptions::default()),
            PassName::Dw => PassSpec::Dw(DwOptions::default()),
            PassName::Lowrank => PassSpec::Lowrank(LowrankOptions::default()),
            PassName::Distill => PassSpec::Distill(DistillOptions::default()),
        }
    }

    fn from_options<E: de::Error>(name: &str, value: yaml_serde::Value) -> std::result::Result<PassSpec, E> {
        let value = if value.is_null() { yaml_serde::Value::Mapping(Default::default()) } else { value };
        let opts = |e: yaml_serde::Error| E::custom(format!("options of pass `{name}`: {e}"));
        Ok(match parse_name::<E>(name)? {
            PassName::Fold => PassSpec::Fold(yaml_serde::from_value(value).map_err(opts)?),
            PassName::Prune => PassSpec::Prune(yaml_serde::from_value(value).map_err(opts)?),
            PassName::Dw => PassSpec::Dw(yaml_serde::from_value(value).map_err(opts)?),
            PassName::Lowrank => PassSpec::Lowrank(yaml_serde::from_value(value).map_err(opts)?),
            PassName::Distill => PassSpec::Distill(yaml_serde::from_value(value).map_err(opts)?),
        })
    }

    /// The factorizing passes' common checks: a rank of at least 1, a
    /// `min_gain` below 1, a resolution range that can match a layer.
    fn check_factorize(&self, rank: Option<usize>, min_gain: f64, resolution: (Option<usize>, Option<usize>)) -> Result<()> {
        if let (Some(min), Some(max)) = resolution {
            if min > max {
                return Err(Error::Config(format!("`{0}.min_resolution` is {min}, above `{0}.max_resolution` ({max}): no layer can match", self.name())));
            }
        }
        if rank == Some(0) {
            return Err(Error::Config(format!("`{}.rank` must be at least 1", self.name())));
        }
        if !(min_gain < 1.0) {
            return Err(Error::Config(format!("`{}.min_gain` is {min_gain}, but must be below 1 (negative allows growth)", self.name())));
        }
        Ok(())
    }

    /// Checks option values (ranges, mutually exclusive keys).
    pub fn check(&self) -> Result<()> {
        let in_unit = |key: &str, v: Option<f64>| match v {
            Some(x) if !(x > 0.0 && x < 1.0) => Err(Error::Config(format!("`{}.{key}` is {x}, but must lie strictly between 0 and 1", self.name()))),
            _ => Ok(()),
        };
        match self {
            PassSpec::Fold(_) => Ok(()),
            PassSpec::Prune(o) => {
                in_unit("ratio", o.ratio)?;
                in_unit("target_macs", o.target_macs)?;
                in_unit("target_params", o.target_params)?;
                let set = [o.ratio, o.target_macs, o.target_params].iter().filter(|v| v.is_some()).count();
                if set > 1 {
                    return Err(Error::Config("`prune` takes only one of `ratio`, `target_macs`, `target_params`".into()));
                }
                if o.round_to == 0 || o.min_channels == 0 {
                    return Err(Error::Config("`prune.round_to` and `prune.min_channels` must be at least 1".into()));
                }
                Ok(())
            }
            PassSpec::Dw(o) => {
                in_unit("energy", o.energy.filter(|&e| e != 1.0))?;
                if o.rank.is_some() && o.energy.is_some() {
                    return Err(Error::Config("`dw` takes `rank` or `energy`, not both".into()));
                }
                self.check_factorize(o.rank, o.min_gain, (o.min_resolution, o.max_resolution))
            }
            PassSpec::Lowrank(o) => {
                in_unit("energy", o.energy.filter(|&e| e != 1.0))?;
                in_unit("ratio", o.ratio)?;
                in_unit("target_params", o.target_params)?;
                if [o.rank.is_some(), o.ratio.is_some(), o.energy.is_some(), o.target_params.is_some()].iter().filter(|&&b| b).count() > 1 {
                    return Err(Error::Config("`lowrank` takes only one of `rank`, `ratio`, `energy`, `target_params`".into()));
                }
                self.check_factorize(o.rank, o.min_gain, (o.min_resolution, o.max_resolution))
            }
            PassSpec::Distill(o) => {
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
                if !(0.0..=1.0).contains(&o.mixup) {
                    return Err(Error::Config(format!("`distill.mixup` is {}, but must lie in [0, 1]", o.mixup)));
                }
                if !(0.0..1.0).contains(&o.holdout) {
                    return Err(Error::Config(format!("`distill.holdout` is {}, but must lie in [0, 1)", o.holdout)));
                }
                in_unit("min_scale", Some(o.min_scale).filter(|&m| m != 1.0))
            }
        }
    }
}


fn parse_name<E: de::Error>(name: &str) -> std::result::Result<PassName, E> {
    match name {
        "fold" => Ok(PassName::Fold),
        "prune" => Ok(PassName::Prune),
        "dw" => Ok(PassName::Dw),
        "lowrank" => Ok(PassName::Lowrank),
        "distill" => Ok(PassName::Distill),
        other => Err(E::custom(format!("unknown pass `{other}` (valid passes: {})", PASS_NAMES.join(", ")))),
    }
}

impl<'de> Deserialize<'de> for PassSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct SpecVisitor;
        impl<'de> Visitor<'de> for SpecVisitor {
            type Value = PassSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a pass name or a one-key map {{name: {{options}}}}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<PassSpec, E> {
                PassSpec::from_options(v, yaml_serde::Value::Null)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<PassSpec, A::Error> {
                let (name, value): (String, yaml_serde::Value) = map.next_entry()?.ok_or_else(|| de::Error::custom("empty pass entry"))?;
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom(format!("pass entry `{name}` has more than one key; write each pass as its own list item")));
                }
                PassSpec::from_options(&name, value)
            }
        }
        d.deserialize_any(SpecVisitor)
    }
}

/// Preprocessing presets (a YAML file may define its own).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Preprocess {
    Caffe,
    Torch,
    File(PathBuf),
}

impl std::str::FromStr for Preprocess {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "caffe" => Preprocess::Caffe,
            "torch" => Preprocess::Torch,
            f if f.ends_with(".yaml") || f.ends_with(".yml") => Preprocess::File(PathBuf::from(f)),
            other => return Err(format!("unknown preprocessing `{other}` (use caffe, torch or a .yaml file)")),
        })
    }
}

impl<'de> Deserialize<'de> for Preprocess {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

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
    /// `prune` and `dw`. Each costs memory: every refit image's activations
    /// at a block boundary are cached (up to 3.2 MB per image for ResNet-50).
    #[serde(default)]
    pub refit_extra: usize,
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
    /// Measured on the 1/5 recipe (ResNet-50, 1,256 calibration images):
    /// top-1 0.332 against 0.367 with `previous` — the corrections fit the
    /// calibration photos, not ImageNet.
    Original,
}

/// A whole pipeline file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    pub pipeline: Option<String>,
    pub passes: Option<Vec<PassSpec>>,
    pub calibration: Option<Calibration>,
}

/// Recipes shipped in the binary: (name, one-line summary, YAML).
pub const RECIPES: &[(&str, &str, &str)] = &[
    ("fold", "fold BatchNormalization into convs: lossless, tract-friendly", include_str!("../passes/fold.yaml")),
    ("cresnet", "CResNet (Luo et al. 2021) at 1/5 of the weights: fold, low-rank 1x1 convs and classifier, depthwise (rank 2 early, 1 late), distillation (trains only given calibration images)", include_str!("../passes/cresnet.yaml")),
];

impl PipelineFile {
    pub fn from_yaml(text: &str, what: &str) -> Result<PipelineFile> {
        let file: PipelineFile = yaml_serde::from_str(text).map_err(|e| Error::Config(format!("{what}: {e}")))?;
        if let Some(c) = &file.calibration {
            if c.images == 0 || c.positions == 0 || !(c.ridge >= 0.0) {
                return Err(Error::Config(format!("{what}: calibration needs images and positions of at least 1 and a ridge >= 0")));
            }
        }
        for spec in file.passes.iter().flatten() {
            spec.check().map_err(|e| Error::Config(format!("{what}: {}", e.to_string().trim_start_matches("bad pipeline configuration: "))))?;
        }
        Ok(file)
    }

    pub fn load(path: &Path) -> Result<PipelineFile> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
        let mut file = Self::from_yaml(&text, &path.display().to_string())?;
        // Relative data paths are relative to the pipeline file.
        let Some(dir) = path.parent() else { return Ok(file) };
        if let Some(cal) = file.calibration.as_mut() {
            cal.data = dir.join(&cal.data);
            cal.classes = cal.classes.as_ref().map(|c| dir.join(c));
            cal.extra.iter_mut().for_each(|d| d.dir = dir.join(&d.dir));
        }
        for spec in file.passes.iter_mut().flatten() {
            if let PassSpec::Distill(o) = spec {
                o.data.iter_mut().for_each(|d| d.dir = dir.join(&d.dir));
                o.checkpoint = o.checkpoint.as_ref().map(|c| dir.join(c));
                o.teacher = o.teacher.as_ref().map(|c| dir.join(c));
            }
        }
        Ok(file)
    }

    /// The passes to run: the file's own list, else its named recipe's.
    pub fn resolve_passes(&self) -> Result<Vec<PassSpec>> {
        if let Some(passes) = &self.passes {
            return Ok(passes.clone());
        }
        match &self.pipeline {
            Some(name) => Ok(recipe(name)?.passes.unwrap_or_default()),
            None => Err(Error::Config("the pipeline file has neither `passes` nor `pipeline`".into())),
        }
    }
}

/// A shipped recipe by name.
pub fn recipe(name: &str) -> Result<PipelineFile> {
    let (_, _, text) = RECIPES.iter().find(|(n, _, _)| *n == name).ok_or_else(|| {
        let names: Vec<&str> = RECIPES.iter().map(|(n, _, _)| *n).collect();
        Error::Config(format!("unknown pipeline `{name}` (shipped pipelines: {})", names.join(", ")))
    })?;
    PipelineFile::from_yaml(text, &format!("shipped pipeline `{name}`"))
}
