//! Training images: decoded once (shorter side scaled to the preprocessing's
//! `resize`) and kept in memory; each draw is a seeded random resized crop
//! (area share in [min_scale, 1], aspect ratio in [3/4, 4/3]) with a random
//! horizontal flip, so a few thousand images give many distinct inputs.
use crate::data::Preprocessing;
use crate::error::Result;
use crate::rng::Rng;
use image::imageops::{self, FilterType};
use image::RgbImage;
use rayon::prelude::*;
use std::path::PathBuf;

pub struct ImagePool {
    images: Vec<RgbImage>,
    pub preprocessing: Preprocessing,
}

impl ImagePool {
    /// Decodes `paths` (in parallel); an unreadable image is an error naming it.
    pub fn load(paths: &[PathBuf], preprocessing: Preprocessing) -> Result<ImagePool> {
        let images = paths.par_iter().map(|p| Ok(preprocessing.resize_short(&crate::data::decode_rgb(p)?))).collect::<Result<Vec<_>>>()?;
        Ok(ImagePool { images, preprocessing })
    }

    /// A pool of in-memory images (tests).
    pub fn from_images(images: Vec<RgbImage>, preprocessing: Preprocessing) -> ImagePool {
        let images = images.iter().map(|i| preprocessing.resize_short(i)).collect();
        ImagePool { images, preprocessing }
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Image `i`, centre-cropped (for evaluation).
    pub fn centred(&self, i: usize) -> Vec<f32> {
        let img = &self.images[i];
        let c = self.preprocessing.crop;
        let (x0, y0) = ((img.width() - c) / 2, (img.height() - c) / 2);
        self.preprocessing.to_tensor(&imageops::crop_imm(img, x0, y0, c, c).to_image()).into_raw_vec_and_offset().0
    }

    /// Image `i`, randomly cropped, scaled and flipped (deterministic in `seed`).
    pub fn augmented(&self, i: usize, seed: u64, min_scale: f64) -> Vec<f32> {
        let img = &self.images[i];
        let mut rng = Rng::new(seed);
        let (w, h) = (img.width() as f64, img.height() as f64);
        let area = w * h * (min_scale + (1.0 - min_scale) * rng.uniform() as f64);
        let ratio = ((0.75f64).ln() + rng.uniform() as f64 * ((4.0f64 / 3.0).ln() - (0.75f64).ln())).exp();
        let cw = ((area * ratio).sqrt().round() as u32).clamp(1, img.width());
        let ch = ((area / ratio).sqrt().round() as u32).clamp(1, img.height());
        let x0 = rng.below((img.width() - cw + 1) as usize) as u32;
        let y0 = rng.below((img.height() - ch + 1) as usize) as u32;
        let c = self.preprocessing.crop;
        let mut out = imageops::resize(&imageops::crop_imm(img, x0, y0, cw, ch).to_image(), c, c, FilterType::Triangle);
        if rng.uniform() < 0.5 {
            imageops::flip_horizontal_in_place(&mut out);
        }
        self.preprocessing.to_tensor(&out).into_raw_vec_and_offset().0
    }

    /// A batch (concatenated NCHW) built in parallel by `draw`.
    pub fn batch(&self, indices: &[usize], draw: impl Fn(usize, usize) -> Vec<f32> + Sync) -> Vec<f32> {
        indices.par_iter().enumerate().map(|(slot, &i)| draw(slot, i)).collect::<Vec<_>>().concat()
    }
}
