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
//! ```
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
}

impl PipelineFile {
    pub fn from_yaml(text: &str, what: &str) -> Result<PipelineFile> {
        let file: PipelineFile = yaml_serde::from_str(text).map_err(|e| Error::Config(format!("{what}: {e}")))?;
        if let Some(c) = &file.calibration {
            if c.images == 0 || c.positions == 0 || c.ridge.is_nan() || c.ridge < 0.0 {
                return Err(Error::Config(format!("{what}: calibration needs images and positions of at least 1 and a ridge >= 0")));
            }
        }
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
