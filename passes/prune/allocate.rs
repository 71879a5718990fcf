//! Step 3 of `prune`: tied channels into classes with their scores, and
//! which classes go (ratio, or a params/MACs target by bisection).
use super::*;

/// A set of tied channels: pruned all together or not at all.
#[derive(Debug, Clone)]
pub(super) struct Class {
    pub(super) root: usize,
    pub(super) group: usize,
    pub(super) score: f64,
    /// (tensor, number of its channels in this class).
    pub(super) spans: Vec<(usize, usize)>,
}

/// The prunable classes with their scores, and the number of groups.
pub(super) fn classes(graph: &Graph, shapes: &Shapes, cg: &ChannelGraph, opts: &PruneOptions) -> (Vec<Class>, usize) {
    let blocked = cg.blocked_roots();
    let scores = producer_scores(graph, cg, opts);
    let ignored = ignored_roots(graph, cg, opts);
    // Tensor components: tensors sharing a class belong to one group.
    let mut tensor_group = UnionFind::new(cg.tensors.len());
    let mut root_tensor: HashMap<usize, usize> = HashMap::new();
    let mut root_score: HashMap<usize, f64> = HashMap::new();
    let mut spans: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
    for (t, _) in cg.tensors.iter().enumerate() {
        for c in 0..cg.channels[t] {
            let slot = cg.base[t] + c;
            let root = cg.find(slot);
            *root_score.entry(root).or_insert(0.0) += scores.get(&slot).copied().unwrap_or(0.0);
            let span = spans.entry(root).or_default();
            match span.last_mut() {
                Some((last, n)) if *last == t => *n += 1,
                _ => span.push((t, 1)),
            }
            match root_tensor.get(&root) {
                Some(&t0) => tensor_group.union(t0, t),
                None => {
                    root_tensor.insert(root, t);
                }
            }
        }
    }
    let producer_roots: HashSet<usize> = scores.keys().map(|&s| cg.find(s)).collect();
    let residual: HashSet<usize> = (0..cg.tensors.len()).filter(|&t| cg.residual[t]).map(|t| tensor_group.find(t)).collect();
    let out_of_range: HashSet<usize> = (0..cg.tensors.len())
        .filter(|&t| !height_within(shapes, &cg.tensors[t], opts.min_resolution, opts.max_resolution))
        .map(|t| tensor_group.find(t))
        .collect();
    let mut group_ids: HashMap<usize, usize> = HashMap::new();
    let mut out = Vec::new();
    let mut roots: Vec<(&usize, &usize)> = root_tensor.iter().collect();
    roots.sort();
    for (&root, &t) in roots {
        let g = tensor_group.find(t);
        let has_producer = root_score.get(&root).copied().unwrap_or(0.0) > 0.0 || producer_roots.contains(&root);
        if blocked.get(&root).copied().unwrap_or(false)
            || ignored.contains(&root)
            || !has_producer
            || (opts.scope == Scope::Inner && residual.contains(&g))
            || out_of_range.contains(&g)
        {
            continue;
        }
        let next = group_ids.len();
        let group = *group_ids.entry(g).or_insert(next);
        out.push(Class { root, group, score: root_score[&root], spans: spans.remove(&root).unwrap_or_default() });
    }
    normalize_groups(&mut out, group_ids.len());
    (out, group_ids.len())
}

/// Class scores divided by their group's mean score.
pub(super) fn normalize_groups(classes: &mut [Class], groups: usize) {
    let mut sum = vec![0.0; groups];
    let mut count = vec![0usize; groups];
    for c in classes.iter() {
        sum[c.group] += c.score;
        count[c.group] += 1;
    }
    for c in classes.iter_mut() {
        let mean = sum[c.group] / count[c.group].max(1) as f64;
        if mean > 0.0 {
            c.score /= mean;
        }
    }
}

/// Roots of the classes written by the nodes named in `ignore`.
pub(super) fn ignored_roots(graph: &Graph, cg: &ChannelGraph, opts: &PruneOptions) -> HashSet<usize> {
    let mut out = HashSet::new();
    for name in &opts.ignore {
        let Some(ix) = graph.find_node(name) else { continue };
        for y in graph.node(ix).outputs() {
            if let Some(&t) = cg.index.get(y) {
                out.extend((0..cg.channels[t]).map(|c| cg.find(cg.base[t] + c)));
            }
        }
    }
    out
}

/// Indices (into `classes`) of the classes to remove.
pub(super) fn select(
    graph: &Graph,
    shapes: &Shapes,
    cg: &ChannelGraph,
    classes: &[Class],
    groups: usize,
    opts: &PruneOptions,
) -> Vec<usize> {
    let mut by_group: Vec<Vec<usize>> = vec![vec![]; groups];
    for (i, c) in classes.iter().enumerate() {
        by_group[c.group].push(i);
    }
    for members in &mut by_group {
        members.sort_by(|&a, &b| classes[a].score.total_cmp(&classes[b].score).then(a.cmp(&b)));
    }
    let limit = |members: &[usize], k: usize| allowed_removals(members.len(), k, opts);
    let uniform = |ratio: f64| -> Vec<usize> {
        by_group.iter().flat_map(|m| m[..limit(m, (ratio * m.len() as f64).floor() as usize)].to_vec()).collect()
    };
    let (target, use_macs) = match (opts.target_macs, opts.target_params) {
        (None, None) => return uniform(opts.ratio.unwrap_or(0.25)),
        (Some(m), _) => (m, true),
        (None, p) => (p.unwrap_or(1.0), false),
    };
    let cost = CostModel::new(graph, shapes, cg);
    let metric = |sel: &[usize]| {
        let (p, m) = cost.eval(cg, &removed_counts(cg, classes, sel));
        if use_macs {
            m
        } else {
            p
        }
    };
    // Above 1: a weight count (the cost model counts the whole model's).
    let goal = if target > 1.0 { target } else { target * metric(&[]) };
    let global = |t: f64| -> Vec<usize> {
        by_group
            .iter()
            .flat_map(|m| {
                let k = m.iter().take_while(|&&i| classes[i].score < t).count();
                m[..limit(m, k)].to_vec()
            })
            .collect()
    };
    // Bisection on one threshold: a global score, or the uniform share.
    let (mut lo, mut hi) = match opts.allocation {
        Allocation::Global => (0.0, classes.iter().map(|c| c.score).fold(0.0, f64::max) * 1.0001 + 1e-9),
        Allocation::Uniform => (0.0, 1.0),
    };
    let at = |t: f64| if opts.allocation == Allocation::Global { global(t) } else { uniform(t) };
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if metric(&at(mid)) <= goal {
            hi = mid
        } else {
            lo = mid
        }
    }
    at(hi)
}

/// How many of a group's `n` classes may go when `k` are asked for.
pub(super) fn allowed_removals(n: usize, k: usize, opts: &PruneOptions) -> usize {
    let keep_min = opts.min_channels.min(n);
    let mut keep = n - k.min(n - keep_min);
    let r = opts.round_to.max(1);
    keep = keep.div_ceil(r) * r;
    n - keep.min(n)
}

/// Removed slot count per tensor for a selection.
pub(super) fn removed_counts(cg: &ChannelGraph, classes: &[Class], sel: &[usize]) -> Vec<usize> {
    let mut counts = vec![0; cg.tensors.len()];
    for &i in sel {
        for &(t, n) in &classes[i].spans {
            counts[t] += n;
        }
    }
    counts
}

/// Removed channel indices per tensor (ascending).
pub(super) fn removed_channels(cg: &ChannelGraph, roots: &HashSet<usize>) -> Vec<Vec<usize>> {
    (0..cg.tensors.len()).map(|t| (0..cg.channels[t]).filter(|&c| roots.contains(&cg.find(cg.base[t] + c))).collect()).collect()
}
