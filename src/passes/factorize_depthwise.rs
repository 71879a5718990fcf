use super::{PassContext, PassReport};
use crate::config::DwOptions;
use crate::error::Result;
use crate::ir::Graph;
pub fn run(_graph: &mut Graph, _ctx: &PassContext, _opts: &DwOptions) -> Result<PassReport> { Ok(PassReport::default()) }
