//! Deterministic ResNet-50-topology models for tests, benchmarks and the
//! README's default model: any width divisor and input size, torchvision
//! layout (stride on the 3x3) or v1/Keras layout (stride on the first 1x1,
//! convs with bias), BN as separate nodes or already folded, 1000 or any
//! number of classes. Weights are He-initialised from a seeded generator,
//! with per-filter gains spread out so filter importance differs.
use crate::error::Result;
use crate::ir::{Graph, Model, Node, Weight};
use crate::onnx::{GraphProto, ModelProto, OperatorSetIdProto, ValueInfoProto};
use indexmap::IndexMap;
use ndarray::{Array1, ArrayD, Dimension, IxDyn};

pub use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// Stride on the 3x3 conv, convs without bias.
    Torchvision,
    /// Stride on the first 1x1 conv, convs with bias (the shared model's layout).
    Keras,
}

#[derive(Debug, Clone)]
pub struct FixtureSpec {
    /// Channel widths are ResNet-50's divided by this.
    pub width_div: usize,
    pub input_size: usize,
    pub layout: Layout,
    /// Fold BN into the convs (no BatchNormalization nodes).
    pub folded: bool,
    pub classes: usize,
    /// Blocks per stage (ResNet-50: 3, 4, 6, 3).
    pub blocks: [usize; 4],
    pub seed: u64,
}

impl Default for FixtureSpec {
    fn default() -> Self {
        FixtureSpec { width_div: 8, input_size: 224, layout: Layout::Keras, folded: false, classes: 1000, blocks: [3, 4, 6, 3], seed: 50 }
    }
}

struct Builder {
    nodes: Vec<Node>,
    weights: IndexMap<String, Weight>,
    rng: Rng,
    bias: bool,
}

impl Builder {
    fn weight(&mut self, name: &str, shape: &[usize], f: impl FnMut(&mut Rng, &[usize]) -> f32) -> String {
        let mut f = f;
        let rng = &mut self.rng;
        let array = ArrayD::from_shape_fn(IxDyn(shape), |ix| f(rng, ix.slice()));
        self.weights.insert(name.to_string(), Weight::from_f32(name, array));
        name.to_string()
    }

    fn conv(&mut self, name: &str, x: &str, c_in: usize, c_out: usize, k: usize, stride: usize) -> String {
        let std = (2.0 / (c_in * k * k) as f32).sqrt();
        let gains: Vec<f32> = (0..c_out).map(|_| 0.2 + 1.6 * self.rng.uniform()).collect();
        let w = self.weight(&format!("{name}.weight"), &[c_out, c_in, k, k], |r, ix| r.normal() * std * gains[ix[0]]);
        let mut inputs = vec![x.to_string(), w];
        if self.bias {
            inputs.push(self.weight(&format!("{name}.bias"), &[c_out], |r, _| r.normal() * 0.05));
        }
        let p = (k / 2) as i64;
        let mut node = Node::new("Conv", name, &[], &[name]);
        node.proto.input = inputs;
        node.set_attr_ints("kernel_shape", &[k as i64, k as i64]);
        node.set_attr_ints("strides", &[stride as i64, stride as i64]);
        node.set_attr_ints("pads", &[p, p, p, p]);
        node.set_attr_ints("dilations", &[1, 1]);
        self.nodes.push(node);
        name.to_string()
    }

    /// BN with statistics in plausible ranges; `gain` scales γ (small on
    /// the last BN of a block keeps the residual stream from growing).
    fn bn(&mut self, name: &str, x: &str, c: usize, gain: f32) -> String {
        let g = self.weight(&format!("{name}.scale"), &[c], |r, _| gain * (0.5 + r.uniform()));
        let b = self.weight(&format!("{name}.bias"), &[c], |r, _| 0.1 * r.normal());
        let m = self.weight(&format!("{name}.mean"), &[c], |r, _| 0.1 * r.normal());
        let v = self.weight(&format!("{name}.var"), &[c], |r, _| 0.5 + r.uniform());
        let mut node = Node::new("BatchNormalization", name, &[x, &g, &b, &m, &v], &[name]);
        node.proto.attribute.push(crate::onnx::AttributeProto {
            name: Some("epsilon".into()),
            r#type: Some(crate::onnx::attribute_proto::AttributeType::Float as i32),
            f: Some(1e-3),
            ..Default::default()
        });
        self.nodes.push(node);
        name.to_string()
    }

    fn op(&mut self, op: &str, name: &str, inputs: &[&str]) -> String {
        self.nodes.push(Node::new(op, name, inputs, &[name]));
        name.to_string()
    }
}

/// Names of one bottleneck block's layers in the chosen layout.
fn block_names(layout: Layout, stage: usize, block: usize) -> [String; 10] {
    let n = |s: &str| s.to_string();
    match layout {
        Layout::Keras => {
            let id = format!("{}{}", stage + 2, (b'a' + block as u8) as char);
            [
                format!("res{id}_branch2a"),
                format!("bn{id}_branch2a"),
                format!("res{id}_branch2b"),
                format!("bn{id}_branch2b"),
                format!("res{id}_branch2c"),
                format!("bn{id}_branch2c"),
                format!("res{id}_branch1"),
                format!("bn{id}_branch1"),
                format!("add{id}"),
                format!("relu{id}"),
            ]
        }
        Layout::Torchvision => {
            let p = format!("layer{}.{block}", stage + 1);
            [
                format!("{p}.conv1"),
                format!("{p}.bn1"),
                format!("{p}.conv2"),
                format!("{p}.bn2"),
                format!("{p}.conv3"),
                format!("{p}.bn3"),
                format!("{p}.downsample.0"),
                format!("{p}.downsample.1"),
                format!("{p}.add"),
                n(&format!("{p}.relu")),
            ]
        }
    }
}

fn bottleneck(b: &mut Builder, layout: Layout, x: &str, (stage, block): (usize, usize), c_in: usize, mid: usize, stride: usize) -> String {
    let [c1, bn1, c2, bn2, c3, bn3, cd, bnd, add, relu] = block_names(layout, stage, block);
    let (s1, s2) = if layout == Layout::Keras { (stride, 1) } else { (1, stride) };
    let y = b.conv(&c1, x, c_in, mid, 1, s1);
    let y = b.bn(&bn1, &y, mid, 1.0);
    let y = b.op("Relu", &format!("{bn1}_relu"), &[&y]);
    let y = b.conv(&c2, &y, mid, mid, 3, s2);
    let y = b.bn(&bn2, &y, mid, 1.0);
    let y = b.op("Relu", &format!("{bn2}_relu"), &[&y]);
    let y = b.conv(&c3, &y, mid, 4 * mid, 1, 1);
    let y = b.bn(&bn3, &y, 4 * mid, 0.3);
    let shortcut = if block == 0 {
        let s = b.conv(&cd, x, c_in, 4 * mid, 1, stride);
        b.bn(&bnd, &s, 4 * mid, 0.5)
    } else {
        x.to_string()
    };
    let y = b.op("Add", &add, &[&y, &shortcut]);
    b.op("Relu", &relu, &[&y])
}

/// Builds the fixture model described by `spec`.
pub fn resnet50(spec: &FixtureSpec) -> Result<Model> {
    let mut b = Builder { nodes: vec![], weights: IndexMap::new(), rng: Rng::new(spec.seed), bias: spec.layout == Layout::Keras };
    let w = |c: usize| (c / spec.width_div).max(1);
    let x = b.conv("conv1", "input", 3, w(64), 7, 2);
    let x = b.bn("bn_conv1", &x, w(64), 1.0);
    let x = b.op("Relu", "conv1_relu", &[&x]);
    let mut x = b.op("MaxPool", "max_pooling2d", &[&x]);
    let pool = b.nodes.last_mut().expect("just added");
    pool.set_attr_ints("kernel_shape", &[3, 3]);
    pool.set_attr_ints("strides", &[2, 2]);
    pool.set_attr_ints("pads", &[1, 1, 1, 1]);
    let mut c_in = w(64);
    for (stage, &blocks) in spec.blocks.iter().enumerate() {
        let mid = w(64 << stage);
        for block in 0..blocks {
            let stride = if block == 0 && stage > 0 { 2 } else { 1 };
            x = bottleneck(&mut b, spec.layout, &x, (stage, block), c_in, mid, stride);
            c_in = 4 * mid;
        }
    }
    let x = b.op("GlobalAveragePool", "avg_pool", &[&x]);
    let x = b.op("Flatten", "flatten", &[&x]);
    let fc_w = b.weight("fc.weight", &[spec.classes, c_in], |r, _| r.normal() * (1.0 / c_in as f32).sqrt());
    let fc_b = b.weight("fc.bias", &[spec.classes], |_, _| 0.0);
    let mut fc = Node::new("Gemm", "fc", &[&x, &fc_w, &fc_b], &["logits"]);
    fc.set_attr_int("transB", 1);
    b.nodes.push(fc);
    let meta = GraphProto {
        name: Some("resnet50_fixture".into()),
        input: vec![crate::ir::value_info("input", &[None, Some(3), Some(spec.input_size as i64), Some(spec.input_size as i64)])],
        output: vec![crate::ir::value_info("logits", &[None, Some(spec.classes as i64)])],
        ..Default::default()
    };
    let graph = Graph::new(b.nodes.into_iter().map(|n| n.proto).collect(), b.weights, meta)?;
    let proto = ModelProto {
        ir_version: Some(10),
        producer_name: Some("cresnet-opt make-fixture".into()),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
        ..Default::default()
    };
    let mut model = Model { proto, graph };
    if spec.folded {
        crate::passes::run_pipeline(&mut model, &[crate::passes::PassSpec::Fold(Default::default())], &Default::default(), |_| {})?;
    }
    Ok(model)
}

/// A small graph builder for tests and examples: NCHW f32 tensors, seeded
/// weights. `Net::new(seed).input("x", &[1, 4, 8, 8])`, then ops, then `model(&["y"])`.
pub struct Net {
    nodes: Vec<Node>,
    weights: IndexMap<String, Weight>,
    inputs: Vec<ValueInfoProto>,
    pub rng: Rng,
}

/// Geometry of a test conv.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub c_in: usize,
    pub c_out: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub dilation: usize,
    pub group: usize,
    pub bias: bool,
}

impl ConvSpec {
    pub fn new(c_in: usize, c_out: usize, k: usize) -> ConvSpec {
        ConvSpec { c_in, c_out, k, stride: 1, pad: k / 2, dilation: 1, group: 1, bias: true }
    }
}

impl Net {
    pub fn new(seed: u64) -> Net {
        Net { nodes: vec![], weights: IndexMap::new(), inputs: vec![], rng: Rng::new(seed) }
    }

    pub fn input(mut self, name: &str, shape: &[usize]) -> Net {
        let dims: Vec<Option<i64>> = shape.iter().map(|&d| Some(d as i64)).collect();
        self.inputs.push(crate::ir::value_info(name, &dims));
        self
    }

    /// Adds a seeded f32 weight (normal × `scale`) and returns its name.
    pub fn weight(&mut self, name: &str, shape: &[usize], scale: f32) -> String {
        let rng = &mut self.rng;
        let a = ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.normal() * scale);
        self.weights.insert(name.to_string(), Weight::from_f32(name, a));
        name.to_string()
    }

    pub fn set_weight(&mut self, name: &str, value: ArrayD<f32>) {
        self.weights.insert(name.to_string(), Weight::from_f32(name, value));
    }

    pub fn node(&mut self, node: Node) -> String {
        let out = node.outputs().first().cloned().unwrap_or_default();
        self.nodes.push(node);
        out
    }

    pub fn op(&mut self, op: &str, name: &str, inputs: &[&str]) -> String {
        self.node(Node::new(op, name, inputs, &[name]))
    }

    pub fn conv(&mut self, name: &str, x: &str, s: ConvSpec) -> String {
        let std = (2.0 / (s.c_in / s.group * s.k * s.k) as f32).sqrt();
        let w = self.weight(&format!("{name}.w"), &[s.c_out, s.c_in / s.group, s.k, s.k], std);
        let mut inputs = vec![x, w.as_str()];
        let b = s.bias.then(|| self.weight(&format!("{name}.b"), &[s.c_out], 0.1));
        if let Some(b) = &b {
            inputs.push(b);
        }
        let mut node = Node::new("Conv", name, &inputs, &[name]);
        let (k, st, p, d) = (s.k as i64, s.stride as i64, s.pad as i64, s.dilation as i64);
        node.set_attr_ints("kernel_shape", &[k, k]);
        node.set_attr_ints("strides", &[st, st]);
        node.set_attr_ints("pads", &[p, p, p, p]);
        node.set_attr_ints("dilations", &[d, d]);
        node.set_attr_int("group", s.group as i64);
        self.node(node)
    }

    /// BN with random statistics (γ around 1, β, μ around 0, σ² around 1).
    pub fn bn(&mut self, name: &str, x: &str, c: usize) -> String {
        let rng = &mut self.rng;
        let mut vec = |f: &mut dyn FnMut(&mut Rng) -> f32| Array1::from_shape_fn(c, |_| f(rng)).into_dyn();
        let (g, b, m, v) = (
            vec(&mut |r| 0.5 + r.uniform()),
            vec(&mut |r| 0.2 * r.normal()),
            vec(&mut |r| 0.2 * r.normal()),
            vec(&mut |r| 0.5 + r.uniform()),
        );
        for (suffix, a) in [("g", g), ("b", b), ("m", m), ("v", v)] {
            self.set_weight(&format!("{name}.{suffix}"), a);
        }
        let inputs = [x.to_string(), format!("{name}.g"), format!("{name}.b"), format!("{name}.m"), format!("{name}.v")];
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.node(Node::new("BatchNormalization", name, &refs, &[name]))
    }

    /// Finishes the model; `outputs` are graph outputs (shapes left to inference).
    pub fn model(self, outputs: &[&str]) -> Result<Model> {
        let output = outputs.iter().map(|o| ValueInfoProto { name: Some(o.to_string()), ..Default::default() }).collect();
        let meta = GraphProto { name: Some("test".into()), input: self.inputs, output, ..Default::default() };
        let graph = Graph::new(self.nodes.into_iter().map(|n| n.proto).collect(), self.weights, meta)?;
        let proto = ModelProto {
            ir_version: Some(10),
            opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(17) }],
            ..Default::default()
        };
        let mut model = Model { proto, graph };
        set_output_types(&mut model)?;
        Ok(model)
    }
}

/// Gives graph outputs a tensor type (tract needs the element type).
fn set_output_types(model: &mut Model) -> Result<()> {
    let shapes = crate::shape::infer(&model.graph, &Default::default())?;
    for out in &mut model.graph.meta.output {
        if out.r#type.is_none() {
            let dims: Vec<Option<i64>> =
                shapes.get(out.name()).and_then(|t| t.shape.clone()).unwrap_or_default().iter().map(|&d| Some(d as i64)).collect();
            out.r#type = crate::ir::value_info(out.name(), &dims).r#type;
        }
    }
    Ok(())
}
