//! Calibrated recovery: refits reduce the error the data-free passes leave.
mod common;
use common::*;
use cresnet_opt::config::{DwOptions, PassSpec, PruneOptions};
use cresnet_opt::fixture::{resnet50, FixtureSpec, Rng};
use cresnet_opt::ir::Model;
use cresnet_opt::recover::Calibration;
use ndarray::Array3;

fn images(count: usize, seed: u64) -> Vec<Array3<f32>> {
    let mut rng = Rng::new(seed);
    // Smooth random images: low-frequency structure like photos, not white noise.
    (0..count)
        .map(|_| {
            let (a, b, c) = (rng.uniform() * 0.3, rng.uniform() * 0.3, rng.uniform() * 6.0);
            Array3::from_shape_fn((3, 64, 64), |(ch, y, x)| 60.0 * ((a * x as f32 + b * y as f32 + c + ch as f32).sin()) + 10.0 * rng.normal())
        })
        .collect()
}

fn error_on_fresh_images(original: &Model, compressed: &Model) -> f64 {
    let held_out = images(6, 999);
    let batch = cresnet_opt::imagedata::stack(&held_out, 6).into_dyn();
    rel_diff(&run(original, &batch), &run(compressed, &batch))
}

fn compress(original: &Model, passes: &[PassSpec], calib: Option<&Calibration>) -> Model {
    let mut m = original.clone();
    cresnet_opt::passes::run_pipeline_calibrated(&mut m, passes, &Default::default(), calib, |_| {}).unwrap();
    m
}

fn fixture() -> Model {
    resnet50(&FixtureSpec { width_div: 8, input_size: 64, classes: 10, ..Default::default() }).unwrap()
}

#[test]
fn calibrated_dw_is_closer_to_the_original_than_data_free() {
    let original = fixture();
    let calib = Calibration::from_images(images(24, 1), 24, 1e-3);
    let passes = [fold(), PassSpec::Dw(DwOptions { rank: Some(1), ..Default::default() })];
    let free = error_on_fresh_images(&original, &compress(&original, &passes, None));
    let cal = error_on_fresh_images(&original, &compress(&original, &passes, Some(&calib)));
    assert!(cal < 0.7 * free, "calibrated {cal} vs data-free {free}");
}

#[test]
fn calibrated_prune_is_closer_to_the_original_than_data_free() {
    let original = fixture();
    let calib = Calibration::from_images(images(24, 2), 24, 1e-3);
    let passes = [fold(), prune(PruneOptions { target_macs: Some(0.7), ..Default::default() })];
    let free = error_on_fresh_images(&original, &compress(&original, &passes, None));
    let cal = error_on_fresh_images(&original, &compress(&original, &passes, Some(&calib)));
    assert!(cal < 0.7 * free, "calibrated {cal} vs data-free {free}");
}

#[test]
fn refit_reports_every_factorized_layer_with_a_smaller_error() {
    let original = fixture();
    let calib = Calibration::from_images(images(8, 3), 16, 1e-3);
    let mut m = original.clone();
    let r = cresnet_opt::passes::run_pipeline_calibrated(&mut m, &[fold(), PassSpec::Dw(DwOptions { rank: Some(2), ..Default::default() })], &Default::default(), Some(&calib), |_| {}).unwrap();
    let refits: Vec<_> = r[1].changed.iter().filter(|c| c.what.starts_with("factorized on data")).collect();
    assert_eq!(refits.len(), 16);
    for c in refits {
        let nums: Vec<f64> = c.what.trim_start_matches("factorized on data: relative error ").split(" -> ").map(|v| v.parse().unwrap()).collect();
        assert!(nums[1] <= nums[0], "{}: {}", c.node, c.what);
    }
}
