//! Pass `lowrank`: 1x1 convs and Gemm as two low-rank layers.
mod common;
use common::*;
use cresnet_opt::fixture::{resnet50, FixtureSpec};
use cresnet_opt::ir::Model;
use cresnet_opt::passes::lowrank::LowrankOptions;
use cresnet_opt::passes::PassSpec;
use cresnet_opt::refit::Calibration;
use ndarray::Array3;

fn fixture() -> Model {
    resnet50(&FixtureSpec { width_div: 8, input_size: 64, classes: 10, ..Default::default() }).unwrap()
}

/// The same with a 1000-way head, whose factorization is part of the plan.
fn imagenet_fixture() -> Model {
    resnet50(&FixtureSpec { width_div: 8, input_size: 64, classes: 1000, ..Default::default() }).unwrap()
}

fn lowrank(opts: LowrankOptions) -> PassSpec {
    PassSpec::Lowrank(opts)
}

fn count(model: &Model, op: &str) -> usize {
    model.graph.nodes().filter(|n| n.op() == op).count()
}

/// 1x1 convs of the fixture (not reading the graph input) and its Gemm.
fn pointwise_convs(model: &Model) -> Vec<(usize, usize)> {
    model
        .graph
        .nodes()
        .filter(|n| n.op() == "Conv" && !n.input(0).is_some_and(|x| model.graph.is_graph_input(x)))
        .filter_map(|n| model.graph.constant_f32(n.input(1)?).map(|w| w.shape().to_vec()))
        .filter(|s| s[2] * s[3] == 1)
        .map(|s| (s[0], s[1]))
        .collect()
}

#[test]
fn full_rank_lowrank_is_exact() {
    let original = imagenet_fixture();
    let mut m = original.clone();
    let opts = LowrankOptions { rank: Some(100_000), min_gain: -10.0, ..Default::default() };
    let r = run_passes(&mut m, &[fold(), lowrank(opts)]);
    let layers = pointwise_convs(&original).len() + 1;
    assert_eq!(r[1].changed.len(), layers);
    assert_eq!(count(&m, "Gemm"), 2);
    let x = random_input(&original, 2, 50.0, 7);
    let d = rel_diff(&run(&original, &x), &run(&m, &x));
    assert!(d < 1e-4, "full-rank factorization differs by {d}");
}

#[test]
fn ratio_sets_each_layers_rank_and_the_params_follow_exactly() {
    let original = imagenet_fixture();
    let mut m = original.clone();
    run_passes(&mut m, &[fold()]);
    let folded = cresnet_opt::stats::compute(&m.graph, &Default::default()).unwrap().params;
    let convs = pointwise_convs(&m);
    let r = run_passes(&mut m, &[lowrank(LowrankOptions { ratio: Some(0.5), min_gain: 0.0, ..Default::default() })]);
    let rank = |o: usize, i: usize| ((0.5 * (o * i) as f64 / (o + i) as f64).floor() as usize).max(1);
    // Gemm of the fixture: 2048/8 = 256 inputs, 1000 classes; plus its zero first bias.
    let (gi, go) = (256usize, 1000usize);
    let saved: i64 = convs.iter().map(|&(o, i)| (o * i) as i64 - (rank(o, i) * (o + i)) as i64).sum::<i64>() + (go * gi) as i64
        - (rank(go, gi) * (go + gi) + rank(go, gi)) as i64;
    assert_eq!(r[0].changed.len(), convs.len() + 1);
    assert_eq!(cresnet_opt::stats::compute(&m.graph, &Default::default()).unwrap().params as i64, folded as i64 - saved);
    assert!(r[0].changed.iter().all(|c| c.what.starts_with("rank ")), "{:?}", r[0].changed);
}

#[test]
fn min_gain_declines_layers_that_would_not_shrink_and_names_them() {
    let mut m = fixture();
    let r = run_passes(&mut m, &[fold(), lowrank(LowrankOptions { rank: Some(100_000), ..Default::default() })]);
    assert!(r[1].changed.is_empty());
    assert_eq!(r[1].declined.len(), pointwise_convs(&m).len() + 1);
    // The convs by min_gain; the 10-way head stays whole anyway (its own reason).
    let conv = r[1].declined.iter().find(|d| d.node != "fc").unwrap();
    assert!(conv.reason.contains("less than min_gain 10.0 %"), "{}", conv.reason);
}

#[test]
fn include_and_exclude_choose_layers_by_name() {
    let mut m = fixture();
    let gemm = m.graph.nodes().find(|n| n.op() == "Gemm").map(|n| n.name().to_string()).unwrap();
    let r = run_passes(&mut m.clone(), &[fold(), lowrank(LowrankOptions { include: vec![gemm.clone()], ..Default::default() })]);
    assert_eq!(r[1].changed.iter().map(|c| c.node.clone()).collect::<Vec<_>>(), vec![gemm.clone()]);
    let r = run_passes(&mut m, &[fold(), lowrank(LowrankOptions { exclude: vec![gemm.clone()], ..Default::default() })]);
    assert!(r[1].changed.iter().all(|c| c.node != gemm));
    assert_eq!(count(&m, "Gemm"), 1);
}

/// A task model's head (at most 100 classes) is left whole unless named:
/// issue #17 saw a 6-way head cut to rank 1 by a ratio meant for 1000 classes.
#[test]
fn a_few_class_head_stays_whole_unless_included() {
    let mut m = fixture();
    let gemm = m.graph.nodes().find(|n| n.op() == "Gemm").map(|n| n.name().to_string()).unwrap();
    let r = run_passes(&mut m.clone(), &[fold(), lowrank(LowrankOptions { ratio: Some(0.5), min_gain: 0.0, ..Default::default() })]);
    let declined: Vec<_> = r[1].declined.iter().filter(|d| d.node == gemm).collect();
    assert_eq!(declined.len(), 1, "{:?}", r[1].declined);
    assert!(declined[0].reason.starts_with("the classifier (10 classes) stays whole: a rank below 10"), "{}", declined[0].reason);
    assert_eq!(r[1].changed.len(), pointwise_convs(&m).len());
    let opts = LowrankOptions { ratio: Some(0.5), min_gain: 0.0, include: vec![gemm.clone()], ..Default::default() };
    let r = run_passes(&mut m, &[fold(), lowrank(opts)]);
    assert_eq!(r[1].changed.iter().map(|c| c.node.clone()).collect::<Vec<_>>(), vec![gemm]);
    assert!(r[1].changed[0].what.starts_with("rank 4 "), "{}", r[1].changed[0].what);
}

#[test]
fn gemm_without_transb_is_factorized_exactly() {
    use cresnet_opt::fixture::Net;
    let mut net = Net::new(5).input("x", &[1, 12]);
    let w = net.weight("w", &[12, 6], 1.0);
    let b = net.weight("b", &[6], 1.0);
    net.op("Gemm", "fc", &["x", &w, &b]);
    let original = net.model(&["fc"]).unwrap();
    let mut m = original.clone();
    // A layer reading the graph input is skipped unless included by name.
    let r = run_passes(&mut m.clone(), &[lowrank(LowrankOptions { rank: Some(6), min_gain: -10.0, ..Default::default() })]);
    assert!(r[0].changed.is_empty());
    let r =
        run_passes(&mut m, &[lowrank(LowrankOptions { rank: Some(6), min_gain: -10.0, include: vec!["fc".into()], ..Default::default() })]);
    assert_eq!(r[0].changed.len(), 1, "{:?}", r[0]);
    let x = random_input(&original, 3, 1.0, 2);
    let d = rel_diff(&run(&original, &x), &run(&m, &x));
    assert!(d < 1e-5, "{d}");
}

fn images(count: usize, seed: u64) -> Vec<Array3<f32>> {
    smooth_images(count, seed)
}

#[test]
fn calibrated_lowrank_is_closer_to_the_original_than_data_free_and_reports_errors() {
    let original = fixture();
    let calib = Calibration::from_images(images(24, 4), 24, 1e-3);
    // Random weights have flat spectra: a mild ratio, and the Gemm (data-free either way) left out.
    let passes = [fold(), lowrank(LowrankOptions { ratio: Some(0.6), exclude: vec!["fc*".into()], ..Default::default() })];
    let compress = |c: Option<&Calibration>| {
        let mut m = original.clone();
        let r = cresnet_opt::passes::run_pipeline_calibrated(&mut m, &passes, &Default::default(), c, |_| {}).unwrap();
        (m, r)
    };
    let (free, rf) = compress(None);
    let (cal, rc) = compress(Some(&calib));
    // Same ranks, so the same weights count.
    assert_eq!(rf[1].params_after, rc[1].params_after);
    let on_data: Vec<_> = rc[1].changed.iter().filter(|c| c.what.contains("on data")).collect();
    assert_eq!(on_data.len(), pointwise_convs(&original).len());
    for c in &on_data {
        let errs: Vec<f64> =
            c.what.split("relative error ").nth(1).unwrap().split(", ").next().unwrap().split(" -> ").map(|v| v.parse().unwrap()).collect();
        assert!(errs[1] <= errs[0], "{}: {}", c.node, c.what);
    }
    let held = cresnet_opt::data::stack(&images(6, 999), 6).into_dyn();
    let reference = run(&original, &held);
    let (e_free, e_cal) = (rel_diff(&reference, &run(&free, &held)), rel_diff(&reference, &run(&cal, &held)));
    eprintln!("calibrated {e_cal} vs data-free {e_free}");
    assert!(e_cal < 0.7 * e_free, "calibrated {e_cal} vs data-free {e_free}");
}

#[test]
fn conflicting_lowrank_options_are_a_config_error() {
    let err =
        cresnet_opt::config::PipelineFile::from_yaml("passes:\n  - lowrank: { rank: 4, ratio: 0.5 }\n", "p.yaml").unwrap_err().to_string();
    assert!(err.contains("`lowrank` takes only one of `rank`, `ratio`, `energy`, `target_params`"), "{err}");
    let err = cresnet_opt::config::PipelineFile::from_yaml("passes:\n  - lowrank: { ratio: 1.5 }\n", "p.yaml").unwrap_err().to_string();
    assert!(err.contains("`lowrank.ratio` is 1.5, but must lie strictly between 0 and 1"), "{err}");
}

#[test]
fn target_params_meets_the_budget_with_one_energy_level() {
    let mut m = fixture();
    let r = run_passes(&mut m, &[fold(), lowrank(LowrankOptions { target_params: Some(0.6), ..Default::default() })]);
    let kept = r[1].params_after as f64 / r[1].params_before as f64;
    assert!(kept <= 0.6 && kept > 0.57, "kept {kept}");
    let plan = &r[1].changed[0];
    assert_eq!(plan.node, "(plan)");
    assert!(plan.what.contains("(target 0.6)"), "{}", plan.what);
    let err = cresnet_opt::passes::run_pipeline(
        &mut fixture(),
        &[fold(), lowrank(LowrankOptions { target_params: Some(0.01), ..Default::default() })],
        &Default::default(),
        |_| {},
    )
    .unwrap_err();
    let chain =
        std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source()).map(|e| e.to_string()).collect::<Vec<_>>().join(": ");
    assert!(chain.contains("after pass `lowrank`") && chain.contains("`target_params` 0.01 is out of reach"), "{chain}");
}

#[test]
fn an_empty_weight_is_declined_not_a_panic() {
    use cresnet_opt::fixture::Net;
    let mut net = Net::new(5).input("x", &[1, 0]);
    let w = net.weight("w", &[6, 0], 1.0);
    let mut node = cresnet_opt::ir::Node::new("Gemm", "fc", &["x", &w], &["fc"]);
    node.set_attr_int("transB", 1);
    net.node(node);
    let mut m = net.model(&["fc"]).unwrap();
    let r = run_passes(&mut m, &[lowrank(LowrankOptions { include: vec!["fc".into()], ..Default::default() })]);
    assert_eq!(r[0].declined.len(), 1, "{:?}", r[0]);
    assert_eq!(r[0].declined[0].reason, "empty weight");
}

#[test]
fn resolution_bounds_select_stages_whatever_the_names() {
    // The fixture's stages run at 16, 8, 4 and 2 pixels (input 64); a
    // 1000-way head, which lowrank factorizes without being named.
    let m = imagenet_fixture();
    let r = run_passes(&mut m.clone(), &[fold(), lowrank(LowrankOptions { min_resolution: Some(8), ..Default::default() })]);
    let early: Vec<&str> = r[1].changed.iter().map(|c| c.node.as_str()).collect();
    // res2*: 3 blocks x 2 + the shortcut; res3*: 4 x 2 + the shortcut.
    assert_eq!(early.len(), 16, "{early:?}");
    assert!(early.iter().all(|n| n.starts_with("res2") || n.starts_with("res3")), "{early:?}");
    let r = run_passes(&mut m.clone(), &[fold(), lowrank(LowrankOptions { max_resolution: Some(4), ..Default::default() })]);
    let late: Vec<&str> = r[1].changed.iter().map(|c| c.node.as_str()).collect();
    // res4*: 6 x 2 + 1, res5*: 3 x 2 + 1, and the classifier (a Gemm's output counts as 1 pixel).
    assert_eq!(late.len(), 21, "{late:?}");
    assert!(late.iter().all(|n| n.starts_with("res4") || n.starts_with("res5") || n.starts_with("fc")), "{late:?}");
    let dw = PassSpec::Dw(cresnet_opt::passes::dw::DwOptions {
        rank: Some(1),
        min_gain: -10.0,
        min_resolution: Some(8),
        max_resolution: Some(8),
        ..Default::default()
    });
    let r = run_passes(&mut m.clone(), &[fold(), dw]);
    let mid: Vec<&str> = r[1].changed.iter().map(|c| c.node.as_str()).collect();
    assert_eq!(mid.len(), 4, "res3*'s four 3x3 convs: {mid:?}");
    assert!(mid.iter().all(|n| n.starts_with("res3")), "{mid:?}");
}

/// The fixture with `classes` outputs, its classifier's weight stored
/// [C_in, C_out] (transB = 0) when `transposed`.
fn with_classifier(classes: usize, transposed: bool) -> Model {
    let mut m = resnet50(&FixtureSpec { width_div: 8, input_size: 64, classes, ..Default::default() }).unwrap();
    if transposed {
        let ix = m.graph.node_indices().into_iter().find(|&ix| m.graph.node(ix).op() == "Gemm").unwrap();
        let wname = m.graph.node(ix).input(1).unwrap().to_string();
        let w = m.graph.constant_f32(&wname).unwrap().t().as_standard_layout().into_owned();
        m.graph.weight_mut(&wname).unwrap().set_data(cresnet_opt::ir::Data::F32(w));
        m.graph.update_node(ix, |n| n.set_attr_int("transB", 0)).unwrap();
    }
    m
}

#[test]
fn calibrated_gemm_is_factorized_on_data_when_asked_whatever_its_weight_layout() {
    let calib = Calibration::from_images(images(24, 4), 24, 1e-3);
    // A 32-way head is a task model's: named, so that lowrank factorizes it.
    let opts =
        LowrankOptions { ratio: Some(0.3), max_resolution: Some(1), fit_gemm: true, include: vec!["fc".into()], ..Default::default() };
    let passes = [lowrank(opts)];
    let compress = |m: &Model, c: Option<&Calibration>| {
        let mut m = m.clone();
        let r = cresnet_opt::passes::run_pipeline_calibrated(&mut m, &passes, &Default::default(), c, |_| {}).unwrap();
        (m, r)
    };
    let original = with_classifier(32, false);
    let held = cresnet_opt::data::stack(&images(6, 999), 6).into_dyn();
    let reference = run(&original, &held);
    let (free, _) = compress(&original, None);
    let (cal, report) = compress(&original, Some(&calib));
    // 0.3 of 256 x 32 weights: rank 8.
    let [change] = &report[0].changed[..] else { panic!("{:?}", report[0]) };
    assert!(change.what.starts_with("rank 8 ") && change.what.contains("on data"), "{}", change.what);
    assert_eq!(count(&cal, "Gemm"), 2);
    let (e_free, e_cal) = (rel_diff(&reference, &run(&free, &held)), rel_diff(&reference, &run(&cal, &held)));
    eprintln!("calibrated {e_cal} vs data-free {e_free}");
    assert!(e_cal < 0.7 * e_free, "calibrated {e_cal} vs data-free {e_free}");
    // transB = 0 is first rewritten to the [C_out, C_in] layout: same result.
    let (cal_t, _) = compress(&with_classifier(32, true), Some(&calib));
    let d = rel_diff(&run(&cal, &held), &run(&cal_t, &held));
    assert!(d < 1e-5, "{d}");
    // Without `fit_gemm` the Gemm is factorized data-free, calibration or not.
    let (mut default_cal, plain) = (
        original.clone(),
        [lowrank(LowrankOptions { ratio: Some(0.3), max_resolution: Some(1), include: vec!["fc".into()], ..Default::default() })],
    );
    let report = cresnet_opt::passes::run_pipeline_calibrated(&mut default_cal, &plain, &Default::default(), Some(&calib), |_| {}).unwrap();
    assert!(!report[0].changed[0].what.contains("on data"), "{}", report[0].changed[0].what);
    assert!(rel_diff(&run(&free, &held), &run(&default_cal, &held)) < 1e-6);
}
