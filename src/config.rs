//! The pipeline file (YAML): a shipped pipeline's name or a list of passes
//! (each pass's options live in its module under `passes/`), and the
//! calibration images. Unknown keys are rejected with the key named.
//!
//! ```yaml
//! pipeline: cresnet            # optional: a pipeline shipped with the tool
//! passes:                      # optional: ordered; a name, or {name: {options}}
//!   - fold
//!   - prune: { target_macs: 0.5, importance: l1 }
//!   - dw: { rank: 1 }
//! calibration:                 # optional: images for data-aware passes
//!   { data: DIR, classes: FILE, images: 256, preprocess: caffe }
//! calibration_defaults:        # optional: the recipe's own choice of
//!   { images: 512 }            #   `calibration:` keys the file leaves out
//! ```
//!
//! A shipped recipe's `calibration_defaults` apply to the calibration of the
//! file that runs it — a file that names it (or `pipeline: cresnet` on a task
//! model) and lists no `passes:` of its own: a key the user wrote wins, then
//! the user's file's own defaults, then the recipe's, then the built-in ones.
//! A file with its own `passes:` runs them, not the recipe, and gets only its
//! own defaults.
pub use crate::data::{DataSource, Preprocess};
use crate::error::{Error, Result};
use crate::passes::PassSpec;
pub use crate::refit::settings::{Calibration, RefitReference, RefitTarget};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A whole pipeline file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    pub pipeline: Option<String>,
    pub passes: Option<Vec<PassSpec>>,
    pub calibration: Option<Calibration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_defaults: Option<CalibrationDefaults>,
    /// The keys `calibration:` wrote (the others hold defaults); filled by
    /// [`PipelineFile::from_yaml`], which reads them from the text.
    #[serde(skip)]
    calibration_keys: Vec<String>,
}

/// Values for the `calibration:` keys a file leaves out, chosen by a recipe
/// for its own refits (a task recipe fits its layers on more photos than
/// the built-in 256).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationDefaults {
    pub images: Option<usize>,
    pub positions: Option<usize>,
    pub ridge: Option<f64>,
}

impl CalibrationDefaults {
    /// These defaults, with `under`'s where these leave a key unset.
    pub fn over(self, under: CalibrationDefaults) -> CalibrationDefaults {
        CalibrationDefaults {
            images: self.images.or(under.images),
            positions: self.positions.or(under.positions),
            ridge: self.ridge.or(under.ridge),
        }
    }

    /// `cal` with the keys not in `written` taken from these defaults.
    pub fn fill(&self, mut cal: Calibration, written: &[String]) -> Calibration {
        let unset = |key: &str| !written.iter().any(|k| k == key);
        if let Some(v) = self.images.filter(|_| unset("images")) {
            cal.images = v;
        }
        if let Some(v) = self.positions.filter(|_| unset("positions")) {
            cal.positions = v;
        }
        if let Some(v) = self.ridge.filter(|_| unset("ridge")) {
            cal.ridge = v;
        }
        cal
    }
}

/// `section` (`calibration` or `calibration_defaults`) of file `what`.
fn check_calibration(images: usize, positions: usize, ridge: f64, what: &str, section: &str) -> Result<()> {
    if images == 0 || positions == 0 || ridge.is_nan() || ridge < 0.0 {
        return Err(Error::Config(format!("{what}: {section} needs images and positions of at least 1 and a ridge >= 0")));
    }
    Ok(())
}

/// The keys of the `calibration:` mapping in a pipeline file's text.
fn calibration_keys(text: &str) -> Vec<String> {
    let Ok(value) = yaml_serde::from_str::<yaml_serde::Value>(text) else { return Vec::new() };
    let Some(map) = value.get("calibration").and_then(yaml_serde::Value::as_mapping) else { return Vec::new() };
    map.keys().filter_map(|k| k.as_str().map(str::to_string)).collect()
}

impl PipelineFile {
    pub fn from_yaml(text: &str, what: &str) -> Result<PipelineFile> {
        let mut file: PipelineFile = yaml_serde::from_str(text).map_err(|e| Error::Config(format!("{what}: {e}")))?;
        if let Some(c) = &file.calibration {
            check_calibration(c.images, c.positions, c.ridge, what, "calibration")?;
        }
        if let Some(d) = &file.calibration_defaults {
            let (images, positions, ridge) = (d.images.unwrap_or(1), d.positions.unwrap_or(1), d.ridge.unwrap_or(0.0));
            check_calibration(images, positions, ridge, what, "calibration_defaults")?;
        }
        file.calibration_keys = calibration_keys(text);
        for spec in file.passes.iter().flatten() {
            spec.check()
                .map_err(|e| Error::Config(format!("{what}: {}", e.to_string().trim_start_matches("bad pipeline configuration: "))))?;
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
            cal.preprocess.resolve(dir);
        }
        for spec in file.passes.iter_mut().flatten() {
            spec.resolve_paths(dir);
        }
        Ok(file)
    }

    /// The file's calibration, its unwritten keys filled from its own
    /// `calibration_defaults`, then from `recipe`'s (the shipped recipe it runs).
    pub fn calibration_with(&self, recipe: Option<CalibrationDefaults>) -> Option<Calibration> {
        let own = self.calibration_defaults.unwrap_or_default();
        let defaults = own.over(recipe.unwrap_or_default());
        self.calibration.clone().map(|c| defaults.fill(c, &self.calibration_keys))
    }

    /// The shipped pipeline this file runs, when it names one and lists no passes of its own.
    pub fn shipped(&self) -> Option<&str> {
        self.passes.is_none().then_some(self.pipeline.as_deref()).flatten()
    }

    /// The passes to run: the file's own list, else its shipped pipeline's.
    pub fn resolve_passes(&self) -> Result<Vec<PassSpec>> {
        if let Some(passes) = &self.passes {
            return Ok(passes.clone());
        }
        match &self.pipeline {
            Some(name) => Ok(shipped_pipeline(name)?.passes.unwrap_or_default()),
            None => Err(Error::Config("the pipeline file has neither `passes` nor `pipeline`".into())),
        }
    }
}

/// A pipeline shipped in the binary ([`crate::passes::PIPELINES`]), by name.
pub fn shipped_pipeline(name: &str) -> Result<PipelineFile> {
    let pipelines = crate::passes::PIPELINES;
    let (_, _, text) = pipelines.iter().find(|(n, _, _)| *n == name).ok_or_else(|| {
        let names: Vec<&str> = pipelines.iter().map(|(n, _, _)| *n).collect();
        Error::Config(format!("unknown pipeline `{name}` (shipped pipelines: {})", names.join(", ")))
    })?;
    PipelineFile::from_yaml(text, &format!("shipped pipeline `{name}`"))
}

/// A classifier with at most this many outputs is a task model (a handful
/// of the user's classes, not ImageNet's 1000).
pub const TASK_CLASSES: usize = 100;

/// The shipped pipeline that `name` stands for on a classifier with
/// `classes` outputs: `cresnet` on a task model is `cresnet-task` (the
/// ImageNet recipe factorizes a 6-way head to rank 1 and trains on too few
/// photos; see `passes/pipelines/cresnet-task.yaml`).
pub fn pipeline_for(name: &str, classes: Option<usize>) -> &str {
    match classes {
        Some(k) if name == "cresnet" && (1..=TASK_CLASSES).contains(&k) => "cresnet-task",
        _ => name,
    }
}

/// The number of classes of a classifier: the last dimension of its first
/// output, when the output is 2-d [N, K] with K known.
pub fn class_count(graph: &crate::ir::Graph, shapes: &crate::shape::Shapes) -> Option<usize> {
    let out = graph.meta.output.first()?;
    let shape = shapes.get(out.name())?.shape.clone()?;
    (shape.len() == 2).then(|| shape[1])
}
