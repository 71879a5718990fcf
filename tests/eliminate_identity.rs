//! The `eliminate_identity` pass: exact removal, and its declines.
mod common;
use common::*;
use cresnet_opt::fixture::{ConvSpec, Net};
use cresnet_opt::ir::{Model, Node};
use cresnet_opt::passes::PassSpec;

/// conv → Identity → Relu → Dropout (mask unused) → conv → Identity, whose
/// output is the graph output.
fn model() -> Model {
    let mut net = Net::new(9).input("x", &[1, 3, 8, 8]);
    let y = net.conv("c1", "x", ConvSpec::new(3, 4, 3));
    let y = net.op("Identity", "id1", &[&y]);
    let y = net.op("Relu", "relu", &[&y]);
    let y = net.node(Node::new("Dropout", "drop", &[&y], &["drop", "drop_mask"]));
    let y = net.conv("c2", &y, ConvSpec::new(4, 2, 1));
    let y = net.op("Identity", "id_out", &[&y]);
    net.model(&[&y]).unwrap()
}

fn ops(m: &Model) -> Vec<String> {
    m.graph.topo_order().unwrap().into_iter().map(|ix| m.graph.node(ix).op().to_string()).collect()
}

#[test]
fn removes_identity_and_inference_dropout_exactly_and_keeps_the_output_name() {
    let original = model();
    let mut m = original.clone();
    let r = run_passes(&mut m, &[PassSpec::default_for("eliminate_identity").unwrap()]).remove(0);
    let changed: Vec<&str> = r.changed.iter().map(|c| c.node.as_str()).collect();
    assert_eq!(changed, ["id1", "drop"]);
    assert_eq!(r.declined.len(), 1);
    assert_eq!(r.declined[0].node, "id_out");
    assert!(r.declined[0].reason.contains("is a graph output"), "{}", r.declined[0].reason);
    assert_eq!(ops(&m), ["Conv", "Relu", "Conv", "Identity"]);
    let x = random_input(&original, 2, 1.0, 5);
    assert_eq!(run(&original, &x), run(&m, &x));
}

#[test]
fn declines_a_dropout_whose_mask_is_read() {
    let mut net = Net::new(3).input("x", &[1, 2, 4, 4]);
    net.node(Node::new("Dropout", "drop", &["x"], &["drop", "mask"]));
    let y = net.op("Relu", "relu", &["drop"]);
    let mask = net.op("Identity", "mask_id", &["mask"]);
    let mut m = net.model(&[&y, &mask]).unwrap();
    let r = run_passes(&mut m, &[PassSpec::default_for("eliminate_identity").unwrap()]).remove(0);
    assert_eq!(r.changed.len(), 0);
    let declined: Vec<(&str, &str)> = r.declined.iter().map(|d| (d.node.as_str(), d.reason.as_str())).collect();
    assert_eq!(declined, [("drop", "its mask output is read"), ("mask_id", "its output `mask_id` is a graph output")]);
}
