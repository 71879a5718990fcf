//! The `distill` pass: loss gradient, training that works, checkpoints, errors.
mod common;
use common::*;
use cresnet_opt::config::{DataSource, Preprocess};
use cresnet_opt::fixture::{resnet50, FixtureSpec, Rng};
use cresnet_opt::ir::Model;
use cresnet_opt::passes::distill::{DistillOptions, FeatureSet};
use cresnet_opt::passes::prune::PruneOptions;
use cresnet_opt::passes::PassSpec;
use cresnet_opt::train::distill::kd_loss;
use cresnet_opt::train::kernels::{bf16_available, Precision};
use std::path::Path;

#[test]
fn kd_loss_gradient_matches_finite_differences() {
    let mut rng = Rng::new(3);
    let (classes, batch) = (7, 3);
    let s: Vec<f32> = (0..classes * batch).map(|_| 3.0 * rng.normal()).collect();
    let t: Vec<f32> = (0..classes * batch).map(|_| 3.0 * rng.normal()).collect();
    let (loss, grad) = kd_loss(&s, &t, classes, 2.5);
    assert!(loss > 0.0);
    assert!(kd_loss(&t, &t, classes, 2.5).0.abs() < 1e-9, "KL of identical logits is 0");
    for i in 0..s.len() {
        let eps = 1e-2;
        let mut up = s.clone();
        up[i] += eps;
        let mut down = s.clone();
        down[i] -= eps;
        let numeric = (kd_loss(&up, &t, classes, 2.5).0 - kd_loss(&down, &t, classes, 2.5).0) / (2.0 * eps as f64);
        assert!((numeric - grad[i] as f64).abs() < 1e-4, "logit {i}: analytic {} vs numeric {numeric}", grad[i]);
    }
}

fn teacher() -> Model {
    resnet50(&FixtureSpec { width_div: 8, input_size: 64, classes: 10, ..Default::default() }).unwrap()
}

fn options(dir: &Path, epochs: usize) -> DistillOptions {
    DistillOptions {
        data: vec![DataSource { dir: dir.join("train"), images: None, classes: None }],
        preprocess: Some(preprocess_file(dir)),
        epochs,
        batch: 8,
        lr: 3e-3,
        seed: 1,
        threads: Some(2),
        ..Default::default()
    }
}

fn student_passes() -> Vec<PassSpec> {
    vec![fold(), prune(PruneOptions { ratio: Some(0.5), ..Default::default() }), dw(1), fold()]
}

/// Mean KL(teacher ‖ student) (T = 1) over fresh images.
fn kl_on_fresh_images(teacher: &Model, student: &Model, dir: &Path) -> f64 {
    let Preprocess::File(p) = preprocess_file(dir) else { unreachable!() };
    let pre = cresnet_opt::data::Preprocessing::from_choice(&Preprocess::File(p)).unwrap();
    write_images(&dir.join("fresh"), 12, 77);
    let paths = cresnet_opt::data::list_images(&dir.join("fresh")).unwrap();
    let images: Vec<_> = paths.iter().map(|p| pre.load(p).unwrap()).collect();
    let x = cresnet_opt::data::stack(&images, images.len()).into_dyn();
    let (t, s) = (run(teacher, &x), run(student, &x));
    kd_loss(s.as_slice().unwrap(), t.as_slice().unwrap(), 10, 1.0).0
}

/// Distills the fixture's pruned + factorized student with `opts`; returns
/// the KL on fresh images before and after, the pass log and the weight
/// counts of the student and the result.
fn distill_fixture(opts: impl Fn(&Path) -> DistillOptions) -> (f64, f64, Vec<String>, (usize, usize)) {
    let dir = tempfile::tempdir().unwrap();
    write_images(&dir.path().join("train"), 40, 5);
    let teacher = teacher();
    let mut student = teacher.clone();
    run_passes(&mut student, &student_passes());
    let before = kl_on_fresh_images(&teacher, &student, dir.path());
    let mut passes = student_passes();
    passes.push(PassSpec::Distill(opts(dir.path())));
    let mut distilled = teacher.clone();
    let reports = run_passes(&mut distilled, &passes);
    let after = kl_on_fresh_images(&teacher, &distilled, dir.path());
    let log = reports.last().unwrap().changed.iter().map(|c| c.what.clone()).collect();
    (before, after, log, (student.graph.weights().len(), distilled.graph.weights().len()))
}

#[test]
fn distillation_brings_the_student_close_to_its_teacher() {
    let (before, after, log, _) = distill_fixture(|dir| options(dir, 6));
    assert!(after < 0.25 * before, "KL on fresh images: before {before:.4}, after {after:.4}");
    assert!(log[0].starts_with("epoch 0 (before training): hold-out agreement"), "{log:?}");
    assert_eq!(log.iter().filter(|l| l.starts_with("epoch ") && l.contains("/6: loss")).count(), 6, "{log:?}");
    assert!(log.last().unwrap().starts_with("kept epoch "), "{log:?}");
}

#[test]
fn feature_distillation_fits_adapters_onto_pruned_stage_outputs() {
    let (before, after, log, (student_weights, distilled_weights)) =
        distill_fixture(|dir| DistillOptions { feature_weight: 1.0, ..options(dir, 6) });
    // One adapter per resolution of the fixture's 4 stages (pruned residual streams: fewer channels).
    let adapters: Vec<&String> = log.iter().filter(|l| l.starts_with("feature `") && l.contains("adapter")).collect();
    assert_eq!(adapters.len(), 4, "{log:?}");
    // Adapters are training-only: no extra weights in the output.
    assert_eq!(distilled_weights, student_weights);
    // The fixture's random-weight features are noise-like, so the feature
    // term competes with the logits here (measured: 0.995 -> 0.336).
    assert!(after < 0.5 * before, "KL on fresh images: before {before:.4}, after {after:.4}");
}

/// `features: pooled`: one adapter, on the pooled features the classifier
/// reads; the teacher's targets (logits and features) are cached per view,
/// so with `views: 1` it runs in epoch 1 only.
#[test]
fn pooled_feature_distillation_caches_the_teachers_features_per_view() {
    let opts =
        |dir: &Path| DistillOptions { feature_weight: 1.0, features: FeatureSet::Pooled, views: Some(1), holdout: 0.0, ..options(dir, 4) };
    let (before, after, log, (student_weights, distilled_weights)) = distill_fixture(opts);
    let adapters: Vec<&String> = log.iter().filter(|l| l.starts_with("feature `") && l.contains("adapter")).collect();
    // The fixture's ResNet-50 at width 1/8: 2048 / 8 = 256 pooled channels.
    assert_eq!(adapters.len(), 1, "{log:?}");
    assert!(adapters[0].contains("-> 256 channels"), "{log:?}");
    let taught: Vec<&str> = log.iter().filter(|l| l.contains("/4: loss")).map(|l| l.split("s on ").nth(1).unwrap()).collect();
    // 40 images, batch 8: 5 steps of 8, every image once per epoch.
    assert_eq!(taught.iter().map(|t| t.split(' ').next().unwrap()).collect::<Vec<_>>(), ["40", "0", "0", "0"], "{log:?}");
    assert_eq!(distilled_weights, student_weights, "the adapter is training-only");
    assert!(after < 0.5 * before, "KL on fresh images: before {before:.4}, after {after:.4}");
    // `holdout: 0`: nothing is scored, the last epoch stays.
    assert!(log.contains(&"epoch 0 (before training): no hold-out (`holdout: 0`; the last epoch is kept)".to_string()), "{log:?}");
    assert!(log.iter().any(|l| l.starts_with("kept epoch 4 (no hold-out")), "{log:?}");
}

#[test]
fn features_without_a_feature_weight_are_refused() {
    let opts = DistillOptions { features: FeatureSet::Pooled, ..Default::default() };
    let err = PassSpec::Distill(opts).check().unwrap_err();
    assert!(err.to_string().contains("`distill.features` names what `distill.feature_weight` weighs"), "{err}");
}

#[test]
fn a_run_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write_images(&dir.path().join("train"), 20, 6);
    let ckpt = dir.path().join("run.ckpt");
    let with_checkpoint = |epochs| {
        let mut passes = student_passes();
        passes.push(PassSpec::Distill(DistillOptions { checkpoint: Some(ckpt.clone()), ..options(dir.path(), epochs) }));
        let mut m = teacher();
        let reports = run_passes(&mut m, &passes);
        (m, reports.last().unwrap().changed.iter().map(|c| c.what.clone()).collect::<Vec<_>>())
    };
    let (straight, _) = with_checkpoint(2);
    assert!(ckpt.exists());
    // The same run again resumes after its last epoch: nothing left to train, same weights.
    let (again, log) = with_checkpoint(2);
    assert_eq!(log[0], "resumed from checkpoint after epoch 2");
    for (name, w) in straight.graph.weights() {
        assert_eq!(w.as_f32(), again.graph.weights()[name].as_f32(), "weight {name}");
    }
    // An interrupted run (1 epoch done) continues with epoch 2.
    std::fs::remove_file(&ckpt).unwrap();
    let (_, first) = with_checkpoint(1);
    assert!(first[1].starts_with("epoch 1/1"), "{first:?}");
    let (_, second) = with_checkpoint(2);
    assert_eq!(second[0], "resumed from checkpoint after epoch 1");
    assert!(second[1].starts_with("epoch 2/2"), "{second:?}");
}

/// `teacher_cache`: a second run on the same teacher and photos takes every
/// teacher output from the cache (the teacher runs on no image), and the
/// student it writes is the same, bit for bit, as the first run's and as a
/// run without a cache.
#[test]
fn a_warm_teacher_cache_runs_no_teacher_and_changes_no_bit() {
    let dir = tempfile::tempdir().unwrap();
    write_images(&dir.path().join("train"), 24, 6);
    let cache = dir.path().join("labels");
    let distill = |teacher_cache: Option<&Path>| {
        let mut passes = student_passes();
        let o = DistillOptions { teacher_cache: teacher_cache.map(Path::to_path_buf), ..options(dir.path(), 2) };
        passes.push(PassSpec::Distill(o));
        let mut m = teacher();
        let reports = run_passes(&mut m, &passes);
        let log: Vec<String> = reports.last().unwrap().changed.iter().map(|c| c.what.clone()).collect();
        (cresnet_opt::io::to_bytes(&m).unwrap(), log)
    };
    // Images the teacher ran on, per epoch.
    let taught = |log: &[String]| -> Vec<String> {
        log.iter()
            .filter(|l| l.contains("/2: loss"))
            .map(|l| l.split("s on ").nth(1).unwrap().split(' ').next().unwrap().to_string())
            .collect()
    };
    let (plain, plain_log) = distill(None);
    let (cold, cold_log) = distill(Some(&cache));
    let (warm, warm_log) = distill(Some(&cache));
    // 24 images: 2 held out (their centre crops padded to a batch of 8 with
    // blank images: 3 distinct views of 8, each computed once), 22 to train
    // in 2 steps of 8 an epoch: 16 fresh crops per epoch; 3 + 2 × 16 = 35.
    assert_eq!(taught(&plain_log), ["16", "16"], "{plain_log:?}");
    assert_eq!(taught(&cold_log), ["16", "16"], "{cold_log:?}");
    assert_eq!(taught(&warm_log), ["0", "0"], "{warm_log:?}");
    let note = |log: &[String]| log.iter().find(|l| l.starts_with("teacher cache ")).cloned().unwrap_or_default();
    assert!(note(&cold_log).ends_with(": 0 views reused, 35 computed by the teacher, 35 stored (35 views indexed)"), "{cold_log:?}");
    assert!(note(&warm_log).ends_with(": 40 views reused, 0 computed by the teacher, 0 stored (35 views indexed)"), "{warm_log:?}");
    assert!(plain == cold && cold == warm, "the cache changed the student");
}

/// `precision: bf16` (products in bf16 with f32 sums, the teacher in this
/// engine): the student learns its teacher as in f32, a second run with
/// the same seed writes the same bytes, and the bytes are not f32's (the
/// products did change). Pooled and stage features reach the engine's
/// teacher too. A CPU without AVX512-BF16 refuses it at validation.
#[test]
fn bf16_distillation_learns_its_teacher_reproducibly() {
    let bf16 = |dir: &Path, epochs| DistillOptions { precision: Precision::Bf16, ..options(dir, epochs) };
    if !bf16_available() {
        let err = PassSpec::Distill(bf16(Path::new("."), 1)).check().unwrap_err();
        assert!(err.to_string().contains("`distill.precision: bf16` needs a CPU with AVX512-BF16"), "{err}");
        return;
    }
    let (before, after, log, _) = distill_fixture(|dir| bf16(dir, 6));
    assert!(after < 0.25 * before, "KL on fresh images: before {before:.4}, after {after:.4}");
    assert!(log.iter().any(|l| l.starts_with("matrix products in bf16")), "{log:?}");
    let dir = tempfile::tempdir().unwrap();
    write_images(&dir.path().join("train"), 24, 6);
    let distill = |o: DistillOptions| {
        let mut passes = student_passes();
        passes.push(PassSpec::Distill(o));
        let mut m = teacher();
        run_passes(&mut m, &passes);
        cresnet_opt::io::to_bytes(&m).unwrap()
    };
    let (first, again, f32) = (distill(bf16(dir.path(), 1)), distill(bf16(dir.path(), 1)), distill(options(dir.path(), 1)));
    assert!(first == again, "two bf16 runs with one seed differ");
    assert!(first != f32, "bf16 gave f32's bytes: the products were not rounded");
    for features in [FeatureSet::Pooled, FeatureSet::Stages] {
        let (_, _, log, _) = distill_fixture(|dir| DistillOptions { feature_weight: 1.0, features, ..bf16(dir, 1) });
        assert!(log.iter().any(|l| l.starts_with("feature `") && l.contains("adapter")), "{features:?}: {log:?}");
    }
}

#[test]
fn a_teacher_cache_of_stage_features_is_refused() {
    let opts = DistillOptions { feature_weight: 1.0, teacher_cache: Some("labels".into()), ..Default::default() };
    let err = PassSpec::Distill(opts).check().unwrap_err();
    assert!(err.to_string().contains("`distill.teacher_cache` keeps logits and pooled features"), "{err}");
}

#[test]
fn a_checkpoint_of_another_student_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_images(&dir.path().join("train"), 20, 6);
    let ckpt = dir.path().join("run.ckpt");
    std::fs::write(&ckpt, b"not a checkpoint").unwrap();
    let mut passes = student_passes();
    passes.push(PassSpec::Distill(DistillOptions { checkpoint: Some(ckpt.clone()), ..options(dir.path(), 1) }));
    let mut m = teacher();
    let err = cresnet_opt::passes::run_pipeline(&mut m, &passes, &Default::default(), |_| {}).unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(err));
    assert!(msg.contains("run.ckpt: not a cresnet-opt checkpoint"), "{msg}");
}

#[test]
fn an_unfolded_student_is_refused_naming_the_node() {
    let dir = tempfile::tempdir().unwrap();
    write_images(&dir.path().join("train"), 4, 6);
    let mut m = teacher();
    let err =
        cresnet_opt::passes::run_pipeline(&mut m, &[PassSpec::Distill(options(dir.path(), 1))], &Default::default(), |_| {}).unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(err));
    assert!(msg.contains("after pass `distill`") && msg.contains("(BatchNormalization): fold it first"), "{msg}");
}

#[test]
fn distill_trains_at_another_resolution_and_the_student_keeps_its_own() {
    let (before, after, log, _) = distill_fixture(|dir| DistillOptions { resolution: Some(48), ..options(dir, 2) });
    assert_eq!(log[0], "training at 48x48 px (resize 54, crop 48)");
    // Trained on 48-px crops, measured at the model's 64 px: it still learned.
    assert!(after < before, "KL on fresh 64-px images: before {before:.4}, after {after:.4}");
}

#[test]
fn ema_forgets_its_start_within_the_first_steps_then_averages_at_its_decay() {
    use cresnet_opt::train::{optim::ema_update, Param};
    let weights = |v: f32| vec![Param { name: "w".into(), shape: vec![2], data: vec![v, -v], trainable: true }];
    // Step 0: decay min(0.99, 1/10) = 0.1, so the average moves 90 % of the way.
    let mut ema = vec![vec![0.0f32, 0.0]];
    ema_update(&mut ema, &weights(1.0), 0.99, 0);
    assert!((ema[0][0] - 0.9).abs() < 1e-6 && (ema[0][1] + 0.9).abs() < 1e-6, "{ema:?}");
    // Late in training the decay is the one asked for.
    let mut ema = vec![vec![0.0f32, 0.0]];
    ema_update(&mut ema, &weights(1.0), 0.99, 1_000_000);
    assert!((ema[0][0] - 0.01).abs() < 1e-6, "{ema:?}");
}

#[test]
fn an_ema_run_scores_the_average_and_resumes_it_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write_images(&dir.path().join("train"), 20, 6);
    let ckpt = dir.path().join("run.ckpt");
    let train = |epochs, ema, checkpoint: bool| {
        let mut passes = student_passes();
        let checkpoint = checkpoint.then(|| ckpt.clone());
        passes.push(PassSpec::Distill(DistillOptions { checkpoint, ema, ..options(dir.path(), epochs) }));
        let mut m = teacher();
        let reports = run_passes(&mut m, &passes);
        (m, reports.last().unwrap().changed.iter().map(|c| c.what.clone()).collect::<Vec<_>>())
    };
    let (plain, plain_log) = train(2, 0.0, false);
    let (averaged, log) = train(2, 0.9, false);
    assert!(log[1].starts_with("epoch 1/2") && log[1].contains("(EMA weights)"), "{log:?}");
    // The average never feeds back into training: the same loss epoch by epoch.
    let losses = |log: &[String]| {
        log.iter().filter(|l| l.contains(": loss ")).map(|l| l.split(", ").next().unwrap().to_string()).collect::<Vec<_>>()
    };
    assert_eq!(losses(&log), losses(&plain_log));
    assert_eq!(losses(&log).len(), 2, "{log:?}");
    // What is kept is the average, not the live weights (both runs keep a trained epoch).
    assert!(
        log.last().unwrap().starts_with("kept epoch 2") && plain_log.last().unwrap().starts_with("kept epoch 2"),
        "{log:?} {plain_log:?}"
    );
    let differs = plain.graph.weights().iter().any(|(name, w)| w.as_f32() != averaged.graph.weights()[name].as_f32());
    assert!(differs, "EMA on and off kept the same weights");
    // Interrupted after the first epoch: the average comes back from the checkpoint.
    train(1, 0.9, true);
    let (_, log) = train(2, 0.9, true);
    assert_eq!(log[0], "resumed from checkpoint after epoch 1", "{log:?}");
    assert!(log[1].starts_with("epoch 2/2") && log[1].contains("(EMA weights)"), "{log:?}");
    assert!(!log.iter().any(|l| l.contains("holds no EMA")), "{log:?}");
    // A checkpoint written without EMA starts the average where it resumes.
    std::fs::remove_file(&ckpt).unwrap();
    train(1, 0.0, true);
    let (_, log) = train(2, 0.9, true);
    assert_eq!(log[1], "the checkpoint holds no EMA weights: the average starts at epoch 2", "{log:?}");
}

#[test]
fn a_checkpoint_keeps_the_ema_weights_bit_for_bit() {
    use cresnet_opt::train::checkpoint::{load, save, State};
    use cresnet_opt::train::optim::{Kind, Optimizer};
    let mut m = teacher();
    run_passes(&mut m, &[fold()]);
    let shapes = cresnet_opt::validate::validate(&m.graph, &Default::default()).unwrap();
    let mut net = cresnet_opt::train::Network::from_graph(&m.graph, &shapes).unwrap();
    let sizes: Vec<usize> = net.params.iter().map(|p| p.data.len()).collect();
    let weights: Vec<Vec<f32>> = net.params.iter().map(|p| p.data.clone()).collect();
    let shifted = |d: f32| weights.iter().map(|w| w.iter().map(|v| v + d).collect()).collect::<Vec<Vec<f32>>>();
    let state = |kind, ema| State {
        epoch: 3,
        best_epoch: 2,
        best_agreement: 0.5,
        best_kl: 1.0,
        best_top1: Some(0.25),
        best_params: shifted(1.0),
        optimizer: Optimizer::new(kind, 0.0, &sizes),
        ema,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.ckpt");
    // SGD keeps one moment group, LAMB two: the EMA group follows either.
    for kind in [Kind::Lamb, Kind::Sgd] {
        save(&path, &net, &state(kind, Some(shifted(0.5)))).unwrap();
        let back = load(&path, &mut net, kind, 0.0).unwrap().unwrap();
        assert_eq!(back.ema, Some(shifted(0.5)), "{kind:?}");
        assert_eq!((back.epoch, back.best_params), (3, shifted(1.0)), "{kind:?}");
    }
    // Without EMA the file holds no such group, and says so.
    save(&path, &net, &state(Kind::Lamb, None)).unwrap();
    assert_eq!(load(&path, &mut net, Kind::Lamb, 0.0).unwrap().unwrap().ema, None);
    // A checkpoint written before EMA existed (no `ema` key in its header) still loads.
    let bytes = std::fs::read(&path).unwrap();
    let magic = b"cresnet-opt checkpoint 1\n".len();
    let len = u64::from_le_bytes(bytes[magic..magic + 8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[magic + 8..magic + 8 + len]).unwrap();
    let old = header.replace(",\"ema\":false", "");
    assert_ne!(old, header, "the header names the flag: {header}");
    let mut legacy = bytes[..magic].to_vec();
    legacy.extend_from_slice(&(old.len() as u64).to_le_bytes());
    legacy.extend_from_slice(old.as_bytes());
    legacy.extend_from_slice(&bytes[magic + 8 + len..]);
    std::fs::write(&path, legacy).unwrap();
    let back = load(&path, &mut net, Kind::Lamb, 0.0).unwrap().unwrap();
    assert_eq!((back.ema, back.best_params), (None, shifted(1.0)));
}
