use super::{PassContext, PassReport};
use crate::config::PruneOptions;
use crate::error::Result;
use crate::ir::Graph;
pub fn run(_graph: &mut Graph, _ctx: &PassContext, _opts: &PruneOptions) -> Result<PassReport> { Ok(PassReport::default()) }
