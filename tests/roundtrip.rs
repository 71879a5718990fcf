//! Lossless round trip and exact statistics.
mod common;
use common::*;
use cresnet_opt::fixture::{resnet50, FixtureSpec, Layout};

#[test]
fn fixture_round_trip_is_bit_identical_in_tract() {
    let model = cresnet_opt::io::load(&fixture_path()).unwrap();
    let bytes = cresnet_opt::io::to_bytes(&model).unwrap();
    let again = cresnet_opt::io::from_bytes(bytes.into(), "round trip", None).unwrap();
    let x = random_input(&model, 2, 100.0, 1);
    let (a, b) = (run(&model, &x), run(&again, &x));
    assert_eq!(a, b, "outputs must be bit-identical");
}

#[test]
fn shipped_fixture_file_round_trips_byte_for_byte() {
    let original = std::fs::read(fixture_path()).unwrap();
    let model = cresnet_opt::io::load(&fixture_path()).unwrap();
    assert_eq!(cresnet_opt::io::to_bytes(&model).unwrap(), original);
}

#[test]
fn shipped_fixture_matches_its_generator() {
    let model = resnet50(&FixtureSpec::default()).unwrap();
    let original = std::fs::read(fixture_path()).unwrap();
    assert_eq!(
        cresnet_opt::io::to_bytes(&model).unwrap(),
        original,
        "regenerate with: cargo run --release --bin make-fixture -- fixtures/resnet50-w8.onnx"
    );
}

#[test]
fn fixture_stats_are_exact() {
    let model = cresnet_opt::io::load(&fixture_path()).unwrap();
    let s = cresnet_opt::stats::compute(&model.graph, &Default::default()).unwrap();
    assert_eq!((s.nodes, s.ops["Conv"], s.ops["BatchNormalization"], s.ops["Add"], s.ops["Relu"]), (175, 53, 53, 16, 49));
    // Params: every initializer element, by hand from the widths (C/8).
    let weights: u64 = model.graph.weights().values().map(|w| w.len() as u64).sum();
    assert_eq!(s.params, weights);
    assert_eq!(s.params, 641_112);
    assert_eq!(s.macs, 73_412_608);
    // The stem: 8 filters of 3x7x7 at 112x112 outputs.
    let stem = s.layers.iter().find(|l| l.name == "conv1").unwrap();
    assert_eq!(stem.macs, 8 * 3 * 7 * 7 * 112 * 112);
    assert_eq!(stem.params, 8 * 3 * 7 * 7 + 8);
}

#[test]
fn torchvision_layout_has_stride_on_the_3x3_and_no_biases() {
    let spec = FixtureSpec { layout: Layout::Torchvision, width_div: 16, input_size: 64, classes: 10, ..Default::default() };
    let model = resnet50(&spec).unwrap();
    let g = &model.graph;
    let conv2 = g.node(g.find_node("layer2.0.conv2").unwrap());
    assert_eq!(conv2.attr_ints("strides"), Some(&[2i64, 2][..]));
    assert_eq!(conv2.inputs().len(), 2);
    let s = cresnet_opt::stats::compute(g, &Default::default()).unwrap();
    assert_eq!(s.layers.last().unwrap().output_shape, Some(vec![1, 10]));
    let x = random_input(&model, 1, 1.0, 3);
    assert_eq!(run(&model, &x).shape(), &[1, 10]);
}

#[test]
fn keras_layout_has_stride_on_the_first_1x1() {
    let model = resnet50(&FixtureSpec { width_div: 16, input_size: 64, ..Default::default() }).unwrap();
    let g = &model.graph;
    assert_eq!(g.node(g.find_node("res3a_branch2a").unwrap()).attr_ints("strides"), Some(&[2i64, 2][..]));
    assert_eq!(g.node(g.find_node("res3a_branch2b").unwrap()).attr_ints("strides"), Some(&[1i64, 1][..]));
}

#[test]
fn external_data_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let model = cresnet_opt::io::load(&fixture_path()).unwrap();
    let out = dir.path().join("m.onnx");
    cresnet_opt::io::save(&model, &out, true).unwrap();
    assert!(dir.path().join("m.onnx.data").exists());
    assert!(std::fs::metadata(&out).unwrap().len() < 100_000, "weights went to the side file");
    let back = cresnet_opt::io::load(&out).unwrap();
    let x = random_input(&model, 1, 100.0, 2);
    assert_eq!(run(&model, &x), run(&back, &x));
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn shared_model_stats_are_exact() {
    let model = cresnet_opt::io::load(&shared_model()).unwrap();
    let s = cresnet_opt::stats::compute(&model.graph, &Default::default()).unwrap();
    assert_eq!(s.params, 25_636_712);
    assert_eq!(s.macs, 3_857_973_248);
    assert_eq!(s.nodes, 175);
    assert_eq!((s.ops["Conv"], s.ops["BatchNormalization"], s.ops["Add"]), (53, 53, 16));
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn shared_model_round_trip_is_bit_identical() {
    let path = shared_model();
    let model = cresnet_opt::io::load(&path).unwrap();
    let bytes = cresnet_opt::io::to_bytes(&model).unwrap();
    assert_eq!(bytes, std::fs::read(&path).unwrap(), "the untouched model is written byte for byte");
    let again = cresnet_opt::io::from_bytes(bytes.into(), "round trip", None).unwrap();
    let x = random_input(&model, 1, 120.0, 7);
    assert_eq!(run(&model, &x), run(&again, &x));
}

/// The fixture saved with external data, its first external tensor's
/// location replaced by `location`; returns the model file.
fn with_location(dir: &std::path::Path, location: &str) -> std::path::PathBuf {
    use prost::Message;
    let model = cresnet_opt::io::load(&fixture_path()).unwrap();
    let out = dir.join("m.onnx");
    cresnet_opt::io::save(&model, &out, true).unwrap();
    let mut proto = cresnet_opt::onnx::ModelProto::decode(std::fs::read(&out).unwrap().as_slice()).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    let tensor = graph.initializer.iter_mut().find(|t| !t.external_data.is_empty()).expect("an external tensor");
    let entry = tensor.external_data.iter_mut().find(|e| e.key() == "location").unwrap();
    entry.value = Some(location.to_string());
    std::fs::write(&out, proto.encode_to_vec()).unwrap();
    out
}

#[test]
fn external_data_may_not_leave_the_model_folder() {
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), vec![7u8; 1 << 16]).unwrap();
    let cases = [
        ("../../../etc/passwd", "leaves the model's folder (`..`)"),
        ("sub/../../m.onnx.data", "leaves the model's folder (`..`)"),
        (secret.path().to_str().unwrap(), "is an absolute path"),
        ("link.data", "leads out of the model's folder"),
    ];
    for (location, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let model = with_location(dir.path(), location);
        #[cfg(unix)]
        std::os::unix::fs::symlink(secret.path(), dir.path().join("link.data")).unwrap();
        let out = dir.path().join("out.onnx");
        let run = bin().arg(&model).arg("-o").arg(&out).args(["--passes", "none"]).output().unwrap();
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{location}: {err}");
        assert!(err.contains(&format!("external data location `{location}` {expected}")), "{location}: {err}");
        assert!(err.contains("tensor `"), "names the tensor: {err}");
        assert!(!out.exists(), "{location}: no output written");
    }
}

#[test]
fn external_data_with_a_plain_relative_location_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let model = with_location(dir.path(), "./m.onnx.data");
    let (a, b) = (cresnet_opt::io::load(&fixture_path()).unwrap(), cresnet_opt::io::load(&model).unwrap());
    let x = random_input(&a, 1, 100.0, 2);
    assert_eq!(run(&a, &x), run(&b, &x));
}
