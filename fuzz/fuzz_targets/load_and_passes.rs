//! load → validate → fold, prune, dw → save, on arbitrary bytes. Any panic
//! is a bug: every bad input must come back as an error.
#![no_main]
use cresnet_opt::passes::dw::DwOptions;
use cresnet_opt::passes::fold::FoldOptions;
use cresnet_opt::passes::PassSpec;
use cresnet_opt::passes::prune::PruneOptions;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut model) = cresnet_opt::io::from_bytes(bytes::Bytes::copy_from_slice(data), "fuzz input", None) else { return };
    let passes = [
        PassSpec::Fold(FoldOptions::default()),
        PassSpec::Prune(PruneOptions { ratio: Some(0.5), ..Default::default() }),
        PassSpec::Dw(DwOptions { rank: Some(1), min_gain: -10.0, include: vec!["*".into()], ..Default::default() }),
    ];
    if cresnet_opt::passes::run_pipeline(&mut model, &passes, &Default::default(), |_| {}).is_ok() {
        let _ = cresnet_opt::io::to_bytes(&model);
    }
});
