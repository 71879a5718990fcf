//! Property tests on random small graphs of Conv (any kernel, stride, pad,
//! dilation, depthwise) / BN / Relu / residual Add / pooling: `fold` is
//! exact, `dw` at full rank is exact, pruning all-zero channels is exact,
//! and every result validates and runs in tract.
mod common;
use common::*;
use cresnet_opt::fixture::{ConvSpec, Net};
use cresnet_opt::ir::{Model, Node};
use cresnet_opt::passes::prune::PruneOptions;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Block {
    k: usize,
    stride: usize,
    pad: usize,
    dilation: usize,
    depthwise: bool,
    c_out: usize,
    bn: bool,
    relu: bool,
    residual: bool,
    pool: Option<&'static str>,
}

fn block() -> impl Strategy<Value = Block> {
    (
        prop_oneof![Just(1usize), Just(3), Just(5)],
        1..=2usize,
        0..=2usize,
        1..=2usize,
        any::<bool>(),
        prop_oneof![Just(6usize), Just(9)],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(None), Just(Some("MaxPool")), Just(Some("AveragePool"))],
    )
        .prop_map(|(k, stride, pad, dilation, depthwise, c_out, bn, relu, residual, pool)| Block {
            k,
            stride,
            pad: pad.min(k / 2 * dilation),
            dilation,
            depthwise,
            c_out,
            bn,
            relu,
            residual,
            pool,
        })
}

/// Builds the graph; blocks that do not fit the current map are narrowed to
/// a 1x1 conv. Returns the model and the name of every conv.
fn build(c_in: usize, size: usize, blocks: &[Block], seed: u64) -> (Model, Vec<String>) {
    let mut net = Net::new(seed).input("x", &[1, c_in, size, size]);
    let (mut x, mut c, mut h) = ("x".to_string(), c_in, size);
    let mut convs = vec![];
    for (i, b) in blocks.iter().enumerate() {
        let span = b.dilation * (b.k - 1) + 1;
        let fits = h + 2 * b.pad >= span;
        let (k, pad, dilation) = if fits { (b.k, b.pad, b.dilation) } else { (1, 0, 1) };
        let group = if b.depthwise && c == b.c_out { c } else { 1 };
        let spec = ConvSpec { stride: b.stride, pad, dilation, group, ..ConvSpec::new(c, b.c_out, k) };
        let name = format!("conv{i}");
        let mut y = net.conv(&name, &x, spec);
        convs.push(name);
        let ho = (h + 2 * pad - (dilation * (k - 1) + 1)) / b.stride + 1;
        if b.bn {
            y = net.bn(&format!("bn{i}"), &y, b.c_out);
        }
        if b.residual && ho == h && b.c_out == c {
            y = net.op("Add", &format!("add{i}"), &[&y, &x]);
        }
        if b.relu {
            y = net.op("Relu", &format!("relu{i}"), &[&y]);
        }
        h = ho;
        if let Some(op) = b.pool.filter(|_| h >= 2) {
            let mut node = Node::new(op, &format!("pool{i}"), &[&y], &[&format!("pool{i}")]);
            node.set_attr_ints("kernel_shape", &[2, 2]);
            node.set_attr_ints("strides", &[2, 2]);
            y = net.node(node);
            h /= 2;
        }
        (x, c) = (y, b.c_out);
    }
    // A 1x1 head: its output (a graph output) blocks pruning, its input does not.
    let head = net.conv("head", &x, ConvSpec::new(c, 5, 1));
    (net.model(&[&head]).expect("valid model"), convs)
}

fn graph() -> impl Strategy<Value = (usize, usize, Vec<Block>, u64)> {
    (1..=4usize, 6..=14usize, prop::collection::vec(block(), 1..=4), any::<u64>())
}

fn check_equivalent(original: &Model, changed: &Model, tolerance: f64) -> Result<(), TestCaseError> {
    cresnet_opt::validate::validate(&changed.graph, &Default::default())
        .map_err(|e| TestCaseError::fail(format!("invalid result: {e}")))?;
    let x = random_input(original, 2, 1.0, 17);
    let d = rel_diff(&run(original, &x), &run(changed, &x));
    prop_assert!(d < tolerance, "relative difference {d}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn fold_is_exact((c_in, size, blocks, seed) in graph()) {
        let (original, _) = build(c_in, size, &blocks, seed);
        let mut folded = original.clone();
        run_passes(&mut folded, &[fold()]);
        prop_assert!(folded.graph.node_indices().iter().all(|&ix| folded.graph.node(ix).op() != "BatchNormalization"));
        check_equivalent(&original, &folded, 1e-4)?;
    }

    #[test]
    fn dw_at_full_rank_is_exact((c_in, size, blocks, seed) in graph()) {
        let (original, _) = build(c_in, size, &blocks, seed);
        let mut factorized = original.clone();
        run_passes(&mut factorized, &[dw_all(25)]);
        let dense_kxk = ops(&original, |g, ix| g.node(ix).attr_int("group").unwrap_or(1) == 1 && g.node(ix).attr_ints("kernel_shape").is_some_and(|k| k[0] > 1));
        prop_assert_eq!(ops(&factorized, |_, _| true), ops(&original, |_, _| true) + dense_kxk, "each dense KxK conv becomes two");
        check_equivalent(&original, &factorized, 1e-4)?;
    }

    #[test]
    fn pruning_all_zero_channels_is_exact((c_in, size, blocks, seed) in graph()) {
        let (mut original, convs) = build(c_in, size, &blocks, seed);
        // Channels 1, 4, 7 of every conv and BN output are exactly zero.
        for name in &convs {
            zero_channels(&mut original, &format!("{name}.w"), 0);
            zero_channels(&mut original, &format!("{name}.b"), 0);
        }
        for i in 0..blocks.len() {
            for p in ["b", "m"] {
                zero_channels(&mut original, &format!("bn{i}.{p}"), 0);
            }
        }
        let mut pruned = original.clone();
        run_passes(&mut pruned, &[prune(PruneOptions { ratio: Some(1.0 / 3.0), compensate: false, ..Default::default() })]);
        // Every block conv loses its zero channels (the head's output is a graph output).
        for name in &convs {
            let (before, after) = (original.graph.weights()[&format!("{name}.w")].shape()[0], pruned.graph.weights()[&format!("{name}.w")].shape()[0]);
            prop_assert_eq!(after, before - before / 3, "conv {}", name);
        }
        check_equivalent(&original, &pruned, 1e-5)?;
    }
}

/// Conv nodes of `model` that satisfy `pred`.
fn ops(model: &Model, pred: impl Fn(&cresnet_opt::ir::Graph, petgraph::stable_graph::NodeIndex) -> bool) -> usize {
    let g = &model.graph;
    g.node_indices().into_iter().filter(|&ix| g.node(ix).op() == "Conv" && pred(g, ix)).count()
}

/// Zeroes slices 1, 4, 7 along `axis` of weight `name` (if it exists).
fn zero_channels(model: &mut Model, name: &str, axis: usize) {
    let Some(w) = model.graph.weight_mut(name).and_then(|w| w.as_f32_mut()) else { return };
    for c in (1..w.shape()[axis]).step_by(3) {
        w.index_axis_mut(ndarray::Axis(axis), c).fill(0.0);
    }
}
