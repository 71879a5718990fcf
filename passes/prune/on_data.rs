//! Step 6 of `prune`: the layers the calibrated recovery refits, and the
//! groups whose channels `importance: reconstruction` chooses on data.
use super::*;

/// The convs whose inputs or outputs lose channels, with the output
/// channels they keep: the calibrated recovery refits exactly these.
pub(super) fn refit_layers(graph: &Graph, cg: &ChannelGraph, removed: &[Vec<usize>]) -> Vec<crate::refit::Layer> {
    let mut out: Vec<crate::refit::Layer> = cg
        .roles
        .iter()
        .filter(|(&ix, &role)| role == Role::Dense && graph.node(ix).op() == "Conv")
        .filter_map(|(&ix, _)| {
            let node = graph.node(ix);
            let t_in = node.input(0).and_then(|x| cg.index.get(x)).copied();
            let t_out = node.output(0).and_then(|y| cg.index.get(y)).copied()?;
            let lost_in = t_in.is_some_and(|t| !removed[t].is_empty());
            let gone: HashSet<usize> = removed[t_out].iter().copied().collect();
            let kept: Vec<usize> = (0..cg.channels[t_out]).filter(|c| !gone.contains(c)).collect();
            (lost_in || !gone.is_empty()).then_some(crate::refit::Layer { node: ix, kept: (!gone.is_empty()).then_some(kept) })
        })
        .collect();
    sort_topologically(graph, &mut out);
    out
}

pub(super) fn sort_topologically(graph: &Graph, layers: &mut [crate::refit::Layer]) {
    let order: HashMap<NodeIndex, usize> = graph.topo_order().unwrap_or_default().into_iter().enumerate().map(|(i, n)| (n, i)).collect();
    layers.sort_by_key(|l| order.get(&l.node).copied().unwrap_or(usize::MAX));
}

/// A group whose channels `importance: reconstruction` chooses on data:
/// its one dense consumer drops `count` input channels during the refit.
pub(super) struct Deferred {
    pub(super) group: usize,
    pub(super) consumer: NodeIndex,
    pub(super) count: usize,
}

/// The groups with removals whose channels all reach exactly one dense,
/// refittable conv as its input channels (bottleneck insides); the others
/// keep their `l1` choice.
pub(super) fn deferred_groups(graph: &Graph, cg: &ChannelGraph, classes: &[Class], removed: &[usize]) -> Vec<Deferred> {
    let mut counts: HashMap<usize, usize> = HashMap::new();
    for &i in removed {
        *counts.entry(classes[i].group).or_insert(0) += 1;
    }
    let mut out: Vec<Deferred> = counts
        .into_iter()
        .filter_map(|(group, count)| Some(Deferred { group, consumer: sole_consumer(graph, cg, classes, group)?, count }))
        .collect();
    out.sort_by_key(|d| d.group);
    out
}

/// The one dense conv reading the group's channels, each class being one
/// of its input channels; None if there is not exactly one.
pub(super) fn sole_consumer(graph: &Graph, cg: &ChannelGraph, classes: &[Class], group: usize) -> Option<NodeIndex> {
    let members: Vec<&Class> = classes.iter().filter(|c| c.group == group).collect();
    let tensors: HashSet<usize> = members.iter().flat_map(|c| c.spans.iter().map(|&(t, _)| t)).collect();
    let dense: HashSet<NodeIndex> = tensors
        .iter()
        .flat_map(|&t| graph.consumers(&cg.tensors[t]))
        .filter(|(ix, _)| cg.roles.get(ix) == Some(&Role::Dense))
        .map(|(ix, _)| ix)
        .collect();
    let [consumer] = dense.into_iter().collect::<Vec<_>>()[..] else { return None };
    let t_in = *cg.index.get(graph.node(consumer).input(0)?)?;
    let one_each = members.len() == cg.channels[t_in] && members.iter().all(|c| c.spans.contains(&(t_in, 1)));
    let refittable = !crate::refit::refittable(graph, vec![crate::refit::Layer { node: consumer, kept: None }]).is_empty();
    (one_each && refittable).then_some(consumer)
}

/// The calibrated refit, in which each deferred consumer drops its share of
/// input channels by reconstruction cost. Returns consumer → dropped inputs.
pub(super) fn select_on_data(
    model: &mut Model,
    ctx: &PassContext,
    layers: Vec<crate::refit::Layer>,
    deferred: &[Deferred],
    report: &mut PassReport,
) -> Result<HashMap<NodeIndex, Vec<usize>>> {
    let Some(calib) = ctx.calibration else { return Ok(HashMap::new()) };
    let mut chosen = HashMap::new();
    ctx.refit_with(model, layers, report, |g, layer, x, y| {
        let name = g.node(layer.node).name().to_string();
        let fit = crate::refit::Fit::for_layer(calib, g, layer.node);
        let Some(d) = deferred.iter().find(|d| d.consumer == layer.node) else {
            let (before, after) = crate::refit::solve_layer(g, layer.node, x, y, fit)?;
            return Ok((name, before, after));
        };
        let (before, after, dropped) = crate::refit::obs::refit_dropping(g, layer.node, x, y, d.count, fit)?;
        chosen.insert(layer.node, dropped);
        Ok((name, before, after))
    })?;
    Ok(chosen)
}

/// Removes the input channels the consumers dropped (their weights are zero
/// now, so this is exact) together with everything producing them.
pub(super) fn remove_dead_inputs(graph: &mut Graph, chosen: &HashMap<NodeIndex, Vec<usize>>, report: &mut PassReport) -> Result<()> {
    let shapes = crate::shape::infer(graph, &Default::default())?;
    let cg = ChannelGraph::build(graph, &shapes);
    let mut roots = HashSet::new();
    for (&ix, dropped) in chosen {
        let Some(x) = graph.node(ix).input(0) else { continue };
        roots.extend(dropped.iter().filter_map(|&c| cg.slot(x, c)).map(|s| cg.find(s)));
    }
    let per_tensor = removed_channels(&cg, &roots);
    apply(graph, &shapes, &cg, &per_tensor, report)
}
