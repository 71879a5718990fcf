//! Image folders, class lists, label maps and preprocessing.
//!
//! A labelled folder is `DIR/<class id>/<image>`. The class id maps to a
//! model output through a class list (line k = output k, first word = id),
//! never through the folder's position: a validation subset often holds only
//! some of the classes.
pub mod augment;

use crate::error::{Error, Result};
use image::imageops::FilterType;
use ndarray::{Array3, Array4, Axis};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How an image becomes a model input: shorter side to `resize` (bilinear),
/// centre crop `crop`, then per channel `(v·scale − mean) / std` in
/// `channel_order`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    pub resize: u32,
    pub crop: u32,
    /// Mean and std in the output channel order.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub scale: f32,
    pub channel_order: ChannelOrder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

impl Preprocessing {
    /// Keras "caffe": BGR, minus the ImageNet BGR means, no scaling.
    pub fn caffe() -> Self {
        Preprocessing {
            resize: 256,
            crop: 224,
            mean: [103.939, 116.779, 123.68],
            std: [1.0; 3],
            scale: 1.0,
            channel_order: ChannelOrder::Bgr,
        }
    }
    /// torchvision: RGB / 255, ImageNet mean and std.
    pub fn torch() -> Self {
        Preprocessing {
            resize: 256,
            crop: 224,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            scale: 1.0 / 255.0,
            channel_order: ChannelOrder::Rgb,
        }
    }

    pub fn from_choice(choice: &Preprocess) -> Result<Self> {
        match choice {
            Preprocess::Caffe => Ok(Self::caffe()),
            Preprocess::Torch => Ok(Self::torch()),
            Preprocess::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.clone(), source })?;
                let p: Preprocessing = yaml_serde::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
                if p.crop == 0 || p.resize < p.crop || p.std.contains(&0.0) {
                    return Err(Error::Config(format!("{}: need 0 < crop <= resize and non-zero std", path.display())));
                }
                Ok(p)
            }
        }
    }

    /// Loads and preprocesses one image into a [3, crop, crop] array.
    pub fn load(&self, path: &Path) -> Result<Array3<f32>> {
        Ok(self.apply(&decode_rgb(path)?))
    }

    pub fn apply(&self, img: &image::RgbImage) -> Array3<f32> {
        self.to_tensor(&self.centre_crop(img))
    }

    /// The resized image's centre `crop` x `crop` pixels (before [`Self::to_tensor`]).
    pub fn centre_crop(&self, img: &image::RgbImage) -> image::RgbImage {
        let resized = self.resize_short(img);
        let (rw, rh) = resized.dimensions();
        let (x0, y0) = ((rw - self.crop) / 2, (rh - self.crop) / 2);
        image::imageops::crop_imm(&resized, x0, y0, self.crop, self.crop).to_image()
    }

    /// The image scaled (bilinear) so its shorter side is `resize`, and
    /// neither side is below `crop`.
    pub fn resize_short(&self, img: &image::RgbImage) -> image::RgbImage {
        let (w, h) = img.dimensions();
        let short = w.min(h).max(1) as f64;
        let (nw, nh) = ((w as f64 * self.resize as f64 / short).round() as u32, (h as f64 * self.resize as f64 / short).round() as u32);
        if (nw, nh) == (w, h) {
            img.clone()
        } else {
            image::imageops::resize(img, nw.max(self.crop), nh.max(self.crop), FilterType::Triangle)
        }
    }

    /// Channel order, scale, mean and std applied to a `crop`-sized image.
    pub fn to_tensor(&self, img: &image::RgbImage) -> Array3<f32> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut out = Array3::<f32>::zeros((3, h, w));
        for (x, y, px) in img.enumerate_pixels() {
            for ch in 0..3 {
                let src = match self.channel_order {
                    ChannelOrder::Rgb => ch,
                    ChannelOrder::Bgr => 2 - ch,
                };
                out[[ch, y as usize, x as usize]] = (px.0[src] as f32 * self.scale - self.mean[ch]) / self.std[ch];
            }
        }
        out
    }
}

/// Decodes an image file (format guessed from its bytes) into RGB.
pub fn decode_rgb(path: &Path) -> Result<image::RgbImage> {
    Ok(image::ImageReader::open(path)
        .map_err(|source| Error::Read { path: path.to_path_buf(), source })?
        .with_guessed_format()
        .map_err(|source| Error::Read { path: path.to_path_buf(), source })?
        .decode()
        .map_err(|e| Error::Data(format!("cannot decode image {}: {e}", path.display())))?
        .to_rgb8())
}

/// Stacks [C,H,W] images (the first one's shape) into a batch, padding
/// with zeros up to `batch`.
pub fn stack(images: &[Array3<f32>], batch: usize) -> Array4<f32> {
    let (c, h, w) = images.first().map_or((3, 0, 0), |a| a.dim());
    let mut out = Array4::<f32>::zeros((batch.max(images.len()), c, h, w));
    for (mut slot, img) in out.axis_iter_mut(Axis(0)).zip(images) {
        slot.assign(img);
    }
    out
}

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "JPG", "JPEG", "PNG"];

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Read { path: dir.to_path_buf(), source })?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    Ok(paths)
}

/// Every image below `dir` (one level of sub-folders), sorted by path.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in read_dir_sorted(dir)? {
        if p.is_dir() {
            out.extend(read_dir_sorted(&p)?.into_iter().filter(|q| is_image(q)));
        } else if is_image(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err(Error::Data(format!("no images (jpg/png) in {}", dir.display())));
    }
    Ok(out)
}

/// A labelled image: its path and the index of its class.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
}

/// Reads a class list: line k holds the id of output k as its first word.
pub fn read_classes(path: &Path) -> Result<HashMap<String, usize>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    let ids: HashMap<String, usize> =
        text.lines().enumerate().filter_map(|(k, line)| line.split_whitespace().next().map(|id| (id.to_string(), k))).collect();
    if ids.is_empty() {
        return Err(Error::Data(format!("class list {} is empty", path.display())));
    }
    Ok(ids)
}

/// The class folders of `dir`, sorted.
fn class_folders(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::Data(format!("data folder {} does not exist or is not a folder", dir.display())));
    }
    let folders: Vec<PathBuf> = read_dir_sorted(dir)?.into_iter().filter(|p| p.is_dir()).collect();
    if folders.is_empty() {
        return Err(Error::Data(format!("data folder {} has no class sub-folders (expected DIR/<class id>/<image>)", dir.display())));
    }
    Ok(folders)
}

fn folder_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Labelled samples of `dir`, labels given by `index_of` (folder name → label).
fn samples(dir: &Path, index_of: impl Fn(&str) -> Result<usize>) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for folder in class_folders(dir)? {
        let label = index_of(&folder_name(&folder))?;
        out.extend(read_dir_sorted(&folder)?.into_iter().filter(|p| is_image(p)).map(|path| Sample { path, label }));
    }
    if out.is_empty() {
        return Err(Error::Data(format!("no images (jpg/png) in the class folders of {}", dir.display())));
    }
    Ok(out)
}

/// Samples labelled through a class list, or (without one) by sorted folder
/// position, which is only allowed when there is a folder per model output.
pub fn labelled(dir: &Path, classes: Option<&Path>, outputs: usize) -> Result<Vec<Sample>> {
    match classes {
        Some(list) => {
            let ids = read_classes(list)?;
            samples(dir, |name| {
                ids.get(name).copied().ok_or_else(|| {
                    Error::Data(format!("class folder `{name}` of {} is not in the class list {}", dir.display(), list.display()))
                })
            })
        }
        None => {
            let folders = class_folders(dir)?;
            if folders.len() != outputs {
                return Err(Error::Data(format!(
                    "{} has {} class folders but the model has {outputs} outputs: pass --classes FILE to map folder names to outputs",
                    dir.display(),
                    folders.len()
                )));
            }
            let names: Vec<String> = folders.iter().map(|f| folder_name(f)).collect();
            samples(dir, |name| Ok(names.iter().position(|n| n == name).expect("listed folder")))
        }
    }
}

/// A label map (YAML `class: [indices or "a-b" ranges]`): scores a model on a
/// data set with fewer classes than outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMap {
    pub classes: Vec<(String, Vec<usize>)>,
}

impl LabelMap {
    pub fn load(path: &Path, outputs: usize) -> Result<LabelMap> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
        let raw: indexmap::IndexMap<String, Vec<yaml_serde::Value>> =
            yaml_serde::from_str(&text).map_err(|e| Error::Config(format!("label map {}: {e}", path.display())))?;
        let mut classes = Vec::new();
        for (class, items) in raw {
            let mut outs = Vec::new();
            for item in items {
                outs.extend(parse_range(&item).ok_or_else(|| {
                    Error::Config(format!("label map {}: class `{class}`: `{item:?}` is not an index or an `a-b` range", path.display()))
                })?);
            }
            if let Some(bad) = outs.iter().find(|&&o| o >= outputs) {
                return Err(Error::Config(format!(
                    "label map {}: class `{class}` names output {bad}, but the model has {outputs}",
                    path.display()
                )));
            }
            if outs.is_empty() {
                return Err(Error::Config(format!("label map {}: class `{class}` maps to no output", path.display())));
            }
            classes.push((class, outs));
        }
        if classes.is_empty() {
            return Err(Error::Config(format!("label map {} names no class", path.display())));
        }
        Ok(LabelMap { classes })
    }

    /// Samples of `dir`, labelled by the map's class order.
    pub fn samples(&self, dir: &Path) -> Result<Vec<Sample>> {
        samples(dir, |name| {
            self.classes
                .iter()
                .position(|(c, _)| c == name)
                .ok_or_else(|| Error::Data(format!("class folder `{name}` of {} is not in the label map", dir.display())))
        })
    }

    /// Per-class score: the highest logit among the class's outputs.
    pub fn scores(&self, logits: &[f32]) -> Vec<f32> {
        self.classes.iter().map(|(_, outs)| outs.iter().map(|&o| logits[o]).fold(f32::NEG_INFINITY, f32::max)).collect()
    }
}

fn parse_range(v: &yaml_serde::Value) -> Option<Vec<usize>> {
    if let Some(n) = v.as_u64() {
        return Some(vec![n as usize]);
    }
    let (a, b) = v.as_str()?.split_once('-')?;
    let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then(|| (a..=b).collect())
}

/// Preprocessing presets (a YAML file may define its own).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Preprocess {
    Caffe,
    Torch,
    File(PathBuf),
}

impl Preprocess {
    /// A relative preprocessing file is relative to `dir` (the pipeline file's folder).
    pub fn resolve(&mut self, dir: &Path) {
        if let Preprocess::File(p) = self {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }
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

/// An image folder for training: every image below `dir` (sorted by path),
/// or the first `images` of them. With `classes` (a class list, line k =
/// output k) the folder is labelled, `DIR/<class>/<image>`, and the
/// `images` are picked class by class in turn (balanced).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    pub dir: PathBuf,
    pub images: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<PathBuf>,
}

impl DataSource {
    /// The images of `dir` sorted by path, the first `images` of them.
    pub fn paths(&self) -> Result<Vec<PathBuf>> {
        Ok(self.samples()?.into_iter().map(|(p, _)| p).collect())
    }

    /// The images and, for a labelled source, their labels.
    pub fn samples(&self) -> Result<Vec<(PathBuf, Option<usize>)>> {
        let cap = self.images.unwrap_or(usize::MAX);
        match &self.classes {
            None => {
                let mut found = list_images(&self.dir)?;
                found.truncate(cap);
                Ok(found.into_iter().map(|p| (p, None)).collect())
            }
            Some(list) => {
                let mut picked = balanced(labelled(&self.dir, Some(list), 0)?);
                picked.truncate(cap);
                Ok(picked.into_iter().map(|s| (s.path, Some(s.label))).collect())
            }
        }
    }
}

/// The samples class by class in turn (each class in path order): any
/// prefix of the result is as balanced as the classes allow, where "the
/// first N by path" of a class-sorted folder is a few classes only.
pub fn balanced(samples: Vec<Sample>) -> Vec<Sample> {
    let classes = samples.iter().map(|s| s.label + 1).max().unwrap_or(0);
    let mut by_class: Vec<std::collections::VecDeque<Sample>> = vec![Default::default(); classes];
    for s in samples {
        by_class[s.label].push_back(s);
    }
    let mut out = Vec::new();
    while by_class.iter().any(|c| !c.is_empty()) {
        out.extend(by_class.iter_mut().filter_map(|c| c.pop_front()));
    }
    out
}
