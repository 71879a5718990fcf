//! Accuracy and fidelity of a model (and optionally a reference) on labelled
//! images or on random inputs, run with tract on all cores (rayon over
//! batches, each batch run single-threaded).
use crate::data::{stack, LabelMap, Preprocessing, Sample};
use crate::error::{Error, Result};
use crate::runner::Runner;
use ndarray::{ArrayD, Axis};
use rayon::prelude::*;
use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Accuracy {
    pub top1: f64,
    pub top5: f64,
}

/// The `--format json` document of `check`, field for field.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Evaluation {
    pub images: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<Accuracy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<Accuracy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rel_diff: Option<f64>,
    pub elapsed_s: f64,
}

/// Per-batch tallies, summed across batches.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    images: usize,
    top1: usize,
    top5: usize,
    ref_top1: usize,
    ref_top5: usize,
    agree: usize,
    max_rel_diff: f64,
}

impl Tally {
    fn merge(self, o: Tally) -> Tally {
        Tally {
            images: self.images + o.images,
            top1: self.top1 + o.top1,
            top5: self.top5 + o.top5,
            ref_top1: self.ref_top1 + o.ref_top1,
            ref_top5: self.ref_top5 + o.ref_top5,
            agree: self.agree + o.agree,
            max_rel_diff: self.max_rel_diff.max(o.max_rel_diff),
        }
    }
}

/// Where the inputs come from.
pub enum Inputs<'a> {
    Images { samples: &'a [Sample], preprocessing: &'a Preprocessing, label_map: Option<&'a LabelMap> },
    Random { count: usize, seed: u64 },
}

/// Indices of the `k` highest scores, best first.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// max |a − b| / max |a| over one image's logits.
pub fn rel_diff(reference: &[f32], other: &[f32]) -> f64 {
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let diff = reference.iter().zip(other).fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// Evaluates `model` (and `reference`) on `inputs`, batch by batch;
/// `progress` is called with the number of images done in each batch.
pub fn evaluate(
    model: &Runner,
    reference: Option<&Runner>,
    inputs: &Inputs,
    batch: usize,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Evaluation> {
    let started = std::time::Instant::now();
    let n = match inputs {
        Inputs::Images { samples, .. } => samples.len(),
        Inputs::Random { count, .. } => *count,
    };
    let chunks: Vec<(usize, usize)> = (0..n).step_by(batch).map(|s| (s, (s + batch).min(n))).collect();
    let tally = chunks
        .par_iter()
        .map(|&(s, e)| {
            let t = eval_batch(model, reference, inputs, s, e, batch)?;
            progress(e - s);
            Ok(t)
        })
        .try_reduce(Tally::default, |a, b| Ok(a.merge(b)))?;
    let share = |k: usize| k as f64 / tally.images.max(1) as f64;
    let labelled = matches!(inputs, Inputs::Images { .. });
    Ok(Evaluation {
        images: tally.images,
        model: labelled.then(|| Accuracy { top1: share(tally.top1), top5: share(tally.top5) }),
        reference: (labelled && reference.is_some()).then(|| Accuracy { top1: share(tally.ref_top1), top5: share(tally.ref_top5) }),
        agreement: reference.map(|_| share(tally.agree)),
        max_rel_diff: reference.map(|_| tally.max_rel_diff),
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

fn batch_input(inputs: &Inputs, start: usize, end: usize, batch: usize, shape: &[usize]) -> Result<(ArrayD<f32>, Vec<usize>)> {
    match inputs {
        Inputs::Images { samples, preprocessing, .. } => {
            let imgs = samples[start..end].iter().map(|s| preprocessing.load(&s.path)).collect::<Result<Vec<_>>>()?;
            let labels = samples[start..end].iter().map(|s| s.label).collect();
            Ok((stack(&imgs, batch).into_dyn(), labels))
        }
        Inputs::Random { seed, .. } => {
            let mut dims = shape.to_vec();
            dims[0] = batch;
            let mut rng = crate::rng::Rng::new(seed.wrapping_add(start as u64));
            let data = ArrayD::from_shape_simple_fn(dims, || rng.uniform() * 2.0 - 1.0);
            Ok((data, vec![]))
        }
    }
}

fn eval_batch(model: &Runner, reference: Option<&Runner>, inputs: &Inputs, start: usize, end: usize, batch: usize) -> Result<Tally> {
    let (input, labels) = batch_input(inputs, start, end, batch, &model.input_shape)?;
    let logits = first_output(model.run(input.clone())?)?;
    let ref_logits = reference.map(|r| r.run(input).and_then(first_output)).transpose()?;
    let label_map = match inputs {
        Inputs::Images { label_map, .. } => *label_map,
        _ => None,
    };
    let scores = |l: &[f32]| label_map.map_or_else(|| l.to_vec(), |m| m.scores(l));
    let mut t = Tally { images: end - start, ..Default::default() };
    for i in 0..end - start {
        let row = logits.index_axis(Axis(0), i);
        let row = row.as_slice().ok_or_else(|| Error::Data("non-contiguous output".into()))?;
        let top = top_k(&scores(row), 5);
        if let Some(&label) = labels.get(i) {
            t.top1 += usize::from(top[0] == label);
            t.top5 += usize::from(top.contains(&label));
        }
        if let Some(r) = &ref_logits {
            let rrow = r.index_axis(Axis(0), i);
            let rrow = rrow.as_slice().ok_or_else(|| Error::Data("non-contiguous output".into()))?;
            let rtop = top_k(&scores(rrow), 5);
            t.agree += usize::from(rtop[0] == top[0]);
            t.max_rel_diff = t.max_rel_diff.max(rel_diff(rrow, row));
            if let Some(&label) = labels.get(i) {
                t.ref_top1 += usize::from(rtop[0] == label);
                t.ref_top5 += usize::from(rtop.contains(&label));
            }
        }
    }
    Ok(t)
}

fn first_output(outputs: Vec<ArrayD<f32>>) -> Result<ArrayD<f32>> {
    let out = outputs.into_iter().next().ok_or_else(|| Error::Data("the model produced no output".into()))?;
    if out.ndim() != 2 || out.shape()[1] == 0 {
        return Err(Error::Data(format!("expected [batch, classes] logits, got shape {:?}", out.shape())));
    }
    Ok(out.as_standard_layout().into_owned())
}
