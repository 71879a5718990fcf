//! The sliding-window attributes of Conv and the pools, parsed and checked
//! in one place (shape inference, the refits and the training engine read
//! them through [`Window`]).
use super::Node;

/// Kernel, strides, dilations and pads (all begins, then all ends) of a
/// window over `kernel.len()` spatial axes; absent attributes take their
/// ONNX defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub pads: Vec<usize>,
}

impl Window {
    /// The window of `node` for a kernel of size `kernel`; Err names the
    /// attribute that does not fit.
    pub fn of(node: &Node, kernel: Vec<usize>) -> Result<Window, String> {
        let n = kernel.len();
        let get = |name: &str, default: usize, len: usize| -> Result<Vec<usize>, String> {
            match node.attr_ints(name) {
                None => Ok(vec![default; len]),
                Some(v) if v.len() == len && v.iter().all(|&x| x >= 0) => Ok(v.iter().map(|&x| x as usize).collect()),
                Some(v) => Err(format!("attribute `{name}` {v:?} does not fit a {n}-d kernel")),
            }
        };
        let w = Window { strides: get("strides", 1, n)?, dilations: get("dilations", 1, n)?, pads: get("pads", 0, 2 * n)?, kernel };
        if w.strides.contains(&0) || w.dilations.contains(&0) {
            return Err("zero stride or dilation".into());
        }
        Ok(w)
    }

    /// The first two axes' strides, begin pads and dilations (a 2-d window).
    pub fn pairs(&self) -> Option<([usize; 2], [usize; 2], [usize; 2])> {
        let two = |v: &[usize]| (v.len() >= 2).then(|| [v[0], v[1]]);
        Some((two(&self.strides)?, two(&self.pads)?, two(&self.dilations)?))
    }
}

/// Whether the pads are the explicit `pads` attribute (no `auto_pad`).
pub fn explicit_pads(node: &Node) -> bool {
    matches!(node.attr_str("auto_pad").as_deref(), None | Some("") | Some("NOTSET"))
}
