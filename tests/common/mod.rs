#![allow(dead_code)]
use cresnet_opt::fixture::Rng;
use cresnet_opt::ir::Model;
use cresnet_opt::passes::dw::DwOptions;
use cresnet_opt::passes::fold::FoldOptions;
use cresnet_opt::passes::prune::PruneOptions;
use cresnet_opt::passes::PassSpec;
use cresnet_opt::runner::Runner;
use ndarray::ArrayD;
use std::path::PathBuf;

pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

pub fn shared_model() -> PathBuf {
    shared().join("models/resnet50-imagenet.onnx")
}

pub fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/resnet50-w8.onnx")
}

/// A seeded input for the model's first input (batch `batch`).
pub fn random_input(model: &Model, batch: usize, scale: f32, seed: u64) -> ArrayD<f32> {
    let mut shape = cresnet_opt::runner::model_input_shape(model).expect("input shape");
    shape[0] = batch;
    let mut rng = Rng::new(seed);
    ArrayD::from_shape_simple_fn(shape, || (rng.uniform() * 2.0 - 1.0) * scale)
}

/// Runs `model` with tract on `input`, returns the first output.
pub fn run(model: &Model, input: &ArrayD<f32>) -> ArrayD<f32> {
    let runner = Runner::new(model, input.shape()[0], &[]).expect("tract compiles the model");
    runner.run(input.clone()).expect("tract runs the model").remove(0)
}

/// The training engine's forward (evaluation as built from the graph) against
/// tract's on a seeded input: max |a − b| / max |a|.
pub fn engine_vs_tract(model: &Model, batch: usize, scale: f32, seed: u64) -> f64 {
    let shapes = cresnet_opt::validate::validate(&model.graph, &Default::default()).expect("valid");
    let net = cresnet_opt::train::Network::from_graph(&model.graph, &shapes).expect("the engine supports the graph");
    let x = random_input(model, batch, scale, seed);
    let expected = run(model, &x);
    let acts = net.forward(x.as_slice().unwrap().to_vec(), batch).expect("forward");
    let got = ArrayD::from_shape_vec(expected.shape(), acts.value(net.output()).to_vec()).unwrap();
    rel_diff(&expected, &got)
}

/// max |a − b| / max |a|.
pub fn rel_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    cresnet_opt::evaluate::rel_diff(a.as_slice().unwrap(), b.as_slice().unwrap())
}

pub fn run_passes(model: &mut Model, passes: &[PassSpec]) -> Vec<cresnet_opt::passes::PassReport> {
    cresnet_opt::passes::run_pipeline(model, passes, &Default::default(), |_| {}).expect("passes run")
}

pub fn fold() -> PassSpec {
    PassSpec::Fold(FoldOptions::default())
}

pub fn dw(rank: usize) -> PassSpec {
    PassSpec::Dw(DwOptions { rank: Some(rank), min_gain: -10.0, ..Default::default() })
}

/// `dw` at `rank` on every KxK conv, the stem included, in the grouped
/// layout (one depthwise + one pointwise conv per factorized conv).
pub fn dw_all(rank: usize) -> PassSpec {
    PassSpec::Dw(DwOptions {
        rank: Some(rank),
        min_gain: -10.0,
        include: vec!["*".into()],
        layout: cresnet_opt::passes::dw::DwLayout::Grouped,
        ..Default::default()
    })
}

pub fn prune(opts: PruneOptions) -> PassSpec {
    PassSpec::Prune(opts)
}

/// The CLI binary.
pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_cresnet-opt"))
}

/// Seeded smooth random 64x64 images: low-frequency structure like photos, not white noise.
pub fn smooth_images(count: usize, seed: u64) -> Vec<ndarray::Array3<f32>> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let (a, b, c) = (rng.uniform() * 0.3, rng.uniform() * 0.3, rng.uniform() * 6.0);
            ndarray::Array3::from_shape_fn((3, 64, 64), |(ch, y, x)| {
                60.0 * ((a * x as f32 + b * y as f32 + c + ch as f32).sin()) + 10.0 * rng.normal()
            })
        })
        .collect()
}

/// Writes `count` smooth random 80x72 PNG images into `dir`.
pub fn write_images(dir: &std::path::Path, count: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng::new(seed);
    for k in 0..count {
        let (a, b, c) = (rng.uniform() * 0.3, rng.uniform() * 0.3, rng.uniform() * 6.0);
        let img = image::RgbImage::from_fn(80, 72, |x, y| {
            let v = |ch: f32| (128.0 + 100.0 * (a * x as f32 + b * y as f32 + c + ch).sin()) as u8;
            image::Rgb([v(0.0), v(1.0), v(2.0)])
        });
        img.save(dir.join(format!("{k:03}.png"))).unwrap();
    }
}

/// A 64x64 caffe-like preprocessing file.
pub fn preprocess_file(dir: &std::path::Path) -> cresnet_opt::config::Preprocess {
    let path = dir.join("pre.yaml");
    std::fs::write(&path, "resize: 72\ncrop: 64\nmean: [100, 110, 120]\nstd: [60, 60, 60]\nscale: 1.0\nchannel_order: bgr\n").unwrap();
    cresnet_opt::config::Preprocess::File(path)
}
