//! The `resize` pass: the network computes at a smaller size behind the same input.
mod common;
use common::*;
use cresnet_opt::passes::resize::ResizeOptions;
use cresnet_opt::passes::PassSpec;
use cresnet_opt::runner::Runner;
use ndarray::ArrayD;

fn resize(size: usize) -> PassSpec {
    PassSpec::Resize(ResizeOptions { size: Some(size) })
}

/// A [1, 3, s, s] image with one value per channel: any resize of it is itself.
fn flat_image(s: usize) -> ArrayD<f32> {
    ArrayD::from_shape_fn(vec![1, 3, s, s], |ix| [-40.0, 12.5, 70.0][ix[1]])
}

#[test]
fn the_network_computes_at_the_new_size_behind_the_same_input() {
    let original = cresnet_opt::io::load(&fixture_path()).expect("fixture loads");
    let mut model = original.clone();
    let reports = run_passes(&mut model, &[resize(160)]);
    let report = &reports[0];
    assert_eq!((report.pass.as_str(), report.changed.len(), report.declined.len()), ("resize", 1, 0));
    assert_eq!(report.changed[0].what, "the network computes at 160x160 instead of 224x224 (linear Resize after the input)");
    // Only the 4 scales are new; every conv's MACs scale with the area (the
    // stem's by (80/112)², the rest likewise), the classifier's do not.
    assert_eq!(report.params_after, report.params_before + 4);
    let ratio = report.macs_after as f64 / report.macs_before as f64;
    assert!((ratio - (160.0f64 / 224.0).powi(2)).abs() < 0.01, "MACs ratio {ratio}");
    // The input is unchanged; the resized model on a flat 224-px image is the
    // original on a flat 160-px one (a flat image resizes to itself).
    assert_eq!(cresnet_opt::runner::model_input_shape(&model).unwrap(), vec![1, 3, 224, 224]);
    let got = run(&model, &flat_image(224));
    let at_160 = Runner::at(&original, &[1, 3, 160, 160], &[]).unwrap().run(flat_image(160)).unwrap().remove(0);
    let d = rel_diff(&at_160, &got);
    assert!(d < 1e-5, "resized model vs the original at 160 px: {d}");
    // On a real (varied) image the two differ: the network sees fewer pixels.
    let x = random_input(&model, 1, 50.0, 3);
    assert!(rel_diff(&run(&original, &x), &run(&model, &x)) > 1e-3);
}

#[test]
fn declines_a_size_that_is_not_smaller_and_requires_a_size() {
    let mut model = cresnet_opt::io::load(&fixture_path()).expect("fixture loads");
    let reports = run_passes(&mut model, &[resize(224)]);
    assert!(reports[0].changed.is_empty());
    assert_eq!(reports[0].declined[0].reason, "it is 224x224, not larger than 224x224");
    let missing = PassSpec::Resize(ResizeOptions { size: None }).check().unwrap_err().to_string();
    assert!(missing.contains("`resize.size` is required"), "{missing}");
    let tiny = resize(4).check().unwrap_err().to_string();
    assert!(tiny.contains("`resize.size` is 4, but must be at least 8"), "{tiny}");
}

/// A network whose output is an image (no pooling): resizing would change it.
#[test]
fn declines_when_a_graph_output_would_change_shape() {
    use cresnet_opt::fixture::{ConvSpec, Net};
    let mut net = Net::new(1).input("x", &[1, 3, 16, 16]);
    let c = net.conv("c", "x", ConvSpec::new(3, 4, 3));
    net.op("Relu", "y", &[&c]);
    let mut model = net.model(&["y"]).unwrap();
    let before = model.graph.to_proto().unwrap();
    let reports = run_passes(&mut model, &[resize(8)]);
    assert!(reports[0].changed.is_empty());
    assert_eq!(reports[0].declined[0].reason, "graph output `y` would change its shape");
    assert_eq!(model.graph.to_proto().unwrap(), before, "a declined resize leaves the graph alone");
}

/// `Shape` keeps describing the model's input: only image readers move.
#[test]
fn shape_readers_keep_reading_the_input() {
    use cresnet_opt::fixture::{ConvSpec, Net};
    let mut net = Net::new(1).input("x", &[1, 3, 16, 16]);
    net.op("Shape", "s", &["x"]);
    let c = net.conv("c", "x", ConvSpec::new(3, 4, 3));
    net.op("GlobalAveragePool", "y", &[&c]);
    let mut model = net.model(&["y", "s"]).unwrap();
    let reports = run_passes(&mut model, &[resize(8)]);
    assert_eq!(reports[0].changed.len(), 1, "{:?}", reports[0].declined);
    let reader = |name: &str| model.graph.node(model.graph.find_node(name).unwrap()).input(0).unwrap().to_string();
    assert_eq!(reader("s"), "x");
    assert_eq!(reader("c"), "x_8px");
}

#[test]
fn the_training_engine_reads_the_resize() {
    // The engine reads the linear Resize: the resized fixture's forward in
    // the training engine equals tract's.
    let mut model = cresnet_opt::io::load(&fixture_path()).expect("fixture loads");
    run_passes(&mut model, &[fold(), resize(96)]);
    let d = engine_vs_tract(&model, 2, 50.0, 4);
    assert!(d < 1e-5, "engine vs tract on the resized fixture: {d}");
}
