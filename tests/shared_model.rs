//! Tests on the real ResNet-50 in ../shared. Ignored in a plain `cargo test`;
//! `.ci/run` runs them with `--include-ignored`.
mod common;
use common::*;
use cresnet_opt::passes::prune::PruneOptions;

fn load() -> cresnet_opt::ir::Model {
    cresnet_opt::io::load(&shared_model()).expect("../shared/models/resnet50-imagenet.onnx")
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn fold_removes_every_bn_and_keeps_the_logits() {
    let original = load();
    let mut folded = original.clone();
    let r = run_passes(&mut folded, &[fold()]).remove(0);
    assert_eq!(r.changed.len(), 53);
    assert_eq!(r.params_after, 25_530_472);
    assert_eq!(folded.graph.nodes().filter(|n| n.op() == "BatchNormalization").count(), 0);
    let x = random_input(&original, 2, 120.0, 3);
    let d = rel_diff(&run(&original, &x), &run(&folded, &x));
    assert!(d < 1e-5, "rel diff {d}");
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn dw_rank9_reproduces_the_logits() {
    let original = load();
    let mut m = original.clone();
    let r = run_passes(&mut m, &[fold(), dw(9)]);
    assert_eq!(r[1].changed.len(), 16);
    let x = random_input(&original, 1, 120.0, 4);
    let d = rel_diff(&run(&original, &x), &run(&m, &x));
    assert!(d < 1e-4, "rel diff {d}");
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn lowrank_at_full_rank_reproduces_the_logits_and_ratio_counts_exactly() {
    use cresnet_opt::passes::lowrank::LowrankOptions;
    use cresnet_opt::passes::PassSpec;
    let original = load();
    let mut m = original.clone();
    let full = PassSpec::Lowrank(LowrankOptions { rank: Some(4096), min_gain: -10.0, ..Default::default() });
    let r = run_passes(&mut m, &[fold(), full]);
    // 36 1x1 convs and the classifier.
    assert_eq!(r[1].changed.len(), 37);
    let x = random_input(&original, 1, 120.0, 6);
    let d = rel_diff(&run(&original, &x), &run(&m, &x));
    assert!(d < 1e-4, "rel diff {d}");
    let mut m = original.clone();
    let r = run_passes(&mut m, &[fold(), PassSpec::Lowrank(LowrankOptions { ratio: Some(0.265), ..Default::default() }), dw(1)]);
    // scripts/measure.sh fifth-lr-*: within the paper's 1/5 (5,127,342).
    assert_eq!(r[2].params_after, 5_067_818);
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn the_cresnet_recipe_keeps_at_most_a_fifth_of_the_weights() {
    use cresnet_opt::passes::PassSpec;
    let original = load();
    let recipe = cresnet_opt::config::shipped_pipeline("cresnet").unwrap().passes.unwrap();
    assert!(matches!(recipe.last(), Some(PassSpec::Distill(_))));
    // Everything but the training, data-free.
    let passes: Vec<PassSpec> = recipe.into_iter().filter(|p| !matches!(p, PassSpec::Distill(_))).collect();
    let mut m = original.clone();
    let r = run_passes(&mut m, &passes);
    let params = r.last().unwrap().params_after;
    assert!(params <= 25_636_712 / 5, "{params} weights");
    assert_eq!(params, 5_124_268);
    let x = random_input(&original, 1, 120.0, 8);
    assert_eq!(run(&m, &x).shape(), &[1, 1000]);
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn pruning_to_half_the_macs_validates_and_runs() {
    let original = load();
    let mut m = original.clone();
    let r = run_passes(&mut m, &[fold(), prune(PruneOptions { target_macs: Some(0.5), ..Default::default() })]);
    let share = r[1].macs_after as f64 / 3_857_973_248.0;
    assert!(share <= 0.5 && share > 0.49, "MACs share {share}");
    let x = random_input(&original, 1, 120.0, 5);
    assert_eq!(run(&m, &x).shape(), &[1, 1000]);
}

fn check_json(args: &[&str]) -> serde_json::Value {
    let o = bin().arg("check").args(args).args(["--format", "json", "--quiet"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn check_scores_the_shared_model_on_all_1000_images() {
    let data = shared().join("data");
    let v = check_json(&[
        shared_model().to_str().unwrap(),
        "--data",
        data.join("imagenet-1k-sample").to_str().unwrap(),
        "--classes",
        data.join("imagenet-1k-classes.txt").to_str().unwrap(),
    ]);
    assert_eq!(v["images"], 1000);
    let top1 = v["model"]["top1"].as_f64().unwrap();
    assert!((top1 - 0.908).abs() <= 0.015, "top-1 {top1}");
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn folded_model_agrees_with_the_original_on_real_images() {
    let dir = tempfile::tempdir().unwrap();
    let folded = dir.path().join("folded.onnx");
    let o = bin().arg(shared_model()).arg("-o").arg(&folded).args(["--passes", "fold", "--quiet"]).output().unwrap();
    assert!(o.status.success());
    let data = shared().join("data");
    let v = check_json(&[
        folded.to_str().unwrap(),
        "--reference",
        shared_model().to_str().unwrap(),
        "--data",
        data.join("imagenet-1k-sample").to_str().unwrap(),
        "--classes",
        data.join("imagenet-1k-classes.txt").to_str().unwrap(),
        "--limit",
        "100",
        "--min-agreement",
        "1.0",
        "--max-rel-diff",
        "1e-5",
    ]);
    assert_eq!(v["agreement"], 1.0);
    assert_eq!(v["model"], v["reference"]);
}

#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn animals10_zero_shot_with_the_label_map() {
    let data = shared().join("data");
    let v = check_json(&[
        shared_model().to_str().unwrap(),
        "--data",
        data.join("animals10-sample").to_str().unwrap(),
        "--label-map",
        data.join("animals10-imagenet-map.yaml").to_str().unwrap(),
    ]);
    assert_eq!(v["images"], 320);
    let top1 = v["model"]["top1"].as_f64().unwrap();
    assert!((top1 - 0.82).abs() < 0.03, "top-1 {top1}");
}

/// The training engine on the real compressed student: its forward matches
/// tract and its gradients match finite differences of the KD loss.
#[test]
#[ignore = "needs ../shared (run by .ci/run)"]
fn training_engine_is_exact_on_the_real_student() {
    use cresnet_opt::train::distill::kd_loss;
    let original = load();
    let mut student = original.clone();
    let passes = [fold(), prune(PruneOptions { target_params: Some(0.3), ..Default::default() }), dw(1), fold()];
    run_passes(&mut student, &passes);
    let x = random_input(&original, 2, 120.0, 4);
    let (teacher_logits, expected) = (run(&original, &x), run(&student, &x));
    let shapes = cresnet_opt::validate::validate(&student.graph, &Default::default()).unwrap();
    let mut net = cresnet_opt::train::Network::from_graph(&student.graph, &shapes).unwrap();
    let xs = x.as_slice().unwrap().to_vec();
    let mut acts = net.forward(xs.clone(), 2).unwrap();
    let got = ndarray::ArrayD::from_shape_vec(expected.shape(), acts.value(net.output()).to_vec()).unwrap();
    assert!(rel_diff(&expected, &got) < 1e-4, "engine vs tract {}", rel_diff(&expected, &got));
    let t = teacher_logits.as_slice().unwrap();
    let (_, g) = kd_loss(&acts.value(net.output()), t, 1000, 2.0);
    let grads = net.backward(&mut acts, vec![(net.output(), g)]);
    let loss = |net: &cresnet_opt::train::Network| kd_loss(&net.forward(xs.clone(), 2).unwrap().value(net.output()), t, 1000, 2.0).0;
    let mut rng = cresnet_opt::fixture::Rng::new(5);
    let n = net.params.len();
    for i in [0, 1, n / 3, n / 2, n - 3, n - 2, n - 1] {
        let dir: Vec<f32> = (0..grads[i].len()).map(|_| rng.normal()).collect();
        let norm = dir.iter().map(|d| d * d).sum::<f32>().sqrt();
        let analytic: f64 = grads[i].iter().zip(&dir).map(|(g, d)| (g * d / norm) as f64).sum();
        let scale = net.params[i].data.iter().map(|v| v.abs()).fold(0.0f32, f32::max).max(1e-3);
        let eps = 1e-3 * scale;
        let original = net.params[i].data.clone();
        net.params[i].data = original.iter().zip(&dir).map(|(w, d)| w + eps * d / norm).collect();
        let up = loss(&net);
        net.params[i].data = original.iter().zip(&dir).map(|(w, d)| w - eps * d / norm).collect();
        let down = loss(&net);
        net.params[i].data = original;
        let numeric = (up - down) / (2.0 * eps as f64);
        eprintln!("{} {analytic:.6e} {numeric:.6e}", net.params[i].name);
        assert!(
            (numeric - analytic).abs() < 0.05 * analytic.abs().max(1e-4),
            "param `{}`: analytic {analytic:.6e} vs numeric {numeric:.6e}",
            net.params[i].name
        );
    }
}
