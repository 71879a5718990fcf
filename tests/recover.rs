//! Calibrated recovery: refits reduce the error the data-free passes leave.
mod common;
use common::*;
use cresnet_opt::fixture::{resnet50, FixtureSpec};
use cresnet_opt::ir::Model;
use cresnet_opt::passes::dw::DwOptions;
use cresnet_opt::passes::prune::PruneOptions;
use cresnet_opt::passes::PassSpec;
use cresnet_opt::refit::Calibration;
use ndarray::Array3;

fn images(count: usize, seed: u64) -> Vec<Array3<f32>> {
    smooth_images(count, seed)
}

fn error_on_fresh_images(original: &Model, compressed: &Model) -> f64 {
    let held_out = images(6, 999);
    let batch = cresnet_opt::data::stack(&held_out, 6).into_dyn();
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
    let r = cresnet_opt::passes::run_pipeline_calibrated(
        &mut m,
        &[fold(), PassSpec::Dw(DwOptions { rank: Some(2), ..Default::default() })],
        &Default::default(),
        Some(&calib),
        |_| {},
    )
    .unwrap();
    let refits: Vec<_> = r[1].changed.iter().filter(|c| c.what.starts_with("factorized on data")).collect();
    assert_eq!(refits.len(), 16);
    for c in refits {
        let nums: Vec<f64> =
            c.what.trim_start_matches("factorized on data: relative error ").split(" -> ").map(|v| v.parse().unwrap()).collect();
        assert!(nums[1] <= nums[0], "{}: {}", c.node, c.what);
    }
}

/// conv a (3→8) → Relu → conv b (8→4); a's channels 0..4 have large
/// weights (large L1) but a bias of -1e7, so Relu kills them on any image.
fn dead_but_heavy() -> Model {
    use cresnet_opt::fixture::{ConvSpec, Net};
    let mut net = Net::new(3).input("x", &[1, 3, 64, 64]);
    let a = net.conv("a", "x", ConvSpec::new(3, 8, 3));
    let mut w = net.weight("a.w", &[8, 3, 3, 3], 0.2);
    let mut wv = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[8, 3, 3, 3]), |i| {
        if i[0] < 4 {
            10.0
        } else {
            2.0 * ((i[0] * 27 + i[1] * 9 + i[2] * 3 + i[3]) as f32).sin()
        }
    });
    net.set_weight(&w, std::mem::take(&mut wv));
    w.clear();
    net.set_weight("a.b", ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[8]), |i| if i[0] < 4 { -1e7 } else { 0.1 }));
    let r = net.op("Relu", "r", &[&a]);
    net.conv("b", &r, ConvSpec::new(8, 4, 3));
    net.model(&["b"]).unwrap()
}

#[test]
fn reconstruction_importance_drops_dead_channels_that_l1_keeps() {
    let original = dead_but_heavy();
    let calib = Calibration::from_images(images(8, 4), 64, 1e-6);
    let opts = |importance| PruneOptions { ratio: Some(0.5), importance, ..Default::default() };
    let l1 = compress(&original, &[prune(opts(cresnet_opt::passes::prune::Importance::L1))], Some(&calib));
    let rec = compress(&original, &[prune(opts(cresnet_opt::passes::prune::Importance::Reconstruction))], Some(&calib));
    for m in [&l1, &rec] {
        assert_eq!(m.graph.constant("a.w").unwrap().shape(), vec![4, 3, 3, 3]);
        assert_eq!(m.graph.constant("b.w").unwrap().shape(), vec![4, 4, 3, 3]);
    }
    let (e_l1, e_rec) = (error_on_fresh_images(&original, &l1), error_on_fresh_images(&original, &rec));
    assert!(e_rec < 1e-4, "reconstruction: relative error {e_rec}");
    assert!(e_l1 > 0.1, "l1: relative error {e_l1}");
}

#[test]
fn reconstruction_importance_without_calibration_falls_back_to_l1_and_says_so() {
    let original = fixture();
    let run_with = |importance| {
        let mut m = original.clone();
        let spec = prune(PruneOptions { importance, ..Default::default() });
        let r = cresnet_opt::passes::run_pipeline(&mut m, &[fold(), spec], &Default::default(), |_| {}).unwrap();
        (m, r)
    };
    let (rec, report) = run_with(cresnet_opt::passes::prune::Importance::Reconstruction);
    let (l1, _) = run_with(cresnet_opt::passes::prune::Importance::L1);
    assert!(
        report[1].declined.iter().any(|d| d.reason.contains("needs calibration images") && d.reason.ends_with("used l1")),
        "{:?}",
        report[1].declined
    );
    let x = random_input(&original, 1, 1.0, 3);
    assert_eq!(run(&rec, &x), run(&l1, &x));
}

#[test]
fn alternating_depthwise_refit_lowers_the_layer_errors() {
    let original = fixture();
    let calib = Calibration::from_images(images(16, 5), 24, 1e-3);
    let errors = |alternate| {
        let mut m = original.clone();
        let r = cresnet_opt::passes::run_pipeline_calibrated(
            &mut m,
            &[fold(), PassSpec::Dw(DwOptions { rank: Some(1), alternate, ..Default::default() })],
            &Default::default(),
            Some(&calib),
            |_| {},
        )
        .unwrap();
        let last: Vec<f64> = r[1].changed.iter().filter_map(|c| c.what.rsplit(" -> ").next()?.parse().ok()).collect();
        (last, m)
    };
    let (plain, _) = errors(0);
    let (alt, m) = errors(2);
    assert_eq!(plain.len(), 16);
    // Later layers see other inputs, so compare the first layer exactly and the sum loosely.
    assert!(alt[0] < plain[0], "first layer: {} vs {}", alt[0], plain[0]);
    assert!(alt.iter().sum::<f64>() < plain.iter().sum::<f64>());
    assert!(error_on_fresh_images(&original, &m).is_finite());
}

#[test]
fn block_targets_repair_the_residual_stream_better_than_layer_targets() {
    let original = fixture();
    let passes = [fold(), prune(PruneOptions { ratio: Some(0.5), scope: cresnet_opt::passes::prune::Scope::Inner, ..Default::default() })];
    let error = |target| {
        let mut calib = Calibration::from_images(images(24, 6), 24, 1e-3);
        (calib.target, calib.through_relu) = (target, false);
        error_on_fresh_images(&original, &compress(&original, &passes, Some(&calib)))
    };
    let (layer, block) = (error(cresnet_opt::config::RefitTarget::Layer), error(cresnet_opt::config::RefitTarget::Block));
    assert!(block < 0.95 * layer, "block {block} vs layer {layer}");
}

/// x → 1x1 conv `a` → ReLU → 1x1 conv `b`, 8 channels.
fn two_convs() -> Model {
    use cresnet_opt::fixture::{ConvSpec, Net};
    let mut net = Net::new(3).input("x", &[1, 8, 6, 6]);
    let y = net.conv("a", "x", ConvSpec::new(8, 8, 1));
    let y = net.op("Relu", "relu", &[&y]);
    let y = net.conv("b", &y, ConvSpec::new(8, 8, 1));
    net.model(&[&y]).unwrap()
}

fn random_images(count: usize, seed: u64) -> Vec<Array3<f32>> {
    let mut rng = cresnet_opt::fixture::Rng::new(seed);
    (0..count).map(|_| Array3::from_shape_fn((8, 6, 6), |_| rng.normal())).collect()
}

/// The relative errors "before -> after" that a calibrated pass reports for `node`.
fn reported_errors(report: &cresnet_opt::passes::PassReport, node: &str) -> (f64, f64) {
    let c = report.changed.iter().find(|c| c.node == node).unwrap_or_else(|| panic!("{node} not in {report:?}"));
    let errs: Vec<f64> =
        c.what.split("relative error ").nth(1).unwrap().split(", ").next().unwrap().split(" -> ").map(|v| v.parse().unwrap()).collect();
    (errs[0], errs[1])
}

#[test]
fn refits_reproduce_the_original_or_the_previous_pass_as_configured() {
    use cresnet_opt::config::RefitReference;
    use cresnet_opt::passes::lowrank::LowrankOptions;
    // `a` at rank 2 loses information; `b`, refactorized at full rank, is
    // fitted either to the previous model's output (which it reproduces
    // exactly) or to the original's (a's error included, partly repaired).
    let original = two_convs();
    let passes = [
        PassSpec::Lowrank(LowrankOptions { rank: Some(2), include: vec!["a".into()], ..Default::default() }),
        PassSpec::Lowrank(LowrankOptions { rank: Some(8), min_gain: -10.0, include: vec!["b".into()], ..Default::default() }),
    ];
    let mut calib = Calibration::from_images(random_images(24, 1), 36, 1e-6);
    let mut b_errors = |reference| {
        calib.reference = reference;
        let mut m = original.clone();
        let reports = cresnet_opt::passes::run_pipeline_calibrated(&mut m, &passes, &Default::default(), Some(&calib), |_| {}).unwrap();
        reported_errors(&reports[1], "b")
    };
    let (before, after) = b_errors(RefitReference::Previous);
    assert!(before < 1e-6 && after < 1e-6, "{before} -> {after}");
    let (before, after) = b_errors(RefitReference::Original);
    assert!(before > 0.1 && after < before, "{before} -> {after}");
}

#[test]
fn refits_fall_back_to_the_previous_pass_once_pruning_changed_shapes() {
    // Against the original the pruned tensors would have more channels than
    // the model being refit; the dw pass must refit against the pruned model.
    let original = fixture();
    let mut calib = Calibration::from_images(images(24, 1), 24, 1e-3);
    calib.reference = cresnet_opt::config::RefitReference::Original;
    let passes = [
        fold(),
        prune(PruneOptions { ratio: Some(0.5), ..Default::default() }),
        PassSpec::Dw(DwOptions { rank: Some(1), ..Default::default() }),
    ];
    let mut m = original.clone();
    let reports = cresnet_opt::passes::run_pipeline_calibrated(&mut m, &passes, &Default::default(), Some(&calib), |_| {}).unwrap();
    let refits = reports[2].changed.iter().filter(|c| c.what.contains("refit") || c.what.contains("on data")).count();
    assert!(refits > 0, "{:?}", reports[2]);
    assert!(error_on_fresh_images(&original, &m).is_finite());
}

/// The refits' records (targets, cached activations) in a temporary file
/// give the very same model as in memory (issue #18: calibration memory
/// bounded whatever the image count): every weight bit for bit, with block
/// targets (residual inputs subtracted at the sampled positions) and the
/// three calibrated passes.
#[test]
fn refits_spilled_to_disk_give_the_same_weights_as_in_memory() {
    use cresnet_opt::passes::lowrank::LowrankOptions;
    let original = fixture();
    let passes = [
        fold(),
        PassSpec::Lowrank(LowrankOptions { ratio: Some(0.5), ..Default::default() }),
        PassSpec::Dw(DwOptions { rank: Some(1), ..Default::default() }),
        prune(PruneOptions { ratio: Some(0.25), ..Default::default() }),
    ];
    let compressed = |spill_bytes: u64| {
        let mut calib = Calibration::from_images(images(12, 7), 16, 1e-3);
        (calib.target, calib.spill_bytes) = (cresnet_opt::config::RefitTarget::Block, spill_bytes);
        compress(&original, &passes, Some(&calib))
    };
    let (memory, disk) = (compressed(u64::MAX), compressed(0));
    let weights = |m: &Model| {
        let mut w: Vec<(String, Vec<f32>)> = m
            .graph
            .weights()
            .iter()
            .filter_map(|(k, _)| m.graph.constant_f32(k).map(|a| (k.clone(), a.iter().copied().collect())))
            .collect();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        w
    };
    let (a, b) = (weights(&memory), weights(&disk));
    assert!(a.len() > 50, "{} weights", a.len());
    assert_eq!(a.iter().map(|w| &w.0).collect::<Vec<_>>(), b.iter().map(|w| &w.0).collect::<Vec<_>>());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "`{name}` differs");
    }
    assert!(error_on_fresh_images(&original, &memory).is_finite());
}

/// With calibration, refits give every conv they fit a bias: `prune.budget`
/// leaves room for those, and the model keeps its promise after them.
#[test]
fn a_calibrated_prune_budget_leaves_room_for_the_refits_biases() {
    let original = fixture();
    let calib = Calibration::from_images(images(8, 8), 16, 1e-3);
    let passes = [
        fold(),
        PassSpec::Dw(DwOptions { rank: Some(1), min_gain: -10.0, ..Default::default() }),
        prune(PruneOptions { budget: Some(0.3), ..Default::default() }),
    ];
    let mut m = original.clone();
    let reports = cresnet_opt::passes::run_pipeline_calibrated(&mut m, &passes, &Default::default(), Some(&calib), |_| {}).unwrap();
    let start = reports.iter().find(|r| r.pass == "fold").unwrap().params_before;
    let pruned = reports.last().unwrap();
    assert!(pruned.params_after <= (0.3 * start as f64) as u64, "{} of {start}", pruned.params_after);
    let note = &pruned.changed[0].what;
    assert!(note.contains("left for biases that refits or BN folds add"), "{note}");
}
