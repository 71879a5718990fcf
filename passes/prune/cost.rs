//! The exact params/MACs of the prunable layers as a function of the
//! channels they keep (what `target_macs` / `target_params` bisect on).
use super::*;

/// Exact params/MACs of the prunable layers as a function of kept channels.
pub(super) struct CostModel {
    pub(super) terms: Vec<Term>,
    pub(super) fixed_params: f64,
    pub(super) fixed_macs: f64,
}

/// params = a·in·out + b·out (+ c·ch) and MACs = params_w·area, with `in`
/// and `out` the kept channels of the given tensors (or fixed counts).
pub(super) struct Term {
    pub(super) input: Dim,
    pub(super) output: Dim,
    pub(super) per_pair: f64,
    pub(super) per_out: f64,
    pub(super) area: f64,
}

#[derive(Clone, Copy)]
pub(super) enum Dim {
    Tensor(usize),
    Fixed(usize),
    One,
}

impl CostModel {
    pub(super) fn new(graph: &Graph, shapes: &Shapes, cg: &ChannelGraph) -> CostModel {
        let stats = crate::stats::from_shapes(graph, shapes);
        let mut terms = vec![];
        for (&ix, &role) in &cg.roles {
            terms.extend(term(graph, shapes, cg, ix, role));
        }
        let mut m = CostModel { terms, fixed_params: 0.0, fixed_macs: 0.0 };
        let (p, macs) = m.eval(cg, &vec![0; cg.tensors.len()]);
        m.fixed_params = stats.params as f64 - p;
        m.fixed_macs = stats.macs as f64 - macs;
        m
    }

    pub(super) fn eval(&self, cg: &ChannelGraph, removed: &[usize]) -> (f64, f64) {
        let dim = |d: Dim| match d {
            Dim::Tensor(t) => (cg.channels[t] - removed[t]) as f64,
            Dim::Fixed(n) => n as f64,
            Dim::One => 1.0,
        };
        let (mut p, mut m) = (self.fixed_params, self.fixed_macs);
        for t in &self.terms {
            let (i, o) = (dim(t.input), dim(t.output));
            p += t.per_pair * i * o + t.per_out * o;
            m += t.per_pair * i * o * t.area;
        }
        (p, m)
    }
}

pub(super) fn tensor_dim(cg: &ChannelGraph, shapes: &Shapes, name: &str) -> Dim {
    match cg.index.get(name) {
        Some(&t) => Dim::Tensor(t),
        None => Dim::Fixed(shapes.get(name).and_then(|t| t.shape.as_ref()).and_then(|s| s.get(1).copied()).unwrap_or(1)),
    }
}

pub(super) fn term(graph: &Graph, shapes: &Shapes, cg: &ChannelGraph, ix: NodeIndex, role: Role) -> Option<Term> {
    let node = graph.node(ix);
    let (x, y) = (node.input(0)?, node.output(0)?);
    let out_shape = shapes.get(y)?.shape.clone()?;
    let has_bias = node.input(2).is_some() as u8 as f64;
    let area_of = |s: &[usize]| s.iter().skip(2).product::<usize>() as f64;
    match (node.op(), role) {
        ("Conv", Role::Dense) => {
            let w = graph.constant(node.input(1)?)?.shape();
            Some(Term {
                input: tensor_dim(cg, shapes, x),
                output: tensor_dim(cg, shapes, y),
                per_pair: w[2..].iter().product::<usize>() as f64,
                per_out: has_bias,
                area: area_of(&out_shape),
            })
        }
        ("Conv", Role::Depthwise) => {
            let w = graph.constant(node.input(1)?)?.shape();
            Some(Term {
                input: Dim::One,
                output: tensor_dim(cg, shapes, y),
                per_pair: w[2..].iter().product::<usize>() as f64,
                per_out: has_bias,
                area: area_of(&out_shape),
            })
        }
        ("Gemm" | "MatMul", Role::Dense) => Some(Term {
            input: tensor_dim(cg, shapes, x),
            output: tensor_dim(cg, shapes, y),
            per_pair: 1.0,
            per_out: has_bias,
            area: out_shape[0] as f64,
        }),
        ("BatchNormalization", _) => {
            Some(Term { input: Dim::One, output: tensor_dim(cg, shapes, y), per_pair: 0.0, per_out: 4.0, area: 0.0 })
        }
        _ => None,
    }
}
