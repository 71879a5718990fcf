//! The corpus of real exports (`fixtures/exports/`, written by
//! `scripts/export_corpus.py` with torch 2.15: classic and dynamo exporters,
//! opsets 13/17/18, `view` heads, dynamic H/W, initializers as inputs,
//! Constant-node weights, baked-in Normalize, FPN upsample-add, `F.pad`, SE
//! blocks, external data). Every file is checked against what torch and
//! onnxruntime measured when it was written (`manifest.json`): MACs, and
//! the logits on a fixed input.
mod common;
use common::*;
use cresnet_opt::ir::Model;
use cresnet_opt::passes::prune::PruneOptions;
use cresnet_opt::passes::{PassReport, PassSpec};
use cresnet_opt::shape::InputShapes;
use ndarray::ArrayD;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(serde::Deserialize)]
struct Entry {
    macs: u64,
    input: Vec<usize>,
    dynamic_hw: bool,
    output: Vec<f32>,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/exports")
}

fn manifest() -> BTreeMap<String, Entry> {
    let text = std::fs::read_to_string(dir().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest parses")
}

fn path(name: &str) -> PathBuf {
    dir().join(format!("{name}.onnx"))
}

fn load(name: &str) -> Model {
    cresnet_opt::io::load(&path(name)).unwrap_or_else(|e| panic!("{name} does not load: {e}"))
}

/// The script's fixed input: sin(0.37 i) over the flat index.
fn test_input(shape: &[usize]) -> ArrayD<f32> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| (i as f64 * 0.37).sin() as f32).collect();
    ArrayD::from_shape_vec(shape.to_vec(), v).unwrap()
}

fn run_at(model: &Model, input: &ArrayD<f32>) -> ArrayD<f32> {
    let overrides: InputShapes = [("input".to_string(), input.shape().to_vec())].into();
    let runner = cresnet_opt::runner::Runner::with_shapes(model, input.shape()[0], &[], &overrides).expect("tract compiles the model");
    runner.run(input.clone()).expect("tract runs the model").remove(0)
}

fn passes(model: &mut Model, specs: &[PassSpec], overrides: &InputShapes) -> Vec<PassReport> {
    cresnet_opt::passes::run_pipeline(model, specs, overrides, |_| {}).unwrap_or_else(|e| panic!("passes fail: {}", chain(&e)))
}

/// An error with its causes, one per line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!("\n  caused by: {c}"));
        cause = c.source();
    }
    s
}

fn report<'a>(reports: &'a [PassReport], pass: &str) -> &'a PassReport {
    reports.iter().find(|r| r.pass == pass).unwrap_or_else(|| panic!("no `{pass}` report"))
}

#[test]
fn the_corpus_is_complete() {
    let m = manifest();
    assert_eq!(m.len(), 21, "{:?}", m.keys().collect::<Vec<_>>());
    for name in m.keys() {
        let size = std::fs::metadata(path(name)).unwrap().len();
        assert!(size <= 2_200_000, "{name}: {size} bytes");
    }
}

#[test]
fn every_export_loads_and_round_trips_byte_for_byte() {
    for name in manifest().keys().filter(|n| !n.starts_with("external/")) {
        let model = load(name);
        let bytes = std::fs::read(path(name)).unwrap();
        assert!(cresnet_opt::io::to_bytes(&model).unwrap() == bytes, "{name}: round trip differs");
    }
}

#[test]
fn stats_count_the_macs_torch_counts() {
    for (name, e) in manifest() {
        let model = load(&name);
        let stats = cresnet_opt::stats::compute(&model.graph, &Default::default()).unwrap();
        assert_eq!(stats.macs, e.macs, "{name}");
    }
}

#[test]
fn tract_computes_what_onnxruntime_computed() {
    for (name, e) in manifest() {
        let got = run_at(&load(&name), &test_input(&e.input));
        let want = ArrayD::from_shape_vec(got.shape().to_vec(), e.output.clone()).unwrap();
        let diff = rel_diff(&want, &got);
        assert!(diff < 1e-4, "{name}: relative difference {diff:e}");
    }
}

#[test]
fn fold_is_exact_on_every_export() {
    for (name, e) in manifest() {
        let model = load(&name);
        let mut folded = model.clone();
        let reports = passes(&mut folded, &[fold()], &Default::default());
        let x = test_input(&e.input);
        let diff = rel_diff(&run_at(&model, &x), &run_at(&folded, &x));
        assert!(diff < 1e-5, "{name}: fold changed the logits by {diff:e}");
        let bn = model.graph.nodes().filter(|n| n.op() == "BatchNormalization").count();
        assert_eq!(report(&reports, "fold").changed.len(), bn, "{name}: every BN folds");
        assert_eq!(folded.graph.nodes().filter(|n| n.op() == "BatchNormalization").count(), 0, "{name}");
    }
}

/// The weights `prune` (default ratio) removes after `fold`, and its report.
fn pruned_params(name: &str) -> (u64, PassReport) {
    let mut model = load(name);
    let reports = passes(&mut model, &[fold(), prune(PruneOptions::default())], &Default::default());
    let p = report(&reports, "prune").clone();
    (p.params_before - p.params_after, p)
}

#[test]
fn prune_treats_every_exporter_alike() {
    // Same torch module, different exporters and file variants: the same
    // channels are prunable, so the same weights go (the files differ in
    // a few scalars, e.g. Clip bounds as initializers or attributes).
    let families = [
        (
            "resnet18-classic-op17",
            &["resnet18-dynamo-op18", "resnet18-dynamo-op18-noopt", "resnet18-classic-op13-initinputs", "resnet18-constnodes"][..],
        ),
        ("resnet50-classic-op17", &["resnet50-dynamo-op18", "resnet50-classic-op13"][..]),
        ("mobilenetv2-classic-op17", &["mobilenetv2-dynamo-op18"][..]),
        ("viewhead-classic-op17", &["viewhead-dynamo-op18"][..]),
        ("padse-classic-op17", &["padse-dynamo-op18"][..]),
        ("fpn-classic-op17", &["fpn-dynamo-op18"][..]),
        ("keras-nchw-op13", &["keras-nhwc-op13"][..]),
    ];
    for (base, others) in families {
        let (removed, r) = pruned_params(base);
        assert!(!r.changed.is_empty() && removed > r.params_before / 3, "{base}: prune removed {removed}: {:?}", r.declined.first());
        for other in others {
            let (a, r) = pruned_params(other);
            assert_eq!(a, removed, "{other} loses {a} weights, {base} {removed}; first decline: {:?}", r.declined.first());
        }
    }
}

#[test]
fn prune_reaches_every_channel_but_the_model_interface() {
    for name in manifest().keys() {
        let (_, r) = pruned_params(name);
        // tf2onnx's NHWC file transposes its input: that Transpose is part of the interface.
        let interface =
            |reason: &str| matches!(reason, "graph input" | "graph output") || (name.contains("nhwc") && reason.starts_with("Transpose"));
        let inner: Vec<_> = r.declined.iter().filter(|d| !interface(&d.reason)).collect();
        assert!(inner.is_empty(), "{name}: {inner:?}");
    }
}

#[test]
fn pruned_exports_still_run() {
    for (name, e) in manifest() {
        let mut model = load(&name);
        passes(&mut model, &[fold(), prune(PruneOptions::default())], &Default::default());
        let y = run_at(&model, &test_input(&e.input));
        assert_eq!(y.len(), 10, "{name}");
        assert!(y.iter().all(|v| v.is_finite()), "{name}");
    }
}

#[test]
fn calibrated_dw_factorizes_every_export() {
    let calib = cresnet_opt::refit::Calibration::from_images(smooth_images(4, 9), 8, 1e-3);
    for (name, e) in manifest().into_iter().filter(|(n, _)| !n.contains("nhwc")) {
        let mut model = load(&name);
        // 64 px for all (the calibration images' size), dynamic ones included.
        // (Calibration images are NCHW: an NHWC input is not calibrated here.)
        let overrides: InputShapes = if e.dynamic_hw { [("input".to_string(), vec![1, 3, 64, 64])].into() } else { InputShapes::new() };
        let reports = cresnet_opt::passes::run_pipeline_calibrated(&mut model, &[fold(), dw(2)], &overrides, Some(&calib), |_| {})
            .unwrap_or_else(|err| panic!("{name}: {}", chain(&err)));
        let r = report(&reports, "dw");
        if name.starts_with("mobilenetv2") {
            // Every KxK conv of MobileNetV2 is depthwise already (the stem is skipped).
            assert!(
                r.changed.is_empty() && r.declined.iter().all(|d| d.reason == "grouped conv" || d.reason.contains("stem")),
                "{name}: {:?}",
                r.declined
            );
            continue;
        }
        let on_data = r.changed.iter().filter(|c| c.what.starts_with("factorized on data")).count();
        assert!(on_data > 0, "{name}: nothing factorized on data: {:?} / {:?}", r.changed.first(), r.declined.first());
        let x = test_input(&[1, 3, 64, 64]);
        assert!(run_at(&model, &x).iter().all(|v| v.is_finite()), "{name}");
    }
}

#[test]
fn check_random_and_bench_run_on_every_export() {
    for name in manifest().keys() {
        let p = path(name);
        let out = bin().args(["check"]).arg(&p).arg("--reference").arg(&p).args(["--random", "2", "--quiet"]).output().unwrap();
        assert!(out.status.success(), "{name}: check: {}", String::from_utf8_lossy(&out.stderr));
        let out = bin().args(["bench"]).arg(&p).args(["--runs", "1", "--threads", "1"]).output().unwrap();
        assert!(out.status.success(), "{name}: bench: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn dynamic_height_and_width_take_224_and_say_so() {
    let m = manifest();
    for name in ["resnet18-classic-op17-dynhw", "resnet18-dynamo-op18-dynhw"] {
        let out = bin().arg("stats").arg(path(name)).args(["--format", "json"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("symbolic height/width: using [1, 3, 224, 224]"), "{stderr}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["macs"].as_u64(), Some(m[name].macs), "{name}");
        // --input-shape takes effect from the load on: at 64 px it is the fixed export.
        let out = bin().arg("stats").arg(path(name)).args(["--format", "json", "--input-shape", "input:1,3,64,64"]).output().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["macs"].as_u64(), Some(m["resnet18-classic-op17"].macs), "{name}");
    }
}

#[test]
fn initializers_listed_as_inputs_are_treated_as_constants_and_reported() {
    let name = "resnet18-classic-op13-initinputs";
    let mut model = load(name);
    assert!(model.graph.meta.input.len() > 1);
    let reports = passes(&mut model, &[fold()], &Default::default());
    assert_eq!(reports[0].pass, "canonicalize");
    assert!(reports[0].changed.iter().any(|c| c.what.contains("also listed as graph inputs")), "{:?}", reports[0].changed);
    assert_eq!(model.graph.meta.input.len(), 1);
    assert_eq!(report(&reports, "fold").changed.len(), 20);
    // Kept as inputs on request: then nothing may rewrite them.
    let mut kept = load(name);
    let listed = kept.graph.meta.input.len() - 1;
    let keep = PassSpec::Canonicalize(cresnet_opt::passes::canonicalize::CanonicalizeOptions { keep_initializer_inputs: true });
    let reports = passes(&mut kept, &[keep, fold()], &Default::default());
    assert!(report(&reports, "fold").changed.is_empty());
    assert_eq!(kept.graph.meta.input.len(), 1 + listed);
}

#[test]
fn a_pass_that_changes_nothing_warns_and_strict_fails() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    // fold twice: the second has nothing left to fold.
    let run = bin().arg(path("resnet18-classic-op17")).arg("-o").arg(&out).args(["--passes", "fold,fold"]).output().unwrap();
    assert!(run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("warning: pass `fold` changed nothing"), "{stderr}");
    std::fs::remove_file(&out).unwrap();
    let run = bin().arg(path("resnet18-classic-op17")).arg("-o").arg(&out).args(["--passes", "fold,fold", "--strict"]).output().unwrap();
    assert_eq!(run.status.code(), Some(1), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(!out.exists(), "--strict writes nothing");
    // The exporter fused BN into the convs; a file that has BN folds under --strict.
    let run = bin().arg(path("resnet18-dynamo-op18-noopt")).arg("-o").arg(&out).args(["--passes", "fold", "--strict"]).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
}

#[test]
fn a_round_trip_reports_the_params_and_macs() {
    let dir = tempfile::tempdir().unwrap();
    let (out, rep) = (dir.path().join("out.onnx"), dir.path().join("r.json"));
    let run =
        bin().arg(path("resnet18-classic-op17")).arg("-o").arg(&out).args(["--passes", "none", "--report"]).arg(&rep).output().unwrap();
    assert!(run.status.success());
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
    assert_eq!(json["macs_before"].as_u64(), Some(manifest()["resnet18-classic-op17"].macs));
    assert_eq!(json["macs_after"], json["macs_before"]);
    assert!(json["params_before"].as_u64().unwrap() > 170_000);
}

#[test]
fn distill_trains_through_every_head_and_activation() {
    let dir = tempfile::tempdir().unwrap();
    write_images(&dir.path().join("train"), 8, 5);
    for name in [
        "resnet18-dynamo-op18",
        "viewhead-classic-op17",
        "padse-dynamo-op18",
        "padse-classic-op17",
        "mobilenetv2-classic-op17",
        "fpn-dynamo-op18",
    ] {
        let mut model = load(name);
        let opts = cresnet_opt::passes::distill::DistillOptions {
            data: vec![cresnet_opt::config::DataSource { dir: dir.path().join("train"), images: None, classes: None }],
            preprocess: Some(preprocess_file(dir.path())),
            epochs: 1,
            batch: 4,
            seed: 1,
            threads: Some(2),
            ..Default::default()
        };
        let reports = passes(&mut model, &[fold(), PassSpec::Distill(opts)], &Default::default());
        assert!(!report(&reports, "distill").changed.is_empty(), "{name}");
    }
}

fn lowrank_budget(ratio: f64, budget: f64) -> PassSpec {
    PassSpec::Lowrank(cresnet_opt::passes::lowrank::LowrankOptions { ratio: Some(ratio), budget: Some(budget), ..Default::default() })
}

#[test]
fn a_budget_lowers_the_ratio_until_the_whole_pipeline_fits() {
    for name in ["resnet50-classic-op17", "resnet50-dynamo-op18"] {
        let mut model = load(name);
        let reports = passes(&mut model, &[fold(), lowrank_budget(0.5, 0.3), dw(1)], &Default::default());
        let start = reports[0].params_before;
        let end = reports.last().unwrap().params_after;
        assert!(end as f64 <= 0.3 * start as f64, "{name}: {end} of {start}");
        let note = &report(&reports, "lowrank").changed[0];
        assert!(note.node == "(budget)" && note.what.contains("lowered to"), "{note:?}");
        // Without the budget the same ratio keeps more than 30 %.
        let mut free = load(name);
        let reports = passes(
            &mut free,
            &[fold(), PassSpec::Lowrank(cresnet_opt::passes::lowrank::LowrankOptions { ratio: Some(0.5), ..Default::default() }), dw(1)],
            &Default::default(),
        );
        assert!(reports.last().unwrap().params_after as f64 > 0.3 * start as f64);
    }
}

#[test]
fn a_budget_within_reach_keeps_the_ratio_and_one_out_of_reach_fails() {
    let mut model = load("resnet50-classic-op17");
    let reports = passes(&mut model, &[lowrank_budget(0.5, 0.95)], &Default::default());
    assert!(report(&reports, "lowrank").changed[0].what.starts_with("budget 95.00 %: ratio 0.5 keeps"), "{:?}", reports[0].changed[0]);
    let mut model = load("resnet50-classic-op17");
    let err = cresnet_opt::passes::run_pipeline(&mut model, &[lowrank_budget(0.5, 0.01)], &Default::default(), |_| {}).unwrap_err();
    let text = chain(&err);
    assert!(text.contains("`lowrank.budget` 0.01 cannot be met: even at ratio 0.001"), "{text}");
}

#[test]
fn the_cresnet_pipeline_keeps_its_promise_on_torchvision_layouts() {
    for name in ["resnet50-classic-op17", "resnet50-dynamo-op18", "resnet18-dynamo-op18"] {
        let mut model = load(name);
        let spec = cresnet_opt::config::shipped_pipeline("cresnet").unwrap().passes.unwrap();
        let reports = passes(&mut model, &spec, &Default::default());
        let start = reports[0].params_before;
        let end = reports.last().unwrap().params_after;
        assert!(end as f64 <= 0.2 * start as f64, "{name}: {end} of {start} weights");
    }
}

#[test]
fn an_op_without_a_shape_rule_leaves_shapes_unknown_and_only_the_passes_that_need_them_decline() {
    let mut model = load("resnet18-classic-op17");
    // An op of another domain before the head: its output's shape is unknown.
    let ix = model.graph.topo_order().unwrap().into_iter().rfind(|&ix| model.graph.node(ix).op() == "Relu").unwrap();
    model.graph.update_node(ix, |n| n.proto.domain = Some("com.example".into())).unwrap();
    let mystery = model.graph.node(ix).output(0).unwrap().to_string();
    let shapes = cresnet_opt::validate::validate(&model.graph, &Default::default()).expect("loads");
    assert_eq!(shapes[&mystery].shape, None);
    let stats = cresnet_opt::stats::compute(&model.graph, &Default::default()).unwrap();
    assert!(stats.macs > 0 && stats.macs < manifest()["resnet18-classic-op17"].macs);
    let bytes = cresnet_opt::io::to_bytes(&model).unwrap();
    let back = cresnet_opt::io::from_bytes(bytes.clone().into(), "mystery", None).unwrap();
    assert!(cresnet_opt::io::to_bytes(&back).unwrap() == bytes);
    let reports = passes(&mut model, &[prune(PruneOptions::default())], &Default::default());
    let r = report(&reports, "prune");
    assert!(r.declined.iter().any(|d| d.reason.contains("not understood")), "{:?}", r.declined);
    assert!(!r.changed.is_empty(), "the rest still prunes");
}

#[test]
fn check_and_bench_take_an_input_shape() {
    let p = path("resnet18-dynamo-op18-dynhw");
    let shape = ["--input-shape", "input:1,3,64,64"];
    let out = bin().arg("check").arg(&p).arg("--reference").arg(&p).args(["--random", "1", "--quiet"]).args(shape).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bin().arg("bench").arg(&p).args(["--runs", "1", "--threads", "1", "--json"]).args(shape).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("symbolic height/width"), "an explicit shape needs no note: {stderr}");
}
