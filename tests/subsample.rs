//! The `subsample` pass: strided 1x1 convs read a shared depthwise subsampling conv.
mod common;
use common::*;
use cresnet_opt::fixture::{ConvSpec, Net};
use cresnet_opt::ir::Model;
use cresnet_opt::passes::subsample::SubsampleOptions;
use cresnet_opt::passes::PassSpec;
use cresnet_opt::runner::Runner;

fn subsample() -> PassSpec {
    PassSpec::Subsample(SubsampleOptions::default())
}

fn strided(c_in: usize, c_out: usize, stride: usize, pad: usize) -> ConvSpec {
    ConvSpec { stride, pad, ..ConvSpec::new(c_in, c_out, 1) }
}

/// An odd-sized (9x9) map read by two stride-2 1x1 convs, a stride-3 one and
/// a padded stride-2 one (declined).
fn readers_of_one_map() -> Model {
    let mut net = Net::new(5).input("x", &[1, 3, 9, 9]);
    let stem = net.conv("stem", "x", ConvSpec::new(3, 8, 3));
    let r = net.op("Relu", "r", &[&stem]);
    let a = net.conv("a", &r, strided(8, 4, 2, 0));
    let b = net.conv("b", &r, strided(8, 6, 2, 0));
    let c = net.conv("c", &r, strided(8, 4, 3, 0));
    let d = net.conv("d", &r, strided(8, 4, 2, 1));
    net.model(&[&a, &b, &c, &d]).unwrap()
}

fn outputs(model: &Model, x: &ndarray::ArrayD<f32>) -> Vec<ndarray::ArrayD<f32>> {
    Runner::new(model, 1, &[]).unwrap().run(x.clone()).unwrap()
}

#[test]
fn strided_1x1_convs_read_one_shared_subsampling_conv_with_equal_outputs() {
    let original = readers_of_one_map();
    let mut model = original.clone();
    let report = run_passes(&mut model, &[subsample()]).remove(0);
    let mut changed: Vec<&str> = report.changed.iter().map(|c| c.node.as_str()).collect();
    changed.sort();
    assert_eq!(changed, ["a", "b", "c"]);
    assert_eq!(report.declined.len(), 1);
    assert_eq!((report.declined[0].node.as_str(), report.declined[0].reason.as_str()), ("d", "its pads are not zero"));
    // One subsampling conv per (map, strides): 2x2 shared by a and b, 3x3 for c;
    // 9 is odd for stride 2, so its last window is completed by an end pad.
    let subs: Vec<_> = model.graph.nodes().filter(|n| n.attr_int("group") == Some(8)).collect();
    assert_eq!(subs.len(), 2);
    let pads: Vec<Vec<i64>> = subs.iter().map(|n| n.attr_ints("pads").unwrap().to_vec()).collect();
    assert!(pads.contains(&vec![0, 0, 1, 1]) && pads.contains(&vec![0, 0, 0, 0]), "{pads:?}");
    assert_eq!(report.params_after, report.params_before + 8 * 4 + 8 * 9);
    // The same pixels times 1, plus exact zeros: equal outputs, every one.
    let x = random_input(&model, 1, 2.0, 7);
    for (before, after) in outputs(&original, &x).iter().zip(outputs(&model, &x).iter()) {
        assert_eq!(before.shape(), after.shape());
        let d = rel_diff(before, after);
        assert!(d < 1e-6, "subsampled vs strided: {d}");
    }
    // The training engine runs the new conv (end pads included) as tract does.
    let d = engine_vs_tract(&model, 2, 2.0, 3);
    assert!(d < 1e-5, "engine vs tract: {d}");
}

#[test]
fn the_resnet_fixture_keeps_its_outputs_with_its_strided_convs_subsampled() {
    let original = cresnet_opt::io::load(&fixture_path()).expect("fixture loads");
    let mut model = original.clone();
    let report = run_passes(&mut model, &[fold(), subsample()]).remove(1);
    // Stages 3-5 open with a stride-2 1x1 conv and a stride-2 1x1 shortcut
    // reading the same map: 6 convs, 3 subsampling convs.
    assert_eq!((report.changed.len(), report.declined.len()), (6, 0));
    let subs = model.graph.nodes().filter(|n| n.op() == "Conv" && n.attr_ints("kernel_shape") == Some(&[2, 2][..])).count();
    assert_eq!(subs, 3);
    let x = random_input(&model, 1, 50.0, 11);
    let d = rel_diff(&run(&original, &x), &run(&model, &x));
    assert!(d < 1e-5, "subsampled ResNet vs the original: {d}");
    // Nothing left to do: a second run says so.
    let again = run_passes(&mut model, &[subsample()]).remove(0);
    assert!(again.changed.is_empty() && again.declined.is_empty());
}

#[test]
fn a_budget_counts_the_subsampling_taps() {
    // `lowrank`'s budget is fitted to the rest of the pipeline; `subsample`
    // is exact but adds C·s² taps (here 3 convs of 32, 64, 128 channels at
    // 2x2: 896), so it is part of that rest.
    let mut model = cresnet_opt::io::load(&fixture_path()).expect("fixture loads");
    let budget =
        PassSpec::Lowrank(cresnet_opt::passes::lowrank::LowrankOptions { ratio: Some(0.5), budget: Some(0.3), ..Default::default() });
    let reports = run_passes(&mut model, &[fold(), budget, dw(1), subsample()]);
    let (start, end) = (reports[0].params_before, reports.last().unwrap().params_after);
    assert_eq!(end - reports[3].params_before, 896);
    assert!(end as f64 <= 0.3 * start as f64, "{end} of {start}");
}
