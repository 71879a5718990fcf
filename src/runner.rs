//! Running a model with tract: the accuracy check, the round-trip tests and
//! the latency benchmarks all go through here. The symbolic batch dimension
//! is fixed by setting the input fact; declared output facts are dropped
//! (they carry the symbolic `N`, which would clash with the fixed batch).
use crate::error::{Error, Result};
use crate::ir::Model;
use ndarray::ArrayD;
use std::sync::Arc;
use tract_onnx::prelude::*;

type Plan = Arc<TypedRunnableModel>;

/// A model compiled by tract for one fixed input shape. Cheap to share
/// between threads: each `run` makes its own state.
pub struct Runner {
    plan: Plan,
    pub input_shape: Vec<usize>,
}

fn tract_err(e: impl std::fmt::Display) -> Error {
    Error::Tract(format!("{e:#}"))
}

impl Runner {
    /// Compiles `model` with batch size `batch`; `extra_outputs` names
    /// intermediate tensors to expose after the model's own outputs.
    pub fn new(model: &Model, batch: usize, extra_outputs: &[String]) -> Result<Runner> {
        Self::build(model, batch, extra_outputs, true)
    }

    /// Compiles only what computes `outputs` (intermediate tensors): the
    /// rest of the network is pruned away, so early layers run cheaply.
    pub fn truncated(model: &Model, batch: usize, outputs: &[String]) -> Result<Runner> {
        Self::build(model, batch, outputs, false)
    }

    fn build(model: &Model, batch: usize, extra_outputs: &[String], keep_model_outputs: bool) -> Result<Runner> {
        let bytes = crate::io::to_bytes(model)?;
        let mut shape = model_input_shape(model)?;
        shape[0] = batch;
        let plan = compile(&bytes, &shape, extra_outputs, keep_model_outputs).map_err(tract_err)?;
        Ok(Runner { plan, input_shape: shape })
    }

    /// Runs one batch; returns every output as an f32 array.
    pub fn run(&self, input: ArrayD<f32>) -> Result<Vec<ArrayD<f32>>> {
        if input.shape() != self.input_shape.as_slice() {
            return Err(Error::Data(format!("input shape {:?} does not match the model's {:?}", input.shape(), self.input_shape)));
        }
        let outputs = self.plan.run(tvec!(Tensor::from(input).into_tvalue())).map_err(tract_err)?;
        outputs.into_iter().map(|t| t.into_tensor().into_plain_array::<f32>().map_err(tract_err)).collect()
    }

    /// Like `run`, with tract's matrix products spread over `threads` threads.
    pub fn run_threads(&self, input: ArrayD<f32>, threads: usize) -> Result<Vec<ArrayD<f32>>> {
        if threads <= 1 {
            return self.run(input);
        }
        let executor = tract_linalg::multithread::Executor::multithread(threads);
        tract_linalg::multithread::multithread_tract_scope(executor, || self.run(input))
    }
}

/// Time one node of a compiled plan took, summed over the profiled runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeTime {
    /// tract's node name (the ONNX node's, plus a suffix for what tract split off).
    pub name: String,
    /// tract's operator after its optimizations (e.g. `Conv`, `OptMatMul`, `DepthWise`).
    pub op: String,
    pub ms: f64,
}

impl Runner {
    /// Runs `input` `runs` times on one thread (after a warm-up run) and
    /// returns the mean time of every node of tract's optimized plan, in
    /// plan order.
    pub fn profile(&self, input: ArrayD<f32>, runs: usize) -> Result<Vec<NodeTime>> {
        let mut state = tract_onnx::tract_core::plan::SimpleState::new(&self.plan).map_err(tract_err)?;
        let mut times: Vec<Option<NodeTime>> = vec![None; self.plan.model().nodes().len()];
        let x = Tensor::from(input).into_tvalue();
        for run in 0..=runs {
            state
                .run_plan_with_eval(tvec!(x.clone()), |ctx, op_state, node, inputs| {
                    let start = std::time::Instant::now();
                    let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                    let ms = 1e3 * start.elapsed().as_secs_f64() / runs.max(1) as f64;
                    let slot = times[node.id].get_or_insert_with(|| NodeTime {
                        name: node.name.clone(),
                        op: node.op().name().to_string(),
                        ms: 0.0,
                    });
                    // Run 0 warms the caches up and is not counted.
                    slot.ms += if run == 0 { 0.0 } else { ms };
                    out
                })
                .map_err(tract_err)?;
        }
        Ok(self.plan.order_without_consts().iter().filter_map(|&id| times.get(id).cloned().flatten()).collect())
    }
}

fn compile(bytes: &[u8], shape: &[usize], extra_outputs: &[String], keep_model_outputs: bool) -> TractResult<Plan> {
    let mut model = tract_onnx::onnx().model_for_read(&mut &bytes[..])?;
    model.set_input_fact(0, f32::fact(shape).into())?;
    for ix in 0..model.output_outlets()?.len() {
        model.set_output_fact(ix, InferenceFact::default())?;
    }
    if !extra_outputs.is_empty() {
        let mut outlets = if keep_model_outputs { model.output_outlets()?.to_vec() } else { vec![] };
        for name in extra_outputs {
            outlets.push(outlet(&model, name)?);
        }
        model.select_output_outlets(&outlets)?;
    }
    model.into_optimized()?.into_runnable()
}

/// The outlet carrying ONNX tensor `name` (tract labels outlets with tensor names).
fn outlet(model: &InferenceModel, name: &str) -> TractResult<OutletId> {
    if let Some(o) = model.find_outlet_label(name) {
        return Ok(o);
    }
    model.node_by_name(name).map(|n| OutletId::new(n.id, 0))
}

/// The first graph input that is not an initializer, with symbolic dims as 1.
pub fn model_input_shape(model: &Model) -> Result<Vec<usize>> {
    let g = &model.graph;
    let input =
        g.meta.input.iter().find(|i| !g.weights().contains_key(i.name())).ok_or_else(|| Error::invalid("the model has no input"))?;
    let info = crate::shape::value_info_tensor(input);
    match info.shape {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(Error::invalid(format!("input `{}` has no shape", input.name()))),
    }
}
