//! The training engine: forward equals tract, gradients equal finite differences.
mod common;
use common::*;
use cresnet_opt::fixture::{ConvSpec, Net, Rng};
use cresnet_opt::ir::{Model, Node};
use cresnet_opt::train::Network;

fn network(model: &Model) -> Network {
    let shapes = cresnet_opt::validate::validate(&model.graph, &Default::default()).expect("valid");
    Network::from_graph(&model.graph, &shapes).expect("the engine supports the graph")
}

/// Every op of the engine: strided, padded, dilated, depthwise and pointwise
/// convs, maxpool, a residual Add, GAP, Flatten and a Gemm.
fn tiny() -> Model {
    let mut net = Net::new(7).input("x", &[1, 3, 13, 11]);
    let c1 = net.conv("c1", "x", ConvSpec { stride: 2, ..ConvSpec::new(3, 8, 3) });
    let r1 = net.op("Relu", "r1", &[&c1]);
    let mut pool = Node::new("MaxPool", "pool", &[&r1], &["pool"]);
    pool.set_attr_ints("kernel_shape", &[3, 3]);
    pool.set_attr_ints("strides", &[2, 2]);
    pool.set_attr_ints("pads", &[1, 1, 1, 1]);
    let p = net.node(pool);
    let d = net.conv("dw", &p, ConvSpec { pad: 2, dilation: 2, group: 8, ..ConvSpec::new(8, 16, 3) });
    let r2 = net.op("Relu", "r2", &[&d]);
    let pw = net.conv("pw", &r2, ConvSpec { bias: false, ..ConvSpec::new(16, 8, 1) });
    let add = net.op("Add", "add", &[&pw, &p]);
    let r3 = net.op("Relu", "r3", &[&add]);
    let gap = net.op("GlobalAveragePool", "gap", &[&r3]);
    let flat = net.op("Flatten", "flat", &[&gap]);
    let w = net.weight("fc.w", &[5, 8], 0.5);
    let b = net.weight("fc.b", &[5], 0.1);
    let mut gemm = Node::new("Gemm", "fc", &[&flat, &w, &b], &["y"]);
    gemm.set_attr_int("transB", 1);
    net.node(gemm);
    net.model(&["y"]).expect("model")
}

/// A linear Resize (the `resize` pass's node, half_pixel) of the input,
/// down, and one between two convs, down in H and up in W.
fn resized() -> Model {
    let mut net = Net::new(3).input("x", &[1, 3, 12, 10]);
    let resize = |net: &mut Net, name: &str, x: &str, sh: f32, sw: f32| {
        let scales = format!("{name}.scales");
        net.set_weight(&scales, ndarray::arr1(&[1.0, 1.0, sh, sw]).into_dyn());
        let mut node = Node::new("Resize", name, &[x, "", &scales], &[name]);
        node.set_attr_str("mode", "linear");
        node.set_attr_str("coordinate_transformation_mode", "half_pixel");
        net.node(node)
    };
    // 10 × 0.7f32 is 7 in f32 (tract's arithmetic) but 6.99999… in f64.
    let r0 = resize(&mut net, "r0", "x", cresnet_opt::passes::resize::scale_for(12, 9), 0.7);
    let c1 = net.conv("c1", &r0, ConvSpec::new(3, 6, 3));
    let r1 = resize(&mut net, "r1", &c1, 0.6, 1.7);
    let a = net.op("Relu", "a", &[&r1]);
    let c2 = net.conv("c2", &a, ConvSpec { pad: 0, ..ConvSpec::new(6, 4, 1) });
    let gap = net.op("GlobalAveragePool", "gap", &[&c2]);
    let flat = net.op("Flatten", "flat", &[&gap]);
    let w = net.weight("fc.w", &[5, 4], 0.5);
    let mut gemm = Node::new("Gemm", "fc", &[&flat, &w], &["y"]);
    gemm.set_attr_int("transB", 1);
    net.node(gemm);
    net.model(&["y"]).expect("model")
}

#[test]
fn linear_resize_matches_tract() {
    let diff = engine_vs_tract(&resized(), 2, 1.0, 5);
    assert!(diff < 1e-5, "engine vs tract: relative difference {diff}");
}

#[test]
fn gradients_through_a_linear_resize_match_finite_differences() {
    // c1's weight and bias, c2's weight and bias, fc's weight.
    check_gradients_of(&resized(), network(&resized()), 5);
}

#[test]
fn forward_matches_tract_on_the_fixture() {
    let mut model = cresnet_opt::io::load(&fixture_path()).expect("fixture loads");
    run_passes(&mut model, &[fold()]);
    let diff = engine_vs_tract(&model, 2, 50.0, 3);
    assert!(diff < 1e-5, "engine vs tract: relative difference {diff}");
}

#[test]
fn forward_matches_tract_on_every_op() {
    let diff = engine_vs_tract(&tiny(), 3, 1.0, 5);
    assert!(diff < 1e-5, "engine vs tract: relative difference {diff}");
}

/// L = Σ c·y for fixed random c: dL/dy = c.
fn loss(net: &Network, x: &[f32], c: &[f32]) -> f64 {
    let acts = net.forward(x.to_vec(), 2).unwrap();
    acts.value(net.output()).iter().zip(c).map(|(&y, &c)| y as f64 * c as f64).sum()
}

#[test]
fn gradients_match_finite_differences() {
    check_gradients(network(&tiny()), 7);
}

#[test]
fn gradients_with_training_mode_batchnorm_match_finite_differences() {
    let model = tiny();
    let shapes = cresnet_opt::validate::validate(&model.graph, &Default::default()).unwrap();
    let mut net = Network::with_batchnorm(&model.graph, &shapes).unwrap();
    // Non-trivial γ and β.
    let mut rng = Rng::new(4);
    for p in net.params.iter_mut().filter(|p| p.name.ends_with("bn.gamma") || p.name.ends_with("bn.beta")) {
        p.data.iter_mut().for_each(|v| *v += 0.5 * rng.normal());
    }
    check_gradients(net, 7 + 3 * 4);
}

#[test]
fn batchnorm_folds_back_into_the_convs() {
    let model = tiny();
    let shapes = cresnet_opt::validate::validate(&model.graph, &Default::default()).unwrap();
    let mut net = Network::with_batchnorm(&model.graph, &shapes).unwrap();
    let x = random_input(&model, 3, 1.0, 5);
    let xs = x.as_slice().unwrap().to_vec();
    net.init_batchnorm(std::iter::once((xs.clone(), 3))).unwrap();
    // Initialized to the identity: evaluation equals the plain network.
    let eval = net.forward_mode(xs.clone(), 3, cresnet_opt::train::Mode::Eval).unwrap();
    let plain_net = network(&model);
    let plain = plain_net.forward(xs.clone(), 3).unwrap();
    let (a, b) = (eval.value(net.output()), plain.value(plain_net.output()));
    let d = a.iter().zip(b.iter()).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
    assert!(d < 1e-4, "identity BN changed the output by {d}");
    // After a change of every BN, the folded graph computes what evaluation mode does.
    let mut rng = Rng::new(8);
    for p in net.params.iter_mut().filter(|p| p.name.contains("\u{0}bn.")) {
        p.data.iter_mut().for_each(|v| *v = (*v + 0.3 * rng.normal()).abs());
    }
    let eval = net.forward_mode(xs, 3, cresnet_opt::train::Mode::Eval).unwrap();
    let mut folded = model.clone();
    net.write_back(&mut folded.graph);
    let expected = ndarray::ArrayD::from_shape_vec(vec![3, 5], eval.value(net.output()).to_vec()).unwrap();
    let d = rel_diff(&expected, &run(&folded, &x));
    assert!(d < 1e-5, "folded graph vs evaluation mode: {d}");
}

fn check_gradients(net: Network, params: usize) {
    check_gradients_of(&tiny(), net, params)
}

fn check_gradients_of(model: &Model, mut net: Network, params: usize) {
    let x = random_input(model, 2, 1.0, 9).as_slice().unwrap().to_vec();
    let mut rng = Rng::new(11);
    let c: Vec<f32> = (0..2 * net.output_len()).map(|_| rng.normal()).collect();
    let mut acts = net.forward(x.clone(), 2).unwrap();
    let grads = net.backward(&mut acts, vec![(net.output(), c.clone())]);
    assert_eq!(grads.len(), params);
    let trainable: Vec<bool> = net.params.iter().map(|p| p.trainable).collect();
    for (i, g) in grads.iter().enumerate().filter(|(i, _)| trainable[*i]) {
        // Directional derivative along a random unit direction, central differences.
        let dir: Vec<f32> = (0..g.len()).map(|_| rng.normal()).collect();
        let norm = dir.iter().map(|d| d * d).sum::<f32>().sqrt();
        let analytic: f64 = g.iter().zip(&dir).map(|(g, d)| (g * d / norm) as f64).sum();
        let eps = 1e-3;
        let original = net.params[i].data.clone();
        let shifted = |s: f32| original.iter().zip(&dir).map(|(w, d)| w + s * eps * d / norm).collect::<Vec<f32>>();
        net.params[i].data = shifted(1.0);
        let up = loss(&net, &x, &c);
        net.params[i].data = shifted(-1.0);
        let down = loss(&net, &x, &c);
        net.params[i].data = original;
        let numeric = (up - down) / (2.0 * eps as f64);
        // A conv bias before a training-mode BN has gradient 0, where the
        // central difference of the f32 loss shows noise up to ~1.5e-4 (the
        // value depends on the kernels' summation order): small gradients
        // are compared in absolute terms (5e-4).
        let err = (numeric - analytic).abs() / analytic.abs().max(5e-2);
        assert!(err < 1e-2, "param `{}`: analytic {analytic:.6} vs numeric {numeric:.6}", net.params[i].name);
    }
}

/// The engine reuses the buffers of earlier steps without zeroing them
/// (every kernel writes all of its outputs): with every reused buffer
/// filled with NaN first, two steps give what they give without, and a
/// step after another exactly what the same step gives on a fresh network.
#[test]
fn reused_buffers_are_written_before_they_are_read() {
    let mut model = cresnet_opt::io::load(&fixture_path()).expect("fixture loads");
    run_passes(&mut model, &[fold(), dw(1)]);
    let shapes = cresnet_opt::validate::validate(&model.graph, &Default::default()).expect("valid");
    let step = |net: &Network, seed: u64| {
        let x = random_input(&model, 4, 50.0, seed).as_slice().unwrap().to_vec();
        let mut acts = net.forward(x, 4).unwrap();
        let logits = acts.value(net.output()).to_vec();
        let seeds: Vec<f32> = logits.iter().map(|v| v * 1e-3).collect();
        (logits, net.backward(&mut acts, vec![(net.output(), seeds)]))
    };
    for with_bn in [false, true] {
        let make = || if with_bn { Network::with_batchnorm(&model.graph, &shapes).unwrap() } else { network(&model) };
        let (plain, poisoned, fresh) = (make(), make(), make());
        poisoned.poison_reused_buffers();
        let (first, first_poisoned) = (step(&plain, 1), step(&poisoned, 1));
        let (second, second_poisoned) = (step(&plain, 2), step(&poisoned, 2));
        for (a, b) in [(&first, &first_poisoned), (&second, &second_poisoned)] {
            assert!(b.0.iter().chain(b.1.iter().flatten()).all(|v| v.is_finite()), "a kernel read an unwritten value (BN: {with_bn})");
            assert!(a.0 == b.0 && a.1 == b.1, "poisoned buffers changed a result (BN: {with_bn})");
        }
        let expected = step(&fresh, 2);
        assert!(
            second.0 == expected.0 && second.1 == expected.1,
            "a step after another differs from it on a fresh network (BN: {with_bn})"
        );
    }
}

/// The pool keeps one step's buffers: it must not grow over forward-only
/// rounds (BN re-estimation, hold-out scoring) nor over training steps.
#[test]
fn the_buffer_pool_does_not_grow_from_step_to_step() {
    let mut model = cresnet_opt::io::load(&fixture_path()).expect("fixture loads");
    run_passes(&mut model, &[fold()]);
    let net = network(&model);
    let x = random_input(&model, 4, 50.0, 1).as_slice().unwrap().to_vec();
    let forward_only = |rounds: usize| {
        for _ in 0..rounds {
            drop(net.forward(x.clone(), 4).unwrap());
        }
        net.pooled_values()
    };
    // The buffers settle after a few rounds (which one a value takes
    // depends on what the round before left), then stay.
    let settled = forward_only(6);
    assert!(settled > 0, "nothing pooled");
    assert_eq!(forward_only(6), settled, "forward-only rounds grow the pool");
    let train = |rounds: usize| {
        for _ in 0..rounds {
            let mut acts = net.forward(x.clone(), 4).unwrap();
            let seeds = vec![1e-3; 4 * net.output_len()];
            drop(net.backward(&mut acts, vec![(net.output(), seeds)]));
        }
        net.pooled_values()
    };
    let settled = train(4);
    assert_eq!(train(4), settled, "training steps grow the pool");
}

#[test]
fn the_step_profile_counts_every_step_of_a_profiled_round_only() {
    let mut model = cresnet_opt::io::load(&fixture_path()).expect("fixture loads");
    run_passes(&mut model, &[fold()]);
    let convs = model.graph.nodes().filter(|n| n.op() == "Conv").count();
    let net = network(&model);
    let x = random_input(&model, 2, 50.0, 1).as_slice().unwrap().to_vec();
    let step = || {
        let mut acts = net.forward(x.clone(), 2).unwrap();
        drop(net.backward(&mut acts, vec![(net.output(), vec![1e-3; 2 * net.output_len()])]));
    };
    step();
    assert!(net.step_times().is_empty(), "timed while the profile was off");
    net.profile(true);
    step();
    step();
    net.profile(false);
    step();
    let rows = net.step_times();
    let conv_steps: usize = rows.iter().filter(|r| r.0.starts_with("Conv")).map(|r| r.3).sum();
    assert_eq!(conv_steps, 2 * convs, "{rows:?}");
    assert!(rows.iter().all(|r| r.1 > 0.0 && r.2 >= 0.0), "{rows:?}");
    assert!(rows.iter().any(|r| r.0 == "Add+Relu"), "the fixture's residual Add+Relu is fused: {rows:?}");
    assert!(net.step_times().is_empty(), "step_times clears the sums");
}

/// Weights packed for bf16 (a teacher's) are bf16 operands: a forward in
/// bf16 reads them, and after `set_precision(F32)` the network is an f32
/// one again, bit for bit (the packed copy is dropped, not used).
#[test]
fn packed_weights_serve_bf16_only() {
    use cresnet_opt::train::kernels::{bf16_available, Precision};
    if !bf16_available() {
        eprintln!("skipped: no AVX512-BF16 on this CPU");
        return;
    }
    let model = tiny();
    let mut rng = Rng::new(4);
    let (f32_net, mut net) = (network(&model), network(&model));
    let x: Vec<f32> = (0..3 * f32_net.input_len()).map(|_| rng.normal()).collect();
    let out = |net: &Network| net.forward(x.as_slice(), 3).unwrap().value(net.output()).into_owned();
    let want = out(&f32_net);
    net.set_precision(Precision::Bf16).unwrap();
    let bf16 = out(&net);
    net.pack_weights();
    assert_eq!(out(&net), bf16, "packed weights give the bf16 products' values");
    assert_ne!(bf16, want, "bf16 products round their operands");
    net.set_precision(Precision::F32).unwrap();
    assert_eq!(out(&net), want, "after set_precision(F32), f32 products");
}
