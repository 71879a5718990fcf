//! How long-running work (training, calibration) reports progress without
//! printing: the library calls a [`Progress`], the command line renders it.

/// Receives progress of one task at a time.
pub trait Progress: Sync {
    /// A line worth keeping in a log (an epoch's result).
    fn log(&self, _task: &str, _line: &str) {}
    /// A task of `total` steps begins.
    fn start(&self, _task: &str, _total: u64) {}
    /// `done` steps of the current task are done; `note` says how it goes.
    fn advance(&self, _done: u64, _note: &str) {}
    /// The current task is over.
    fn finish(&self) {}
}

/// Reports nothing (library use, tests).
pub struct Silent;

impl Progress for Silent {}
