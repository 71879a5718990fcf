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
        self.centred_to(i, self.preprocessing.crop)
    }

    /// Image `i`, centre-cropped as by `centred` and scaled to `size` pixels.
    pub fn centred_to(&self, i: usize, size: u32) -> Vec<f32> {
        let img = &self.images[i];
        let c = self.preprocessing.crop;
        let (x0, y0) = ((img.width() - c) / 2, (img.height() - c) / 2);
        let mut out = imageops::crop_imm(img, x0, y0, c, c).to_image();
        if size != c {
            out = imageops::resize(&out, size, size, FilterType::Triangle);
        }
        self.preprocessing.to_tensor(&out).into_raw_vec_and_offset().0
    }

    /// Image `i`, randomly cropped, scaled and flipped (deterministic in `seed`).
    pub fn augmented(&self, i: usize, seed: u64, min_scale: f64) -> Vec<f32> {
        self.augmented_to(i, seed, min_scale, self.preprocessing.crop)
    }

    /// The view `augmented` draws for `seed` (the same crop and flip),
    /// scaled to `size` pixels instead of the crop size.
    pub fn augmented_to(&self, i: usize, seed: u64, min_scale: f64, size: u32) -> Vec<f32> {
        let img = &self.images[i];
        let mut rng = Rng::new(seed);
        let (w, h) = (img.width() as f64, img.height() as f64);
        let area = w * h * (min_scale + (1.0 - min_scale) * rng.uniform() as f64);
        let ratio = ((0.75f64).ln() + rng.uniform() as f64 * ((4.0f64 / 3.0).ln() - (0.75f64).ln())).exp();
        let cw = ((area * ratio).sqrt().round() as u32).clamp(1, img.width());
        let ch = ((area / ratio).sqrt().round() as u32).clamp(1, img.height());
        let x0 = rng.below((img.width() - cw + 1) as usize) as u32;
        let y0 = rng.below((img.height() - ch + 1) as usize) as u32;
        let mut out = imageops::resize(&imageops::crop_imm(img, x0, y0, cw, ch).to_image(), size, size, FilterType::Triangle);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth 120x90 photo (gradients), so that scaling changes little.
    fn pool() -> ImagePool {
        let img = RgbImage::from_fn(120, 90, |x, y| image::Rgb([(x * 2) as u8, (y * 2) as u8, ((x + y) / 2) as u8]));
        ImagePool::from_images(vec![img], Preprocessing { resize: 46, crop: 40, ..Preprocessing::caffe() })
    }

    fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
    }

    /// Each channel of a [3, 2s, 2s] image averaged over 2x2 blocks.
    fn halve(x: &[f32], s: usize) -> Vec<f32> {
        let at = |c: usize, y: usize, x0: usize| x[(c * 2 * s + y) * 2 * s + x0];
        (0..3)
            .flat_map(|c| (0..s).flat_map(move |y| (0..s).map(move |x| (c, y, x))))
            .map(|(c, y, x)| (at(c, 2 * y, 2 * x) + at(c, 2 * y + 1, 2 * x) + at(c, 2 * y, 2 * x + 1) + at(c, 2 * y + 1, 2 * x + 1)) / 4.0)
            .collect()
    }

    #[test]
    fn a_view_at_another_size_is_the_same_crop_and_flip() {
        let p = pool();
        for seed in 0..8 {
            assert_eq!(p.augmented_to(0, seed, 0.35, 40), p.augmented(0, seed, 0.35));
            let big = p.augmented_to(0, seed, 0.35, 80);
            assert_eq!(big.len(), 3 * 80 * 80);
            // Same region: on a smooth image the halved 80-px view is the
            // 40-px one within ~1 grey level (gradients of 2 levels per pixel).
            let d = mean_abs_diff(&halve(&big, 40), &p.augmented(0, seed, 0.35));
            assert!(d < 1.5, "seed {seed}: {d}");
            // Another view (another seed) is far from it.
            let other = mean_abs_diff(&halve(&big, 40), &p.augmented(0, seed + 100, 0.35));
            assert!(other > 3.0 * d.max(0.5), "seed {seed}: {other} vs {d}");
        }
        assert_eq!(p.centred_to(0, 40), p.centred(0));
        assert!(mean_abs_diff(&halve(&p.centred_to(0, 80), 40), &p.centred(0)) < 1.5);
    }
}
