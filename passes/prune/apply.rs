//! Step 4 of `prune`: removes the chosen channels from every weight that carries them.
use super::*;

/// Removes the selected channels from every weight that carries them.
pub(super) fn apply(graph: &mut Graph, shapes: &Shapes, cg: &ChannelGraph, removed: &[Vec<usize>], report: &mut PassReport) -> Result<()> {
    let of = |name: Option<&str>| -> &[usize] { name.and_then(|n| cg.index.get(n)).map_or(&[], |&t| removed[t].as_slice()) };
    let mut roles: Vec<(NodeIndex, Role)> = cg.roles.iter().map(|(&i, &r)| (i, r)).collect();
    roles.sort_by_key(|&(ix, _)| ix);
    let mut cuts = Cuts::default();
    for (ix, role) in roles {
        let node = graph.node(ix).clone();
        let (rin, rout) = (of(node.input(0)).to_vec(), of(node.output(0)).to_vec());
        if rin.is_empty() && rout.is_empty() {
            continue;
        }
        let w = |slot: usize| node.input(slot).map(str::to_string);
        match (node.op(), role) {
            ("Conv", Role::Dense) => {
                cuts.add(w(1), 0, &rout);
                cuts.add(w(1), 1, &rin);
                cuts.add(w(2), 0, &rout);
            }
            ("Conv", Role::Depthwise) => {
                cuts.add(w(1), 0, &rout);
                cuts.add(w(2), 0, &rout);
                let channels = node.input(1).and_then(|n| graph.constant(n)).map_or(1, |w| w.shape()[0]);
                graph.update_node(ix, |n| n.set_attr_int("group", (channels - rout.len()) as i64))?;
            }
            ("Gemm" | "MatMul", Role::Dense) => {
                let oa = output_axis(&node);
                cuts.add(w(1), oa, &rout);
                cuts.add(w(1), 1 - oa, &rin);
                let bias_axis = node.input(2).and_then(|n| graph.constant(n)).map(|b| b.shape().len().saturating_sub(1)).unwrap_or(0);
                cuts.add(w(2), bias_axis, &rout);
            }
            ("BatchNormalization", _) => (1..5).for_each(|s| cuts.add(w(s), 0, &rout)),
            (_, Role::Passthrough) => {
                let rank = node.output(0).and_then(|y| shapes.get(y)).and_then(|t| t.shape.as_ref()).map_or(0, |s| s.len());
                let channels = node.output(0).and_then(|y| cg.index.get(y)).map_or(0, |&t| cg.channels[t]);
                constant_operand_cuts(graph, &node, rank, channels, &rout, &mut cuts);
            }
            _ => {}
        }
        report.change(node.name(), format!("in -{} / out -{} channels", rin.len(), rout.len()));
    }
    cuts.apply(graph);
    Ok(())
}

/// Per weight, the indices to remove along each axis; applied in one copy
/// per weight, weights in parallel.
#[derive(Default)]
pub(super) struct Cuts(indexmap::IndexMap<String, Vec<(usize, Vec<usize>)>>);

impl Cuts {
    pub(super) fn add(&mut self, name: Option<String>, axis: usize, removed: &[usize]) {
        if let (Some(name), false) = (name, removed.is_empty()) {
            self.0.entry(name).or_default().push((axis, removed.to_vec()));
        }
    }

    pub(super) fn apply(self, graph: &mut Graph) {
        use rayon::prelude::*;
        let cut: Vec<(String, ArrayD<f32>)> = self
            .0
            .into_iter()
            .collect::<Vec<_>>()
            .into_par_iter()
            .filter_map(|(name, axes)| {
                let w = graph.weight(&name)?.as_f32()?;
                let mut out: Option<ArrayD<f32>> = None;
                for (axis, removed) in axes.iter().filter(|(axis, _)| *axis < w.ndim()) {
                    let current = out.as_ref().unwrap_or(w);
                    let gone: HashSet<usize> = removed.iter().copied().collect();
                    let keep: Vec<usize> = (0..current.shape()[*axis]).filter(|i| !gone.contains(i)).collect();
                    out = Some(select_axis(current, *axis, &keep));
                }
                Some((name, out?))
            })
            .collect();
        for (name, a) in cut {
            if let Some(w) = graph.weight_mut(&name).and_then(Weight::as_f32_mut) {
                *w = a;
            }
        }
    }
}

/// Per-channel constant operands of an elementwise node lose the removed entries.
pub(super) fn constant_operand_cuts(
    graph: &Graph,
    node: &crate::ir::Node,
    rank: usize,
    channels: usize,
    removed: &[usize],
    cuts: &mut Cuts,
) {
    for x in node.inputs().iter().filter(|n| !n.is_empty()) {
        let Some(w) = graph.constant(x) else { continue };
        if let Ok(Some(axis)) = per_channel_axis(&w.shape(), rank, channels) {
            cuts.add(Some(x.clone()), axis, removed);
        }
    }
}

/// `a.select(Axis(axis), keep)` by contiguous chunk copies (ndarray's
/// generic select is element-wise, 30x slower on large conv weights).
pub(super) fn select_axis(a: &ArrayD<f32>, axis: usize, keep: &[usize]) -> ArrayD<f32> {
    let a = a.as_standard_layout();
    let shape = a.shape().to_vec();
    let (outer, len, inner) = (shape[..axis].iter().product::<usize>(), shape[axis], shape[axis + 1..].iter().product::<usize>());
    let data = a.as_slice().expect("standard layout");
    let mut out = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &k in keep {
            let start = (o * len + k) * inner;
            out.extend_from_slice(&data[start..start + inner]);
        }
    }
    let mut new_shape = shape;
    new_shape[axis] = keep.len();
    ArrayD::from_shape_vec(new_shape, out).expect("sizes match")
}
