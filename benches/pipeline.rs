//! Benchmarks (a plain harness: `cargo bench --bench pipeline`).
//! Times load / validate / save / each pass of the shared ResNet-50, median
//! of several runs. Needs ../shared/models/resnet50-imagenet.onnx.
use cresnet_opt::passes::dw::DwOptions;
use cresnet_opt::passes::fold::FoldOptions;
use cresnet_opt::passes::lowrank::LowrankOptions;
use cresnet_opt::passes::prune::PruneOptions;
use cresnet_opt::passes::PassSpec;
use std::path::Path;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> f64 {
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(f());
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Minor page faults of this process so far (0 where /proc is not there):
/// each is a fresh page the kernel zeroes, a cost a step should not pay.
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Field 10 (minflt), counted after the parenthesised command name.
    stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(7)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn main() {
    if std::env::args().any(|a| a == "--peak") {
        peak_benches();
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/resnet50-imagenet.onnx");
    if !path.exists() {
        eprintln!("skipped: {} not found", path.display());
        return;
    }
    let runs = 7;
    let out = std::env::temp_dir().join("cresnet-bench-out.onnx");
    let model = cresnet_opt::io::load(&path).expect("load");
    println!("load (read + decode + validate)   {:>8.1} ms", 1e3 * time(runs, || cresnet_opt::io::load(&path).expect("load")));
    println!(
        "validate                          {:>8.1} ms",
        1e3 * time(runs, || cresnet_opt::validate::validate(&model.graph, &Default::default()).expect("valid"))
    );
    println!("encode to bytes                   {:>8.1} ms", 1e3 * time(runs, || cresnet_opt::io::to_bytes(&model).expect("encode")));
    println!(
        "save (encode + write + rename)    {:>8.1} ms",
        1e3 * time(runs, || cresnet_opt::io::save(&model, &out, false).expect("save"))
    );
    let passes = [
        ("fold", vec![PassSpec::Fold(FoldOptions::default())]),
        ("fold,prune", vec![PassSpec::Fold(FoldOptions::default()), PassSpec::Prune(PruneOptions::default())]),
        (
            "fold,prune,dw",
            vec![PassSpec::Fold(FoldOptions::default()), PassSpec::Prune(PruneOptions::default()), PassSpec::Dw(DwOptions::default())],
        ),
    ];
    for (name, specs) in passes {
        let t = time(runs, || {
            let mut m = model.clone();
            cresnet_opt::passes::run_pipeline(&mut m, &specs, &Default::default(), |_| {}).expect("passes")
        });
        println!("passes {name:<26} {:>8.1} ms (in memory, incl. validation)", 1e3 * t);
    }
    let _ = std::fs::remove_file(out);
    if std::env::args().any(|a| a == "--tract") {
        tract_benches(&path, &model);
    }
    if std::env::args().any(|a| a == "--bf16-accuracy") {
        bf16_teacher_accuracy(&path, &model);
    }
    if std::env::args().any(|a| a == "--train") {
        train_engine_vs_frameworks();
        train_benches(&model, true);
    }
    if std::env::args().any(|a| a == "--students") {
        train_benches(&model, false);
    }
}

/// The workload burn and candle were measured on (README): 3 blocks of
/// depthwise 3x3 + 1x1 conv (64 channels) on 8x64x56x56, one Adam step.
fn train_engine_vs_frameworks() {
    use cresnet_opt::fixture::{ConvSpec, Net};
    let mut net = Net::new(1).input("x", &[1, 64, 56, 56]);
    let mut x = "x".to_string();
    for i in 0..3 {
        let d = net.conv(&format!("dw{i}"), &x, ConvSpec { group: 64, ..ConvSpec::new(64, 64, 3) });
        let r = net.op("Relu", &format!("r{i}a"), &[&d]);
        let p = net.conv(&format!("pw{i}"), &r, ConvSpec::new(64, 64, 1));
        x = net.op("Relu", &format!("r{i}b"), &[&p]);
    }
    let model = net.model(&[&x]).expect("model");
    let shapes = cresnet_opt::validate::validate(&model.graph, &Default::default()).expect("valid");
    for bn in [false, true] {
        let mut engine = if bn {
            cresnet_opt::train::Network::with_batchnorm(&model.graph, &shapes)
        } else {
            cresnet_opt::train::Network::from_graph(&model.graph, &shapes)
        }
        .expect("engine");
        let sizes: Vec<usize> = engine.params.iter().map(|p| p.data.len()).collect();
        let mut opt = cresnet_opt::train::optim::Optimizer::new(cresnet_opt::train::optim::Kind::Adam, 0.0, &sizes);
        let input = vec![0.5f32; 8 * engine.input_len()];
        let seed = vec![1e-3f32; 8 * engine.output_len()];
        let t = time(5, || {
            let mut acts = engine.forward(input.clone(), 8).expect("forward");
            let grads = engine.backward(&mut acts, vec![(engine.output(), seed.clone())]);
            opt.update(&mut engine.params, &grads, 1e-3);
        });
        println!("train 3x(dw3x3+1x1) 8x64x56x56 Adam step{}: {:.0} ms", if bn { " (BN after every conv)" } else { "" }, 1e3 * t);
    }
}

/// One training step (forward + backward, batch 16, 224x224) of the
/// training engine on the folded model and on data-free compressed students.
fn train_benches(model: &cresnet_opt::ir::Model, with_teacher: bool) {
    let fold = PassSpec::Fold(FoldOptions::default());
    let dw1 = PassSpec::Dw(DwOptions { rank: Some(1), ..Default::default() });
    let prune = PassSpec::Prune(PruneOptions { target_params: Some(0.3), ..Default::default() });
    let lowrank = |ratio: f64, min_resolution: Option<usize>, max_resolution: Option<usize>| {
        PassSpec::Lowrank(LowrankOptions { ratio: Some(ratio), min_resolution, max_resolution, ..Default::default() })
    };
    let dw = |rank: usize, min_resolution: Option<usize>, max_resolution: Option<usize>| {
        PassSpec::Dw(DwOptions { rank: Some(rank), min_resolution, max_resolution, ..Default::default() })
    };
    let recipe =
        vec![fold.clone(), lowrank(0.6, Some(28), None), lowrank(0.2445, None, Some(14)), dw(2, Some(28), None), dw(1, None, Some(14))];
    let students = [
        ("fold", vec![fold.clone()]),
        ("fold,dw r1", vec![fold.clone(), dw1.clone(), fold.clone()]),
        ("fold,prune p0.3,dw r1", vec![fold.clone(), prune, dw1, fold]),
        ("cresnet (data-free)", recipe),
    ];
    let batch = 16;
    for b in if with_teacher { vec![1, 4, 16] } else { vec![] } {
        let runner = cresnet_opt::runner::Runner::new(model, b, &[]).expect("tract");
        let x = ndarray::ArrayD::<f32>::from_elem(vec![b, 3, 224, 224], 0.5);
        let t1 = time(3, || runner.run(x.clone()).expect("run"));
        let t2 = time(3, || runner.run_threads(x.clone(), 2).expect("run"));
        println!(
            "teacher (tract) batch {b:>2}: {:>6.1} ms/image (1 thread) {:>6.1} ms/image (2 threads)",
            1e3 * t1 / b as f64,
            1e3 * t2 / b as f64
        );
    }
    // `--only NAME` times the students whose name contains NAME (for `perf`).
    let args: Vec<String> = std::env::args().collect();
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned().unwrap_or_default();
    for (name, specs) in students.into_iter().filter(|(name, _)| name.contains(only.as_str())) {
        let mut m = model.clone();
        cresnet_opt::passes::run_pipeline(&mut m, &specs, &Default::default(), |_| {}).expect("passes");
        let shapes = cresnet_opt::validate::validate(&m.graph, &Default::default()).expect("valid");
        // `--no-bn`: the student as `distill` trains it by default (BN folded, none added).
        let net = if args.iter().any(|a| a == "--no-bn") {
            cresnet_opt::train::Network::from_graph(&m.graph, &shapes)
        } else {
            cresnet_opt::train::Network::with_batchnorm(&m.graph, &shapes)
        }
        .expect("engine");
        let mut net = net;
        // `--bf16`: the products in bf16 with f32 sums (`distill.precision: bf16`).
        if args.iter().any(|a| a == "--bf16") {
            net.set_precision(cresnet_opt::train::kernels::Precision::Bf16).expect("bf16");
        }
        let x = vec![0.5f32; batch * net.input_len()];
        let seed = vec![1e-3f32; batch * net.output_len()];
        let fwd = time(3, || net.forward(x.clone(), batch).expect("forward"));
        let step = time(3, || {
            let mut acts = net.forward(x.clone(), batch).expect("forward");
            net.backward(&mut acts, vec![(net.output(), seed.clone())])
        });
        let params: usize = net.params.iter().map(|p| p.data.len()).sum();
        let faults = minor_faults();
        let mut acts = net.forward(x.clone(), batch).expect("forward");
        drop(net.backward(&mut acts, vec![(net.output(), seed.clone())]));
        let faults = minor_faults().saturating_sub(faults);
        println!(
            "train {name:<22} params {params:>10}  forward {:>6.0} ms  forward+backward {:>6.0} ms per batch of {batch}  ({faults} page faults in a step)",
            1e3 * fwd,
            1e3 * step
        );
        if args.iter().any(|a| a == "--profile") {
            profile_steps(&net, &x, &seed, batch);
        }
    }
}

/// Wall time per kind of step over three warm training steps (after the
/// timed ones): where a step goes, op by op.
fn profile_steps(net: &cresnet_opt::train::Network, x: &[f32], seed: &[f32], batch: usize) {
    const STEPS: usize = 3;
    net.profile(true);
    for _ in 0..STEPS {
        let mut acts = net.forward(x.to_vec(), batch).expect("forward");
        drop(net.backward(&mut acts, vec![(net.output(), seed.to_vec())]));
    }
    net.profile(false);
    let rows = net.step_times();
    let total: f64 = rows.iter().map(|r| r.1 + r.2).sum();
    println!("  {:<34} {:>6} {:>10} {:>10} {:>7}", "step kind", "count", "forward", "backward", "share");
    for (kind, fwd, bwd, count) in rows {
        let ms = |secs: f64| 1e3 * secs / STEPS as f64;
        println!("  {kind:<34} {:>6} {:>7.1} ms {:>7.1} ms {:>6.1} %", count / STEPS, ms(fwd), ms(bwd), 100.0 * (fwd + bwd) / total);
    }
}

/// tract latency at batch 1 (1 and 2 threads) of the original, the folded
/// model and any compressed models left by scripts/measure.sh, and the
/// throughput of `check` (model + reference) on 64 real images.
fn tract_benches(path: &Path, model: &cresnet_opt::ir::Model) {
    use cresnet_opt::runner::Runner;
    let mut folded = model.clone();
    cresnet_opt::passes::run_pipeline(&mut folded, &[PassSpec::Fold(FoldOptions::default())], &Default::default(), |_| {}).expect("fold");
    let mut models = vec![("original".to_string(), model.clone()), ("fold".to_string(), folded.clone())];
    let measured = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/measure");
    for name in ["dw-r1-cal", "dw-r2-cal", "prune-m0.7-cal", "prune-m0.5-cal"] {
        if let Ok(m) = cresnet_opt::io::load(&measured.join(format!("{name}.onnx"))) {
            models.push((name.to_string(), m));
        }
    }
    let x = ndarray::ArrayD::<f32>::from_elem(vec![1, 3, 224, 224], 1.0);
    for (name, m) in &models {
        let runner = Runner::new(m, 1, &[]).expect("tract");
        let t1 = time(10, || runner.run(x.clone()).expect("run"));
        let t2 = time(10, || runner.run_threads(x.clone(), 2).expect("run"));
        println!("tract batch 1 {name:<16} {:>7.1} ms (1 thread) {:>7.1} ms (2 threads)", 1e3 * t1, 1e3 * t2);
    }
    let data = path.parent().and_then(Path::parent).expect("shared").join("data");
    let samples =
        cresnet_opt::data::labelled(&data.join("imagenet-1k-sample"), Some(&data.join("imagenet-1k-classes.txt")), 1000).expect("data");
    let samples = &samples[..64];
    let pre = cresnet_opt::data::Preprocessing::caffe();
    let inputs = cresnet_opt::evaluate::Inputs::Images { samples, preprocessing: &pre, label_map: None };
    let (a, b) = (Runner::new(&folded, 4, &[]).expect("tract"), Runner::new(model, 4, &[]).expect("tract"));
    let t = time(3, || cresnet_opt::evaluate::evaluate(&a, Some(&b), &inputs, 4, &|_| {}).expect("check"));
    println!("check throughput (model + reference, 2 cores, batch 4): {:.1} images/s", samples.len() as f64 / t);
}

/// This CPU's arithmetic ceiling, the yardstick for the engine's GFLOP/s:
/// independent fused multiply-adds held in registers (AVX2 and AVX-512
/// f32, and AVX512-BF16's pairwise dot product), then a large square
/// `matrixmultiply` product, on 1 and 2 threads.
fn peak_benches() {
    #[cfg(target_arch = "x86_64")]
    {
        const FLOPS: f64 = 2e10;
        type Kernel = fn(f64) -> f32;
        let kinds: [(&str, bool, Kernel); 3] = [
            ("f32 FMA, AVX2 (8 lanes)", std::arch::is_x86_feature_detected!("fma"), |f| unsafe { fma_ymm(f) }),
            ("f32 FMA, AVX-512 (16 lanes)", std::arch::is_x86_feature_detected!("avx512f"), |f| unsafe { fma_zmm(f) }),
            ("bf16 pair dot, AVX512-BF16", std::arch::is_x86_feature_detected!("avx512bf16"), |f| unsafe { dot_bf16(f) }),
        ];
        for (name, present, run) in kinds {
            if !present {
                println!("peak {name:<30} not on this CPU");
                continue;
            }
            for threads in [1, 2] {
                let t = time(3, || {
                    std::thread::scope(|s| {
                        let handles: Vec<_> = (0..threads).map(|_| s.spawn(|| run(FLOPS))).collect();
                        handles.into_iter().map(|h| h.join().unwrap()).sum::<f32>()
                    })
                });
                println!("peak {name:<30} {threads} thread(s): {:>6.1} GFLOP/s", threads as f64 * FLOPS / t / 1e9);
            }
        }
    }
    let n = 1024;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 - 3.0).collect();
    let mut c = vec![0f32; n * n];
    for threads in [1, 2] {
        let t = time(5, || {
            // Each thread computes its own rows of C (the engine splits work the same way).
            let rows = n / threads;
            std::thread::scope(|s| {
                for part in c.chunks_mut(rows * n) {
                    let a = &a;
                    s.spawn(move || unsafe {
                        let r = part.len() / n;
                        matrixmultiply::sgemm(
                            r,
                            n,
                            n,
                            1.0,
                            a.as_ptr(),
                            n as isize,
                            1,
                            a.as_ptr(),
                            n as isize,
                            1,
                            0.0,
                            part.as_mut_ptr(),
                            n as isize,
                            1,
                        )
                    });
                }
            })
        });
        println!("peak sgemm 1024^3 (matrixmultiply)  {threads} thread(s): {:>6.1} GFLOP/s", 2.0 * (n * n * n) as f64 / t / 1e9);
    }
}

/// `flops` worth of FMAs on 12 independent 8-lane sums (enough to cover
/// the FMA latency on both pipes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_ymm(flops: f64) -> f32 {
    use std::arch::x86_64::*;
    let (b, c) = (_mm256_set1_ps(0.999), _mm256_set1_ps(1e-6));
    let mut acc = [_mm256_setzero_ps(); 12];
    for _ in 0..(flops / (12.0 * 16.0)) as usize {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, b, c);
        }
    }
    let mut out = [0f32; 8];
    let sum = acc.iter().fold(_mm256_setzero_ps(), |s, a| _mm256_add_ps(s, *a));
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
    out[0]
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_zmm(flops: f64) -> f32 {
    use std::arch::x86_64::*;
    let (b, c) = (_mm512_set1_ps(0.999), _mm512_set1_ps(1e-6));
    let mut acc = [_mm512_setzero_ps(); 12];
    for _ in 0..(flops / (12.0 * 32.0)) as usize {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, b, c);
        }
    }
    _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, *a)))
}

/// Each `vdpbf16ps` on 16 lanes is 32 multiply-adds of bf16 pairs into f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
fn dot_bf16(flops: f64) -> f32 {
    use std::arch::x86_64::*;
    let ones = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0), _mm512_set1_ps(1.0));
    let mut acc = [_mm512_setzero_ps(); 12];
    for _ in 0..(flops / (12.0 * 64.0)) as usize {
        for a in acc.iter_mut() {
            *a = _mm512_dpbf16_ps(*a, ones, ones);
        }
    }
    _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, *a)))
}

/// What bf16 products do to the teacher (`distill.precision: bf16`): the
/// shared ResNet-50, folded, in this engine with f32 and with bf16
/// products, on the 744 evaluation photos of the ImageNet split (the
/// sample sorted by path, after the first 256): top-1 of each, top-1
/// agreement, the largest relative change of an output.
fn bf16_teacher_accuracy(path: &Path, model: &cresnet_opt::ir::Model) {
    use cresnet_opt::train::{kernels::Precision, Mode, Network};
    if !cresnet_opt::train::kernels::bf16_available() {
        println!("bf16 teacher accuracy: skipped, no AVX512-BF16 on this CPU");
        return;
    }
    let data = path.parent().and_then(Path::parent).expect("shared").join("data");
    let classes = data.join("imagenet-1k-classes.txt");
    let mut samples = cresnet_opt::data::labelled(&data.join("imagenet-1k-sample"), Some(&classes), 1000).expect("data");
    samples.sort_by(|a, b| a.path.cmp(&b.path));
    let eval = &samples[256..];
    let pre = cresnet_opt::data::Preprocessing::caffe();
    let mut folded = model.clone();
    cresnet_opt::passes::run_pipeline(&mut folded, &[PassSpec::Fold(FoldOptions::default())], &Default::default(), |_| {}).expect("fold");
    let shapes = cresnet_opt::validate::validate(&folded.graph, &Default::default()).expect("valid");
    let f32_net = Network::from_graph(&folded.graph, &shapes).expect("engine");
    let mut bf16_net = f32_net.clone();
    bf16_net.set_precision(Precision::Bf16).expect("bf16");
    bf16_net.pack_weights();
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap_or(0);
    let (mut right, mut agree, mut worst) = ([0usize; 2], 0usize, 0f32);
    for chunk in eval.chunks(16) {
        let images: Vec<_> = chunk.iter().map(|s| pre.load(&s.path).expect("image")).collect();
        let x = cresnet_opt::data::stack(&images, images.len()).into_raw_vec_and_offset().0;
        let outs: Vec<Vec<f32>> = [&f32_net, &bf16_net]
            .iter()
            .map(|net| net.forward_mode(x.clone(), chunk.len(), Mode::Eval).expect("forward").value(net.output()).into_owned())
            .collect();
        let k = outs[0].len() / chunk.len();
        for (i, s) in chunk.iter().enumerate() {
            let (a, b) = (&outs[0][i * k..(i + 1) * k], &outs[1][i * k..(i + 1) * k]);
            right[0] += usize::from(argmax(a) == s.label);
            right[1] += usize::from(argmax(b) == s.label);
            agree += usize::from(argmax(a) == argmax(b));
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            worst = worst.max(a.iter().zip(b).fold(0f32, |m, (u, v)| m.max((u - v).abs())) / scale);
        }
    }
    let n = eval.len() as f64;
    println!(
        "bf16 teacher on {} photos: top-1 f32 {:.4}, bf16 {:.4}; top-1 agreement {:.4}; largest output change {:.4} of the largest output",
        eval.len(),
        right[0] as f64 / n,
        right[1] as f64 / n,
        agree as f64 / n,
        worst
    );
}
