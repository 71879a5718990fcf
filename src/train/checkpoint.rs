//! Training checkpoints: after every epoch the params, the best epoch's
//! params and the optimizer state go to one file, written atomically (temp
//! file + rename), so an interrupted run (Ctrl-C included) leaves the last
//! complete epoch on disk. Layout: magic line, u64 LE header length, JSON
//! header (counters, tensor names and lengths), then f32 LE data per group:
//! params, best params, optimizer moments, EMA weights (when kept).
use super::optim::{Kind, Optimizer};
use super::Network;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

const MAGIC: &[u8] = b"cresnet-opt checkpoint 1\n";

/// Where a run stands after a complete epoch.
#[derive(Debug, Clone)]
pub struct State {
    /// Epochs completed.
    pub epoch: usize,
    pub best_epoch: usize,
    pub best_agreement: f64,
    pub best_kl: f64,
    /// Hold-out top-1 against labels at the best epoch, when the hold-out is labelled.
    pub best_top1: Option<f64>,
    pub best_params: Vec<Vec<f32>>,
    pub optimizer: Optimizer,
    /// The moving average of the weights, when training keeps one (`ema`).
    pub ema: Option<Vec<Vec<f32>>>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    epoch: usize,
    step: u64,
    best_epoch: usize,
    best_agreement: f64,
    best_kl: f64,
    #[serde(default)]
    best_top1: Option<f64>,
    optimizer: Kind,
    tensors: Vec<(String, usize)>,
    /// A group of EMA weights follows the optimizer's (absent before EMA existed).
    #[serde(default)]
    ema: bool,
}

pub fn save(path: &Path, net: &Network, state: &State) -> Result<()> {
    let opt = &state.optimizer;
    let header = Header {
        epoch: state.epoch,
        step: opt.step,
        best_epoch: state.best_epoch,
        best_agreement: state.best_agreement,
        best_kl: state.best_kl,
        best_top1: state.best_top1,
        optimizer: opt.kind,
        tensors: net.params.iter().map(|p| (p.name.clone(), p.data.len())).collect(),
        ema: state.ema.is_some(),
    };
    let json = serde_json::to_vec(&header).map_err(|e| Error::Data(format!("checkpoint header: {e}")))?;
    let mut bytes = Vec::with_capacity(MAGIC.len() + 8 + json.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    let current = net.params.iter().map(|p| &p.data);
    let ema = state.ema.iter().flatten();
    for t in current.chain(&state.best_params).chain(&opt.m).chain(&opt.v).chain(ema) {
        t.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
    }
    crate::io::write_atomic(path, &bytes)
}

fn bad(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Data(format!("checkpoint {}: {why}", path.display()))
}

/// Restores `net`'s params and the run state, or None when `path` does not exist.
pub fn load(path: &Path, net: &mut Network, kind: Kind, weight_decay: f32) -> Result<Option<State>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    let rest = bytes.strip_prefix(MAGIC).ok_or_else(|| bad(path, "not a cresnet-opt checkpoint"))?;
    let (len, rest) = rest.split_first_chunk::<8>().ok_or_else(|| bad(path, "truncated header"))?;
    let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| bad(path, "bad header length"))?;
    let json = rest.get(..len).ok_or_else(|| bad(path, "truncated header"))?;
    let header: Header = serde_json::from_slice(json).map_err(|e| bad(path, e))?;
    let expected: Vec<(String, usize)> = net.params.iter().map(|p| (p.name.clone(), p.data.len())).collect();
    if header.tensors != expected {
        return Err(bad(path, "its tensors do not match this student (another model or pipeline?); delete it to start afresh"));
    }
    if header.optimizer != kind {
        return Err(bad(path, format!("it was written with optimizer {:?}, the pipeline asks for {kind:?}", header.optimizer)));
    }
    let groups = if kind == Kind::Sgd { 3 } else { 4 } + usize::from(header.ema);
    let total: usize = expected.iter().map(|(_, n)| n).sum::<usize>() * groups;
    let data = &rest[len..];
    if data.len() != total * 4 {
        return Err(bad(path, format!("holds {} bytes of tensor data, expected {}", data.len(), total * 4)));
    }
    let mut floats = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    let mut group = || expected.iter().map(|(_, n)| floats.by_ref().take(*n).collect::<Vec<f32>>()).collect::<Vec<_>>();
    let current = group();
    let best_params = group();
    let mut optimizer = Optimizer::new(kind, weight_decay, &[]);
    optimizer.m = group();
    optimizer.v = if kind == Kind::Sgd { vec![] } else { group() };
    optimizer.step = header.step;
    let ema = header.ema.then(&mut group);
    for (p, d) in net.params.iter_mut().zip(current) {
        p.data = d;
    }
    Ok(Some(State {
        epoch: header.epoch,
        best_epoch: header.best_epoch,
        best_agreement: header.best_agreement,
        best_kl: header.best_kl,
        best_top1: header.best_top1,
        best_params,
        optimizer,
        ema,
    }))
}
