//! The passes: numeric equivalence, declines with reasons, exact counts.
mod common;
use common::*;
use cresnet_opt::fixture::{resnet50, ConvSpec, FixtureSpec, Layout, Net};
use cresnet_opt::ir::{Model, Node};
use cresnet_opt::passes::prune::dependency::ChannelGraph;
use cresnet_opt::passes::prune::PruneOptions;
use cresnet_opt::passes::prune::Scope;
use ndarray::s;

fn small_fixture(layout: Layout) -> Model {
    resnet50(&FixtureSpec { width_div: 16, input_size: 64, layout, classes: 10, ..Default::default() }).unwrap()
}

fn count(model: &Model, op: &str) -> usize {
    model.graph.nodes().filter(|n| n.op() == op).count()
}

#[test]
fn fold_is_exact_on_both_layouts() {
    for layout in [Layout::Keras, Layout::Torchvision] {
        let original = small_fixture(layout);
        let mut folded = original.clone();
        let reports = run_passes(&mut folded, &[fold()]);
        assert_eq!(reports[0].changed.len(), 53);
        assert!(reports[0].declined.is_empty());
        assert_eq!(count(&folded, "BatchNormalization"), 0);
        let x = random_input(&original, 2, 1.0, 11);
        let d = rel_diff(&run(&original, &x), &run(&folded, &x));
        assert!(d < 1e-5, "{layout:?}: rel diff {d}");
    }
}

#[test]
fn fold_removes_four_params_per_channel_and_adds_missing_biases() {
    let original = small_fixture(Layout::Torchvision);
    let mut folded = original.clone();
    let r = run_passes(&mut folded, &[fold()]).remove(0);
    // Torchvision convs have no bias: each BN's 4·C params become C bias values.
    let bn_channels: u64 = original
        .graph
        .nodes()
        .filter(|n| n.op() == "BatchNormalization")
        .map(|n| original.graph.weights()[n.input(1).unwrap()].len() as u64)
        .sum();
    assert_eq!(r.params_before - r.params_after, 3 * bn_channels);
}

fn depthwise_bn_model() -> Model {
    let mut net = Net::new(5).input("x", &[1, 6, 9, 9]);
    let y = net.conv("dw", "x", ConvSpec { group: 6, bias: false, ..ConvSpec::new(6, 6, 3) });
    let y = net.bn("bn", &y, 6);
    let y = net.op("Relu", "relu", &[&y]);
    let y = net.op("GlobalAveragePool", "gap", &[&y]);
    let y = net.op("Flatten", "flat", &[&y]);
    let w = net.weight("fc.w", &[4, 6], 0.5);
    let b = net.weight("fc.b", &[4], 0.1);
    let mut gemm = Node::new("Gemm", "fc", &[&y, &w, &b], &["fc"]);
    gemm.set_attr_int("transB", 1);
    let y = net.node(gemm);
    let y = net.bn("fc_bn", &y, 4);
    net.model(&[&y]).unwrap()
}

#[test]
fn fold_handles_depthwise_conv_and_gemm() {
    let original = depthwise_bn_model();
    let mut folded = original.clone();
    let r = run_passes(&mut folded, &[fold()]).remove(0);
    assert_eq!(r.changed.len(), 2, "{:?}", r.declined);
    assert_eq!(count(&folded, "BatchNormalization"), 0);
    let x = random_input(&original, 3, 2.0, 4);
    let d = rel_diff(&run(&original, &x), &run(&folded, &x));
    assert!(d < 1e-5, "rel diff {d}");
}

#[test]
fn fold_declines_shared_outputs_dynamic_params_and_training_mode() {
    let mut net = Net::new(6).input("x", &[1, 4, 6, 6]).input("gamma", &[4]);
    let a = net.conv("a", "x", ConvSpec::new(4, 4, 3));
    let bn_a = net.bn("bn_a", &a, 4);
    let side = net.op("Relu", "side", &[&a]); // a second reader of conv a
    let sum = net.op("Add", "sum", &[&bn_a, &side]);
    let b = net.conv("b", &sum, ConvSpec::new(4, 4, 1));
    let mut bn_b = Node::new("BatchNormalization", "bn_b", &[&b, "gamma", "bn_a.b", "bn_a.m", "bn_a.v"], &["bn_b"]);
    bn_b.set_attr_int("training_mode", 0);
    let y = net.node(bn_b);
    let c = net.conv("c", &y, ConvSpec::new(4, 4, 1));
    let mut bn_c = Node::new("BatchNormalization", "bn_c", &[&c, "bn_a.g", "bn_a.b", "bn_a.m", "bn_a.v"], &["bn_c"]);
    bn_c.set_attr_int("training_mode", 1);
    let y = net.node(bn_c);
    let mut model = net.model(&[&y]).unwrap();
    let r = run_passes(&mut model, &[fold()]).remove(0);
    assert!(r.changed.is_empty());
    let reason = |n: &str| r.declined.iter().find(|d| d.node == n).map(|d| d.reason.clone()).unwrap_or_default();
    assert_eq!(reason("bn_a"), "the output of `a` has other readers");
    assert_eq!(reason("bn_b"), "`gamma` is not a constant initializer");
    assert_eq!(reason("bn_c"), "training_mode = 1");
}

#[test]
fn dw_at_full_rank_is_exact_for_varied_geometry() {
    let cases = [
        ConvSpec::new(8, 12, 3),
        ConvSpec { stride: 2, pad: 1, ..ConvSpec::new(6, 10, 3) },
        ConvSpec { dilation: 2, pad: 2, ..ConvSpec::new(5, 7, 3) },
        ConvSpec { pad: 0, bias: false, ..ConvSpec::new(9, 4, 5) },
        ConvSpec { stride: 3, pad: 3, ..ConvSpec::new(8, 16, 7) },
    ];
    for (i, spec) in cases.into_iter().enumerate() {
        let mut net = Net::new(20 + i as u64).input("x", &[1, spec.c_in, 13, 11]);
        let y = net.conv("conv", "x", spec);
        let original = net.model(&[&y]).unwrap();
        let factored = original.clone();
        let full = spec.c_out.min(spec.k * spec.k);
        for layout in [cresnet_opt::passes::dw::DwLayout::Grouped, cresnet_opt::passes::dw::DwLayout::Split] {
            let mut factored = factored.clone();
            let opts = cresnet_opt::passes::dw::DwOptions {
                rank: Some(full),
                min_gain: -10.0,
                include: vec!["conv".into()],
                layout,
                ..Default::default()
            };
            let r = run_passes(&mut factored, &[cresnet_opt::passes::PassSpec::Dw(opts)]).remove(0);
            assert_eq!(r.changed.len(), 1, "case {i}: {:?}", r.declined);
            let convs = if layout == cresnet_opt::passes::dw::DwLayout::Grouped { 2 } else { 2 * full };
            assert_eq!(count(&factored, "Conv"), convs, "case {i} {layout:?}");
            let x = random_input(&original, 2, 1.0, i as u64);
            let d = rel_diff(&run(&original, &x), &run(&factored, &x));
            assert!(d < 1e-5, "case {i} {spec:?} {layout:?}: rel diff {d}");
        }
    }
}

#[test]
fn dw_rank_one_counts_and_min_gain() {
    let mut net = Net::new(3).input("x", &[1, 16, 8, 8]);
    let y = net.conv("conv", "x", ConvSpec::new(16, 32, 3));
    let mut model = net.model(&[&y]).unwrap();
    let r = run_passes(&mut model, &[dw_all(1)]).remove(0);
    // depthwise 16·1·9 + pointwise 32·16 + bias 32, against 32·16·9 + 32.
    assert_eq!(r.params_after, 16 * 9 + 32 * 16 + 32);
    assert_eq!(r.params_before, 32 * 16 * 9 + 32);
    let mut model2 = Net::new(3).input("x", &[1, 16, 8, 8]);
    let y = model2.conv("conv", "x", ConvSpec::new(16, 32, 3));
    let mut model2 = model2.model(&[&y]).unwrap();
    let spec = cresnet_opt::passes::PassSpec::Dw(cresnet_opt::passes::dw::DwOptions {
        rank: Some(9),
        include: vec!["*".into()],
        ..Default::default()
    });
    let r = run_passes(&mut model2, &[spec]).remove(0);
    assert!(r.changed.is_empty());
    assert!(r.declined[0].reason.contains("less than min_gain 10.0 %"), "{}", r.declined[0].reason);
}

#[test]
fn dw_rank9_on_the_fixture_is_exact_and_leaves_the_stem() {
    let original = small_fixture(Layout::Keras);
    let mut m = original.clone();
    let r = run_passes(&mut m, &[fold(), dw(9)]);
    assert_eq!(r[1].changed.len(), 16, "all 3x3 convs; the 7x7 stem on RGB stays");
    let x = random_input(&original, 1, 1.0, 9);
    let d = rel_diff(&run(&original, &x), &run(&m, &x));
    assert!(d < 1e-4, "rel diff {d}");
}

#[test]
fn dw_stem_option_takes_the_stem_without_naming_it() {
    // The small fixture's stem: 7x7, RGB → 4 channels at 32 px. Rank 4 =
    // its output count is exact; `min_resolution: 32` leaves the other convs.
    let original = small_fixture(Layout::Keras);
    let mut m = original.clone();
    let stem_only = |stem: bool| {
        cresnet_opt::passes::PassSpec::Dw(cresnet_opt::passes::dw::DwOptions {
            rank: Some(4),
            min_gain: -10.0,
            min_resolution: Some(32),
            stem,
            layout: cresnet_opt::passes::dw::DwLayout::Grouped,
            ..Default::default()
        })
    };
    let r = run_passes(&mut m.clone(), &[fold(), stem_only(false)]);
    assert_eq!((r[1].changed.len(), r[1].declined.len()), (0, 0), "the stem stays without `stem: true`");
    let r = run_passes(&mut m, &[fold(), stem_only(true)]);
    assert_eq!(r[1].changed.len(), 1);
    // 3·4 depthwise 7x7 filters and a 12 → 4 pointwise conv for 4·3 7x7 filters.
    assert_eq!(r[1].macs_after - r[1].macs_before, 32 * 32 * (12 * 49 + 12 * 4 - 4 * 3 * 49));
    let x = random_input(&original, 1, 1.0, 4);
    let d = rel_diff(&run(&original, &x), &run(&m, &x));
    assert!(d < 1e-4, "rel diff {d}");
}

/// x → a (conv 3x3) → relu → b (conv 1x1) → y, with a's channels 1 and 4 dead.
fn dead_channel_chain(bias_on_dead: f32) -> Model {
    let mut net = Net::new(8).input("x", &[1, 3, 8, 8]);
    let a = net.conv("a", "x", ConvSpec::new(3, 6, 3));
    let r = net.op("Relu", "r", &[&a]);
    let b = net.conv("b", &r, ConvSpec::new(6, 5, 1));
    let mut model = net.model(&[&b]).unwrap();
    let w = model.graph.weight_mut("a.w").unwrap().as_f32_mut().unwrap();
    for c in [1, 4] {
        w.slice_mut(s![c, .., .., ..]).fill(0.0);
    }
    let bias = model.graph.weight_mut("a.b").unwrap().as_f32_mut().unwrap();
    bias[[1]] = bias_on_dead;
    bias[[4]] = bias_on_dead;
    model
}

#[test]
fn pruning_all_zero_channels_leaves_outputs_unchanged() {
    let original = dead_channel_chain(0.0);
    let mut pruned = original.clone();
    run_passes(&mut pruned, &[prune(PruneOptions { ratio: Some(0.34), ..Default::default() })]);
    assert_eq!(pruned.graph.weights()["a.w"].shape(), vec![4, 3, 3, 3]);
    assert_eq!(pruned.graph.weights()["b.w"].shape(), vec![5, 4, 1, 1]);
    let x = random_input(&original, 2, 1.0, 1);
    let d = rel_diff(&run(&original, &x), &run(&pruned, &x));
    assert!(d < 1e-5, "rel diff {d}");
}

#[test]
fn data_free_compensation_moves_the_constant_part_into_the_next_bias() {
    let original = dead_channel_chain(0.7);
    let x = random_input(&original, 1, 1.0, 2);
    let expected = run(&original, &x);
    let opts = PruneOptions { ratio: Some(0.34), ..Default::default() };
    let mut with = original.clone();
    run_passes(&mut with, &[prune(opts.clone())]);
    let mut without = original.clone();
    run_passes(&mut without, &[prune(PruneOptions { compensate: false, ..opts })]);
    assert!(rel_diff(&expected, &run(&with, &x)) < 1e-5);
    assert!(rel_diff(&expected, &run(&without, &x)) > 1e-2, "without compensation ReLU(0.7) is lost");
}

/// x → stem → [conv1 ⊕ conv2] → relu → [conv3 ⊕ identity] → relu → gap → flatten → fc
fn residual_stage() -> Model {
    let mut net = Net::new(9).input("x", &[1, 3, 8, 8]);
    let stem = net.conv("stem", "x", ConvSpec::new(3, 4, 3));
    let c1 = net.conv("c1", &stem, ConvSpec::new(4, 8, 3));
    let c2 = net.conv("c2", &stem, ConvSpec::new(4, 8, 1));
    let add = net.op("Add", "add1", &[&c1, &c2]);
    let r1 = net.op("Relu", "r1", &[&add]);
    let c3 = net.conv("c3", &r1, ConvSpec::new(8, 8, 3));
    let add2 = net.op("Add", "add2", &[&c3, &r1]);
    let r2 = net.op("Relu", "r2", &[&add2]);
    let gap = net.op("GlobalAveragePool", "gap", &[&r2]);
    let flat = net.op("Flatten", "flat", &[&gap]);
    let w = net.weight("fc.w", &[5, 8], 0.3);
    let mut fc = Node::new("Gemm", "fc", &[&flat, &w], &["logits"]);
    fc.set_attr_int("transB", 1);
    let y = net.node(fc);
    net.model(&[&y]).unwrap()
}

fn same_class(cg: &ChannelGraph, a: &str, b: &str, c: usize) -> bool {
    cg.find(cg.slot(a, c).unwrap()) == cg.find(cg.slot(b, c).unwrap())
}

#[test]
fn dependency_ties_the_residual_stream_through_adds_and_flatten() {
    let m = residual_stage();
    let shapes = cresnet_opt::shape::infer(&m.graph, &Default::default()).unwrap();
    let cg = ChannelGraph::build(&m.graph, &shapes);
    for t in ["c2", "add1", "r1", "c3", "add2", "r2", "gap", "flat"] {
        assert!(same_class(&cg, "c1", t, 3), "c1 and {t} channel 3 are tied");
    }
    assert_ne!(cg.find(cg.slot("c1", 3).unwrap()), cg.find(cg.slot("c1", 4).unwrap()), "channels stay distinct");
    assert!(!same_class(&cg, "stem", "c1", 1), "conv input and output are independent");
    assert!(cg.is_blocked(cg.slot("logits", 0).unwrap(), &cg.blocked_roots()), "graph output blocks");
    assert!(!cg.is_blocked(cg.slot("c1", 0).unwrap(), &cg.blocked_roots()));
}

#[test]
fn pruning_a_residual_stage_keeps_adds_consistent_and_runs() {
    let original = residual_stage();
    let mut pruned = original.clone();
    let r = run_passes(&mut pruned, &[prune(PruneOptions { ratio: Some(0.5), ..Default::default() })]).remove(0);
    let w = pruned.graph.weights();
    assert_eq!(w["stem.w"].shape()[0], 2);
    assert_eq!((w["c1.w"].shape()[0], w["c2.w"].shape()[0], w["c3.w"].shape()[0], w["c3.w"].shape()[1]), (4, 4, 4, 4));
    assert_eq!(w["fc.w"].shape(), vec![5, 4], "the Gemm loses the matching input columns");
    assert!(r.params_after < r.params_before);
    let x = random_input(&original, 1, 1.0, 5);
    assert_eq!(run(&pruned, &x).shape(), &[1, 5]);
}

#[test]
fn inner_scope_leaves_the_residual_stream() {
    let mut m = residual_stage();
    run_passes(&mut m, &[prune(PruneOptions { ratio: Some(0.5), scope: Scope::Inner, ..Default::default() })]);
    assert_eq!(m.graph.weights()["c1.w"].shape()[0], 8);
    assert_eq!(m.graph.weights()["stem.w"].shape()[0], 2);
}

#[test]
fn resolution_bounds_prune_only_the_groups_within_them() {
    // residual_stage: stem and stream at 8 px; the stream also spans the
    // pooled (1 px) and flattened tensors, so `min_resolution: 8` keeps it.
    let prune_in = |min: Option<usize>, max: Option<usize>| {
        let mut m = residual_stage();
        let opts = PruneOptions { ratio: Some(0.5), min_resolution: min, max_resolution: max, ..Default::default() };
        let r = run_passes(&mut m, &[prune(opts)]).remove(0);
        let w = m.graph.weights();
        (w["stem.w"].shape()[0], w["c1.w"].shape()[0], r.params_after == r.params_before)
    };
    assert_eq!(prune_in(Some(8), None), (2, 8, false), "only the stem's group lies wholly at >= 8 px");
    assert_eq!(prune_in(None, Some(7)), (4, 8, true), "no group lies wholly at <= 7 px");
    assert_eq!(prune_in(Some(1), Some(8)), (2, 4, false), "every group lies within 1..=8 px");
    let bad = PruneOptions { ratio: Some(0.5), min_resolution: Some(9), max_resolution: Some(8), ..Default::default() };
    let err = <cresnet_opt::passes::prune::Prune as cresnet_opt::passes::Pass>::validate(&bad).unwrap_err().to_string();
    assert!(err.contains("`prune.min_resolution` is 9, above `prune.max_resolution` (8)"), "{err}");
}

#[test]
fn concat_ties_channels_with_offsets() {
    let mut net = Net::new(4).input("x", &[1, 3, 6, 6]);
    let a = net.conv("a", "x", ConvSpec::new(3, 4, 3));
    let b = net.conv("b", "x", ConvSpec::new(3, 2, 1));
    let mut cat = Node::new("Concat", "cat", &[&a, &b], &["cat"]);
    cat.set_attr_int("axis", 1);
    let c = net.node(cat);
    let y = net.conv("c", &c, ConvSpec::new(6, 5, 1));
    let m = net.model(&[&y]).unwrap();
    let shapes = cresnet_opt::shape::infer(&m.graph, &Default::default()).unwrap();
    let cg = ChannelGraph::build(&m.graph, &shapes);
    let root = |t: &str, c: usize| cg.find(cg.slot(t, c).unwrap());
    assert_eq!(root("a", 3), root("cat", 3));
    assert_eq!(root("b", 0), root("cat", 4));
    assert_eq!(root("b", 1), root("cat", 5));
    let mut pruned = m.clone();
    run_passes(&mut pruned, &[prune(PruneOptions { ratio: Some(0.5), ..Default::default() })]);
    assert_eq!(
        pruned.graph.weights()["c.w"].shape()[1],
        pruned.graph.weights()["a.w"].shape()[0] + pruned.graph.weights()["b.w"].shape()[0]
    );
    let x = random_input(&m, 1, 1.0, 5);
    assert_eq!(run(&pruned, &x).shape(), &[1, 5, 6, 6]);
}

#[test]
fn depthwise_conv_ties_input_and_output_and_unknown_ops_block() {
    let mut net = Net::new(4).input("x", &[1, 3, 6, 6]);
    let a = net.conv("a", "x", ConvSpec::new(3, 4, 1));
    let d = net.conv("d", &a, ConvSpec { group: 4, ..ConvSpec::new(4, 4, 3) });
    let b = net.conv("b", &d, ConvSpec::new(4, 6, 1));
    let mut odd = Node::new("MysteryOp", "odd", &[&b], &["odd"]);
    odd.proto.domain = Some("com.example".into());
    let o = net.node(odd);
    let y = net.conv("c", &o, ConvSpec::new(6, 2, 1));
    let m = net.model(&[&y]).unwrap();
    let shapes = cresnet_opt::shape::infer(&m.graph, &Default::default()).unwrap();
    let cg = ChannelGraph::build(&m.graph, &shapes);
    assert_eq!(cg.find(cg.slot("a", 2).unwrap()), cg.find(cg.slot("d", 2).unwrap()));
    let blocked = cg.blocked_roots();
    assert!(cg.is_blocked(cg.slot("b", 0).unwrap(), &blocked), "the unknown op blocks its input channels");
    assert!(!cg.is_blocked(cg.slot("a", 0).unwrap(), &blocked));
    let mut pruned = m.clone();
    let r = run_passes(&mut pruned, &[prune(PruneOptions { ratio: Some(0.5), ..Default::default() })]).remove(0);
    assert_eq!(pruned.graph.weights()["d.w"].shape(), vec![2, 1, 3, 3]);
    assert_eq!(pruned.graph.node(pruned.graph.find_node("d").unwrap()).attr_int("group"), Some(2));
    assert_eq!(pruned.graph.weights()["b.w"].shape(), vec![6, 2, 1, 1], "blocked outputs stay whole");
    assert!(r.declined.iter().any(|d| d.reason.contains("MysteryOp `odd`")), "{:?}", r.declined);
}

#[test]
fn target_macs_is_met_on_the_fixture_and_the_result_runs() {
    let original = resnet50(&FixtureSpec { input_size: 64, classes: 10, ..Default::default() }).unwrap();
    for target in [0.9, 0.7, 0.5] {
        let mut m = original.clone();
        let r = run_passes(&mut m, &[fold(), prune(PruneOptions { target_macs: Some(target), round_to: 2, ..Default::default() })]);
        let share = r[1].macs_after as f64 / r[1].macs_before as f64;
        assert!(share <= target + 1e-9 && share > target - 0.06, "target {target}: got {share}");
        let x = random_input(&original, 1, 1.0, 5);
        assert_eq!(run(&m, &x).shape(), &[1, 10]);
        for (name, w) in m.graph.weights() {
            if name.ends_with(".weight") && w.shape().len() == 4 && name != "conv1.weight" {
                assert_eq!(w.shape()[0] % 2, 0, "{name} {:?} is a multiple of round_to", w.shape());
            }
        }
    }
}

#[test]
fn uniform_allocation_removes_the_same_share_of_every_inner_group() {
    let original = resnet50(&FixtureSpec { input_size: 64, classes: 10, ..Default::default() }).unwrap();
    let mut m = original.clone();
    let opts = PruneOptions {
        target_macs: Some(0.8),
        scope: cresnet_opt::passes::prune::Scope::Inner,
        allocation: cresnet_opt::passes::prune::Allocation::Uniform,
        ..Default::default()
    };
    let r = run_passes(&mut m, &[fold(), prune(opts)]);
    let share = r[1].macs_after as f64 / r[1].macs_before as f64;
    assert!(share <= 0.8 + 1e-9 && share > 0.74, "got {share}");
    // Every bottleneck conv's output channels (inner groups): kept = n - floor(r·n) for one r.
    let kept: Vec<(usize, usize)> = original
        .graph
        .weights()
        .iter()
        .filter(|(name, _)| {
            ["branch2a.weight", "branch2b.weight"].iter().any(|s| name.ends_with(s))
                || (name.starts_with("layer") && (name.ends_with("conv1.weight") || name.ends_with("conv2.weight")))
        })
        .map(|(name, w)| (w.shape()[0], m.graph.weights()[name].shape()[0]))
        .collect();
    assert!(kept.len() >= 32, "{} inner convs", kept.len());
    let ratios: Vec<f64> = kept.iter().map(|&(n, k)| (n - k) as f64 / n as f64).collect();
    let (lo, hi) = ratios.iter().fold((1.0f64, 0.0f64), |(a, b), &r| (a.min(r), b.max(r)));
    let widest = kept.iter().map(|k| k.0).max().unwrap() as f64;
    assert!(hi - lo < 1.0 / (widest / 8.0), "shares removed range {lo}..{hi}");
    assert!(lo > 0.1, "something was removed everywhere: {ratios:?}");
}

#[test]
fn zero_weights_everywhere_in_a_group_prune_exactly_on_a_residual_stage() {
    let original = residual_stage();
    let mut m = original.clone();
    // Kill residual-stream channel 6 in every producer (c1, c2, c3).
    for name in ["c1", "c2", "c3"] {
        let w = m.graph.weight_mut(&format!("{name}.w")).unwrap().as_f32_mut().unwrap();
        w.slice_mut(s![6, .., .., ..]).fill(0.0);
        m.graph.weight_mut(&format!("{name}.b")).unwrap().as_f32_mut().unwrap()[[6]] = 0.0;
    }
    let x = random_input(&original, 1, 1.0, 6);
    let before = run(&m, &x);
    let mut pruned = m.clone();
    run_passes(&mut pruned, &[prune(PruneOptions { ratio: Some(0.125), ignore: vec!["stem".into()], ..Default::default() })]);
    assert_eq!(pruned.graph.weights()["c3.w"].shape()[..2], [7, 7]);
    assert_eq!(pruned.graph.weights()["stem.w"].shape()[0], 4, "ignored");
    let d = rel_diff(&before, &run(&pruned, &x));
    assert!(d < 1e-5, "rel diff {d}");
}

#[test]
fn split_layout_computes_what_the_grouped_layout_computes() {
    let original = resnet50(&FixtureSpec { input_size: 64, classes: 10, ..Default::default() }).unwrap();
    let x = random_input(&original, 1, 1.0, 9);
    for rank in [2, 3] {
        let with = |layout| {
            let mut m = original.clone();
            let opts = cresnet_opt::passes::dw::DwOptions { rank: Some(rank), min_gain: -10.0, layout, ..Default::default() };
            run_passes(&mut m, &[fold(), cresnet_opt::passes::PassSpec::Dw(opts)]);
            m
        };
        let (grouped, split) = (with(cresnet_opt::passes::dw::DwLayout::Grouped), with(cresnet_opt::passes::dw::DwLayout::Split));
        let d = rel_diff(&run(&grouped, &x), &run(&split, &x));
        assert!(d < 1e-5, "rank {rank}: {d}");
        let count =
            |m: &cresnet_opt::ir::Model, op: &str| m.graph.node_indices().into_iter().filter(|&ix| m.graph.node(ix).op() == op).count();
        // 16 factorized 3x3 convs: each becomes `rank` depthwise + `rank` pointwise convs and rank-1 Adds.
        assert_eq!(count(&split, "Conv") - count(&grouped, "Conv"), 16 * 2 * (rank - 1));
        assert_eq!(count(&split, "Add") - count(&grouped, "Add"), 16 * (rank - 1));
        let depthwise_groups_match =
            split.graph.node_indices().into_iter().map(|ix| split.graph.node(ix)).filter(|n| n.attr_int("group").unwrap_or(1) > 1).all(
                |n| {
                    let w = split.graph.constant(n.input(1).unwrap()).unwrap().shape();
                    w[0] as i64 == n.attr_int("group").unwrap()
                },
            );
        assert!(depthwise_groups_match, "every split depthwise conv has group == channels");
    }
}
