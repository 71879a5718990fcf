//! Mutation testing in-process: thousands of corrupted models go through
//! load → validate → fold, prune, dw → save; none may panic.
mod common;
use common::*;
use cresnet_opt::fixture::{resnet50, FixtureSpec, Rng};
use cresnet_opt::passes::dw::DwOptions;
use cresnet_opt::passes::prune::PruneOptions;
use cresnet_opt::passes::PassSpec;

fn mutate(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = bytes.to_vec();
    match rng.below(4) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(b.len());
                b[at] ^= 1 << rng.below(8);
            }
        }
        1 => b.truncate(rng.below(b.len())),
        2 => {
            let at = rng.below(b.len());
            b[at] = [0x00, 0xff, 0x7f, 0x80][rng.below(4)];
        }
        _ => {
            // Duplicate a chunk (repeated fields, shifted lengths).
            let (start, len) = (rng.below(b.len()), 1 + rng.below(64));
            let chunk = b[start..(start + len).min(b.len())].to_vec();
            let at = rng.below(b.len());
            b.splice(at..at, chunk);
        }
    }
    b
}

#[test]
fn corrupted_models_never_panic() {
    let model = resnet50(&FixtureSpec { width_div: 32, input_size: 32, classes: 10, blocks: [1, 1, 1, 1], ..Default::default() }).unwrap();
    let bytes = cresnet_opt::io::to_bytes(&model).unwrap();
    let passes = [
        fold(),
        PassSpec::Prune(PruneOptions::default()),
        PassSpec::Dw(DwOptions { rank: Some(1), ..Default::default() }),
        PassSpec::Lowrank(Default::default()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let mut rng = Rng::new(2024);
    let (mut loaded, mut saved) = (0, 0);
    for i in 0..3000 {
        let input = mutate(&bytes, &mut rng);
        let result = std::panic::catch_unwind(|| {
            let Ok(mut m) = cresnet_opt::io::from_bytes(input.clone().into(), "mutant", None) else { return (false, false) };
            if cresnet_opt::validate::validate(&m.graph, &Default::default()).is_err() {
                return (true, false);
            }
            let ok = cresnet_opt::passes::run_pipeline(&mut m, &passes, &Default::default(), |_| {}).is_ok();
            (true, ok && cresnet_opt::io::save(&m, &out, false).is_ok())
        });
        let (l, s) = result.unwrap_or_else(|_| panic!("mutant {i} panicked"));
        loaded += l as usize;
        saved += s as usize;
    }
    // The mutations must exercise the passes, not just the decoder.
    assert!(loaded > 300 && saved > 100, "loaded {loaded}, saved {saved}");
}
