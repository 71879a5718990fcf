//! The command line: exit codes, one-line errors, no output on failure.
mod common;
use common::*;
use cresnet_opt::onnx::{ModelProto, TensorProto};
use prost::Message;
use std::path::{Path, PathBuf};
use std::process::Output;

fn out_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts exit code 2, a single `error: …` line containing `needle`, and no output file.
fn assert_fails(o: &Output, needle: &str, output: &Path) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(!output.exists(), "no output file may be left");
    let dir = output.parent().unwrap();
    let leftovers: Vec<_> =
        std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

fn optimize(input: &Path, output: &Path, passes: &str) -> Output {
    bin().arg(input).arg("-o").arg(output).args(["--passes", passes]).output().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn missing_file() {
    let d = out_dir();
    let out = d.path().join("out.onnx");
    assert_fails(&optimize(&d.path().join("nope.onnx"), &out, "fold"), "cannot read", &out);
}

#[test]
fn empty_file() {
    let d = out_dir();
    let out = d.path().join("out.onnx");
    let input = write(d.path(), "empty.onnx", b"");
    assert_fails(&optimize(&input, &out, "none"), "is empty (0 bytes)", &out);
}

#[test]
fn non_onnx_file() {
    let d = out_dir();
    let out = d.path().join("out.onnx");
    let input = write(d.path(), "readme.onnx", b"# This is a markdown file, not a model\n");
    assert_fails(&optimize(&input, &out, "none"), "ONNX", &out);
}

#[test]
fn truncated_file() {
    let d = out_dir();
    let out = d.path().join("out.onnx");
    let bytes = std::fs::read(fixture_path()).unwrap();
    let input = write(d.path(), "cut.onnx", &bytes[..bytes.len() / 2]);
    assert_fails(&optimize(&input, &out, "none"), "not a valid ONNX protobuf", &out);
}

#[test]
fn bit_flips_never_panic() {
    let d = out_dir();
    let bytes = std::fs::read(fixture_path()).unwrap();
    let mut rng = cresnet_opt::fixture::Rng::new(77);
    for i in 0..24 {
        let mut b = bytes.clone();
        // Flip bits in the header and structure region, where they matter most.
        for _ in 0..4 {
            let at = rng.below(4096.min(b.len()));
            b[at] ^= 1 << rng.below(8);
        }
        let input = write(d.path(), &format!("flip{i}.onnx"), &b);
        let out = d.path().join(format!("flip{i}.out.onnx"));
        let o = optimize(&input, &out, "fold,prune,dw");
        let code = o.status.code();
        assert!(code == Some(0) || code == Some(2), "flip {i}: exit {code:?}: {}", stderr(&o));
        if code == Some(2) {
            assert!(stderr(&o).starts_with("error: "));
            assert!(!out.exists());
        }
    }
}

#[test]
fn unknown_pass_lists_the_valid_ones() {
    let d = out_dir();
    let out = d.path().join("out.onnx");
    let o = optimize(&fixture_path(), &out, "fold,squash");
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains(
            "unknown pass `squash` (valid: none, fold, prune, dw, lowrank, distill, eliminate_identity, canonicalize, retarget, resize, subsample)"
        ),
        "{err}"
    );
    assert!(!out.exists());
}

fn with_config(yaml: &str) -> (tempfile::TempDir, Output, PathBuf) {
    let d = out_dir();
    let cfg = write(d.path(), "p.yaml", yaml.as_bytes());
    let out = d.path().join("out.onnx");
    let o = bin().arg(fixture_path()).arg("-o").arg(&out).arg("--config").arg(&cfg).output().unwrap();
    (d, o, out)
}

#[test]
fn bad_yaml_is_named() {
    let cases = [
        ("passes: [fold]\nextra: 1\n", "unknown field `extra`"),
        ("passes:\n  - prune: { ratio: 1.5 }\n", "`prune.ratio` is 1.5, but must lie strictly between 0 and 1"),
        ("passes:\n  - prune: { ration: 0.5 }\n", "unknown field `ration`"),
        ("passes:\n  - prune: { ratio: lots }\n", "invalid type"),
        (
            "passes:\n  - squash\n",
            "unknown pass `squash` (valid passes: fold, prune, dw, lowrank, distill, eliminate_identity, canonicalize, retarget, resize, subsample)",
        ),
        ("pipeline: nosuch\n", "unknown pipeline `nosuch` (shipped pipelines: fold, cresnet, cresnet-task)"),
        (
            "passes:\n  - dw: { min_resolution: 28, max_resolution: 14 }\n",
            "`dw.min_resolution` is 28, above `dw.max_resolution` (14): no layer can match",
        ),
        ("passes:\n  - distill: { ema: 1.0 }\n", "`distill.ema` is 1, but must lie in [0, 1) (0: off)"),
        ("passes: [fold\n", "p.yaml"),
        ("calibration: { data: x, images: -3 }\npasses: [fold]\n", "calibration"),
    ];
    for (yaml, needle) in cases {
        let (_d, o, out) = with_config(yaml);
        assert_fails(&o, needle, &out);
    }
}

#[test]
fn output_equal_to_input_is_replaced_only_on_success() {
    let d = out_dir();
    let model = std::fs::copy(fixture_path(), d.path().join("m.onnx")).map(|_| d.path().join("m.onnx")).unwrap();
    let before = std::fs::read(&model).unwrap();
    let o = bin().arg(&model).arg("-o").arg(&model).args(["--passes", "fold", "--input-shape", "input:1,5,224,224"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(std::fs::read(&model).unwrap(), before, "the input is untouched after a failure");
    let o = optimize(&model, &model, "fold");
    assert!(o.status.success(), "{}", stderr(&o));
    let after = cresnet_opt::io::load(&model).unwrap();
    assert_eq!(after.graph.nodes().filter(|n| n.op() == "BatchNormalization").count(), 0);
}

#[test]
fn passes_none_writes_the_same_bytes_and_a_report() {
    let d = out_dir();
    let out = d.path().join("same.onnx");
    let report = d.path().join("r.json");
    let o = bin().arg(fixture_path()).arg("-o").arg(&out).args(["--passes", "none", "--report"]).arg(&report).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(fixture_path()).unwrap());
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["passes"].as_array().unwrap().len(), 0);
}

#[test]
fn fold_report_counts_changes() {
    let d = out_dir();
    let out = d.path().join("f.onnx");
    let report = d.path().join("r.json");
    let o = bin().arg(fixture_path()).arg("-o").arg(&out).args(["--passes", "fold", "--report"]).arg(&report).output().unwrap();
    assert!(o.status.success());
    assert!(stderr(&o).starts_with("fold: 53 changed, 0 declined; params 641,112 -> 627,832"), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["passes"][0]["changed"].as_array().unwrap().len(), 53);
    assert_eq!((r["params_before"].as_u64(), r["params_after"].as_u64()), (Some(641_112), Some(627_832)));
}

#[test]
fn shipped_recipe_runs_data_free_and_leaves_the_student_untrained() {
    let d = out_dir();
    let out = d.path().join("c.onnx");
    let report = d.path().join("r.json");
    let o = bin().arg(fixture_path()).arg("-o").arg(&out).args(["--pipeline", "cresnet", "--report"]).arg(&report).output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no calibration images: lossy passes run data-free, so accuracy will suffer"), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let names: Vec<_> = r["passes"].as_array().unwrap().iter().map(|p| p["pass"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["fold", "lowrank", "lowrank", "dw", "dw", "distill"]);
    let distill = &r["passes"][5];
    assert_eq!(distill["changed"].as_array().unwrap().len(), 0);
    assert!(distill["declined"][0]["reason"].as_str().unwrap().starts_with("no training images"), "{distill}");
    // ≤ 1/5 of 641,112: the budget lowered the last lowrank's ratio (the fixed ratios kept 140,865).
    assert_eq!(r["params_after"].as_u64(), Some(127_115));
    assert!(r["passes"][2]["changed"][0]["what"].as_str().unwrap().contains("lowered to"), "{}", r["passes"][2]);
}

#[test]
fn stats_json_has_exactly_the_documented_keys() {
    let o = bin().args(["stats", "--format", "json"]).arg(fixture_path()).output().unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["layers", "macs", "nodes", "ops", "params"]);
    assert_eq!(v["params"], 641_112);
    assert_eq!(v["ops"]["Conv"], 53);
    let row = &v["layers"][0];
    assert_eq!(row["name"], "conv1");
    assert_eq!(row["output_shape"], serde_json::json!([1, 8, 112, 112]));
    let yaml = bin().args(["stats", "--format", "yaml"]).arg(fixture_path()).output().unwrap();
    assert!(String::from_utf8_lossy(&yaml.stdout).contains("params: 641112"));
}

#[test]
fn stats_compares_two_models_by_stage() {
    let d = out_dir();
    let out = d.path().join("p.onnx");
    assert!(optimize(&fixture_path(), &out, "fold,prune").status.success());
    let o = bin().arg("stats").arg(fixture_path()).arg(&out).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    for stage in ["112x112", "56x56", "28x28", "14x14", "7x7", "head", "total"] {
        assert!(text.lines().any(|l| l.starts_with(stage)), "stage {stage} in:\n{text}");
    }
    let j = bin().args(["stats", "--format", "json"]).arg(fixture_path()).arg(&out).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    assert!(v["params_ratio"].as_f64().unwrap() < 0.8);
}

#[test]
fn check_random_thresholds_set_the_exit_code() {
    let d = out_dir();
    let folded = d.path().join("f.onnx");
    let pruned = d.path().join("p.onnx");
    assert!(optimize(&fixture_path(), &folded, "fold").status.success());
    assert!(optimize(&fixture_path(), &pruned, "fold,prune").status.success());
    let check = |model: &Path, extra: &[&str]| {
        bin()
            .arg("check")
            .arg(model)
            .arg("--reference")
            .arg(fixture_path())
            .args(["--random", "4", "--format", "json"])
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = check(&folded, &["--max-rel-diff", "1e-5", "--min-agreement", "1.0"]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["agreement", "elapsed_s", "images", "max_rel_diff"]);
    let bad = check(&pruned, &["--max-rel-diff", "1e-5"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("threshold violated: max relative logit difference"), "{}", stderr(&bad));
}

/// Encodes a hand-made model proto.
fn proto_file(dir: &Path, name: &str, edit: impl FnOnce(&mut ModelProto)) -> PathBuf {
    let mut m = ModelProto::decode(std::fs::read(fixture_path()).unwrap().as_slice()).unwrap();
    edit(&mut m);
    write(dir, name, &m.encode_to_vec())
}

fn graph(m: &mut ModelProto) -> &mut cresnet_opt::onnx::GraphProto {
    m.graph.as_mut().unwrap()
}

fn init<'a>(m: &'a mut ModelProto, name: &str) -> &'a mut TensorProto {
    graph(m).initializer.iter_mut().find(|t| t.name() == name).unwrap()
}

#[test]
fn broken_models_are_named() {
    let d = out_dir();
    let out = d.path().join("out.onnx");
    type Corrupt = Box<dyn FnOnce(&mut ModelProto)>;
    let cases: Vec<(&str, Corrupt, &str)> = vec![
        (
            "dangling",
            Box::new(|m| graph(m).node[4].input[0] = "ghost".into()),
            "reads `ghost`, which no node, input or initializer defines",
        ),
        ("missing-init", Box::new(|m| graph(m).initializer.retain(|t| t.name() != "conv1.weight")), "reads `conv1.weight`"),
        ("cycle", Box::new(|m| graph(m).node[0].input[0] = "conv1_relu".into()), "cycle"),
        ("negative-dim", Box::new(|m| init(m, "conv1.bias").dims = vec![-8]), "negative dimension"),
        ("absurd-dim", Box::new(|m| init(m, "conv1.bias").dims = vec![1 << 40, 1 << 40]), "overflow"),
        ("huge-dim", Box::new(|m| init(m, "conv1.bias").dims = vec![1 << 33]), "needs"),
        ("size-mismatch", Box::new(|m| init(m, "conv1.bias").dims = vec![9]), "holds 32 bytes but its shape [9] needs 36"),
        ("bad-dtype", Box::new(|m| init(m, "conv1.bias").data_type = Some(99)), "unsupported data type code 99"),
        ("shape-mismatch", Box::new(|m| init(m, "conv1.weight").dims = vec![8, 1, 7, 21]), "conv1"),
        ("no-graph", Box::new(|m| m.graph = None), "it has no graph"),
    ];
    for (name, edit, needle) in cases {
        let input = proto_file(d.path(), &format!("{name}.onnx"), edit);
        assert_fails(&optimize(&input, &out, "fold"), needle, &out);
    }
}

#[test]
fn unknown_ops_pass_through_byte_for_byte() {
    let d = out_dir();
    let input = proto_file(d.path(), "custom.onnx", |m| {
        let g = graph(m);
        let relu = g.node.iter_mut().find(|n| n.name() == "conv1_relu").unwrap();
        relu.op_type = Some("FancyAct".into());
        relu.domain = Some("com.example".into());
        relu.doc_string = Some("keep me".into());
        m.opset_import.push(cresnet_opt::onnx::OperatorSetIdProto { domain: Some("com.example".into()), version: Some(3) });
    });
    let out = d.path().join("out.onnx");
    let o = optimize(&input, &out, "fold,prune");
    assert!(o.status.success(), "{}", stderr(&o));
    let m = ModelProto::decode(std::fs::read(&out).unwrap().as_slice()).unwrap();
    let original = ModelProto::decode(std::fs::read(&input).unwrap().as_slice()).unwrap();
    let find = |m: &ModelProto| m.graph.as_ref().unwrap().node.iter().find(|n| n.name() == "conv1_relu").cloned().unwrap();
    assert_eq!(find(&m), find(&original), "the unknown node is unchanged");
    assert_eq!(m.opset_import, original.opset_import);
}

#[test]
fn bench_profile_accounts_for_every_node() {
    let o = bin().arg("bench").arg(fixture_path()).args(["--profile", "--runs", "2", "--top", "3", "--json"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let p = &v[0];
    let total = p["total_ms"].as_f64().unwrap();
    let ops = p["ops"].as_array().unwrap();
    let by_op: f64 = ops.iter().map(|o| o["ms"].as_f64().unwrap()).sum();
    assert!(total > 0.0 && (by_op - total).abs() <= 1e-9 * total.max(1.0), "{by_op} vs {total}");
    assert!(ops.windows(2).all(|w| w[0]["ms"].as_f64() >= w[1]["ms"].as_f64()), "operators sorted by time");
    assert!(ops.iter().any(|o| o["op"].as_str().unwrap().contains("MatMul")), "the convs run as matrix products: {ops:?}");
    let slowest = p["slowest"].as_array().unwrap();
    assert_eq!(slowest.len(), 3);
    assert!(slowest[0]["ms"].as_f64() >= slowest[2]["ms"].as_f64());
    assert!(slowest[0]["ms"].as_f64().unwrap() <= ops[0]["ms"].as_f64().unwrap() + 1e-12, "no node slower than its operator's total");
}

#[test]
fn bench_compares_every_model_with_the_first_per_thread_count() {
    let f = fixture_path();
    let o = bin().arg("bench").args([&f, &f]).args(["--runs", "4", "--threads", "1,2", "--json"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = v.as_array().unwrap();
    let threads: Vec<u64> = rows.iter().map(|r| r["threads"].as_u64().unwrap()).collect();
    assert_eq!(threads, [1, 1, 2, 2], "both models per thread count, in the order given");
    for pair in rows.chunks(2) {
        let (a, b) = (pair[0]["median_ms"].as_f64().unwrap(), pair[1]["median_ms"].as_f64().unwrap());
        assert_eq!(pair[0]["speedup"].as_f64().unwrap(), 1.0);
        assert!((pair[1]["speedup"].as_f64().unwrap() - a / b).abs() < 1e-12, "{pair:?}");
        assert!(pair.iter().all(|r| r["min_ms"].as_f64().unwrap() <= r["median_ms"].as_f64().unwrap()));
        // Paired: the median over rounds of first / this, from the runs listed.
        let times = |r: &serde_json::Value| -> Vec<f64> { r["times_ms"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect() };
        let (ta, tb) = (times(&pair[0]), times(&pair[1]));
        assert_eq!((ta.len(), tb.len()), (4, 4));
        let mut ratios: Vec<f64> = ta.iter().zip(&tb).map(|(a, b)| a / b).collect();
        ratios.sort_by(f64::total_cmp);
        assert_eq!(pair[0]["paired_speedup"].as_f64().unwrap(), 1.0);
        // An even count: the mean of the two middle ratios (the upper one would flatter).
        assert!((pair[1]["paired_speedup"].as_f64().unwrap() - 0.5 * (ratios[1] + ratios[2])).abs() < 1e-12, "{pair:?}");
        let mut sorted = tb.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(pair[1]["median_ms"].as_f64().unwrap(), sorted[2], "latency: the upper middle run");
        assert_eq!(pair[1]["min_ms"].as_f64().unwrap(), sorted[0]);
    }
}

/// `--teacher-cache` sets the cache of every `distill` pass: without one it
/// would do nothing, and with stage features it cannot hold them.
#[test]
fn precision_needs_a_distill_pass_and_names_its_values() {
    let d = out_dir();
    let out = d.path().join("out.onnx");
    let o = bin().arg(fixture_path()).arg("-o").arg(&out).args(["--passes", "fold", "--precision", "bf16"]).output().unwrap();
    assert_fails(&o, "--precision is for the `distill` pass, and the pipeline has none", &out);
    let o = bin().arg(fixture_path()).arg("-o").arg(&out).args(["--passes", "fold,distill", "--precision", "f16"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("[possible values: f32, bf16]"), "{o:?}");
    assert!(!out.exists());
}

#[test]
fn teacher_cache_needs_a_distill_pass_that_it_can_serve() {
    let d = out_dir();
    let out = d.path().join("out.onnx");
    let o = bin().arg(fixture_path()).arg("-o").arg(&out).args(["--passes", "fold", "--teacher-cache", "labels"]).output().unwrap();
    assert_fails(&o, "--teacher-cache is for the `distill` pass, and the pipeline has none", &out);
    let cfg = write(d.path(), "p.yaml", b"passes:\n  - fold\n  - distill: { feature_weight: 1.0 }\n");
    let o = bin().arg(fixture_path()).arg("-o").arg(&out).arg("--config").arg(&cfg).args(["--teacher-cache", "labels"]).output().unwrap();
    assert_fails(&o, "--teacher-cache: bad pipeline configuration: `distill.teacher_cache` keeps logits and pooled features", &out);
    assert!(!d.path().join("labels").exists() && !Path::new("labels").exists(), "no cache directory made for a refused run");
}
