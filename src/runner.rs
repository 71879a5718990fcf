//! Running a model with tract: the accuracy check, the round-trip tests and
//! the latency benchmarks all go through here. The symbolic batch (and a
//! symbolic height/width) is fixed by setting the input fact; declared
//! output facts and the intermediate value_info are not given to tract
//! (they carry the symbolic `batch`, which would clash with the fixed one:
//! the dynamo exporter declares nearly every tensor).
use crate::error::{Error, Result};
use crate::ir::Model;
use crate::shape::InputShapes;
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
        Self::build(model, batch, extra_outputs, true, &InputShapes::new())
    }

    /// [`new`](Self::new) with `--input-shape` overrides (the batch is still `batch`).
    pub fn with_shapes(model: &Model, batch: usize, extra_outputs: &[String], overrides: &InputShapes) -> Result<Runner> {
        Self::build(model, batch, extra_outputs, true, overrides)
    }

    /// Compiles only what computes `outputs` (intermediate tensors): the
    /// rest of the network is pruned away, so early layers run cheaply.
    pub fn truncated(model: &Model, batch: usize, outputs: &[String]) -> Result<Runner> {
        Self::build(model, batch, outputs, false, &InputShapes::new())
    }

    /// [`truncated`](Self::truncated) for inputs of `shape` (batch
    /// included): a model with a symbolic height/width runs at the size of
    /// the images it is given.
    pub fn truncated_at(model: &Model, shape: &[usize], outputs: &[String]) -> Result<Runner> {
        Self::build(model, shape[0], outputs, false, &Self::input_override(model, shape)?)
    }

    /// [`new`](Self::new) for inputs of `shape` (batch included).
    pub fn at(model: &Model, shape: &[usize], extra_outputs: &[String]) -> Result<Runner> {
        Self::build(model, shape[0], extra_outputs, true, &Self::input_override(model, shape)?)
    }

    fn input_override(model: &Model, shape: &[usize]) -> Result<InputShapes> {
        let input = model.graph.data_input().ok_or_else(|| Error::invalid("the model has no input"))?;
        Ok([(input.name().to_string(), shape.to_vec())].into())
    }

    fn build(model: &Model, batch: usize, extra_outputs: &[String], keep_model_outputs: bool, overrides: &InputShapes) -> Result<Runner> {
        let mut proto = model.to_proto()?;
        if let Some(g) = proto.graph.as_mut() {
            g.value_info.clear();
        }
        let bytes = prost::Message::encode_to_vec(&proto);
        let mut shape = model_input_shape_with(model, overrides)?;
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

    /// Values per output, when every output's shape is known.
    pub fn output_lens(&self) -> Option<Vec<usize>> {
        let model = self.plan.model();
        let outlets = model.output_outlets().ok()?;
        outlets.iter().map(|&o| model.outlet_fact(o).ok()?.shape.as_concrete().map(|s| s.iter().product())).collect()
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

/// The first graph input that is not an initializer, with a symbolic batch
/// as 1 and symbolic height/width as [`crate::shape::DEFAULT_RESOLUTION`].
pub fn model_input_shape(model: &Model) -> Result<Vec<usize>> {
    model_input_shape_with(model, &InputShapes::new())
}

/// [`model_input_shape`] with `--input-shape` overrides.
pub fn model_input_shape_with(model: &Model, overrides: &InputShapes) -> Result<Vec<usize>> {
    let input = model.graph.data_input().ok_or_else(|| Error::invalid("the model has no input"))?;
    let info = crate::shape::input_info(input, overrides.get(input.name()));
    match info.shape {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(Error::invalid(format!("input `{}` has no usable shape (give --input-shape {}:N,C,H,W)", input.name(), input.name()))),
    }
}
