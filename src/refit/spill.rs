//! Per-image records of the refits — the reference targets of every layer,
//! the activations at the cursor's cut point — kept in memory while they
//! are small and in an unnamed temporary file (in `TMPDIR`) past
//! `calibration.spill_mb` ([`SPILL_BYTES`] by default), so that
//! calibration memory does not grow with the number of images (issue #18:
//! 3,000 photos of ResNet-50 hold ~10 GB of targets and up to 9.6 GB of
//! block activations). Records are written and read whole, as f32: results
//! are the same either way.
use crate::error::{Error, Result};
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

/// Above this many bytes the records go to a temporary file (the default of `calibration.spill_mb`).
pub(super) const SPILL_BYTES: u64 = 512 << 20;

/// `n` records per segment; segment `s` has records of `floats[s]` f32s.
pub(super) struct Spill {
    n: usize,
    floats: Vec<usize>,
    /// Float offset of each segment.
    starts: Vec<u64>,
    backing: Backing,
}

enum Backing {
    /// Slot `s * n + i`.
    Memory(Vec<OnceLock<Vec<f32>>>),
    File(std::fs::File),
}

impl Spill {
    /// Room for `n` records in each segment of `floats[s]` f32s: in memory
    /// up to `limit` bytes in all, else in a temporary file.
    pub(super) fn new(n: usize, floats: Vec<usize>, limit: u64) -> Result<Spill> {
        let mut starts = Vec::with_capacity(floats.len());
        let mut total = 0u64;
        for &f in &floats {
            starts.push(total);
            total += (n * f) as u64;
        }
        let backing = if 4 * total <= limit {
            Backing::Memory((0..n * floats.len()).map(|_| OnceLock::new()).collect())
        } else {
            let file = tempfile::tempfile().map_err(|e| io_error("create", e))?;
            file.set_len(4 * total).map_err(|e| io_error("size", e))?;
            Backing::File(file)
        };
        Ok(Spill { n, floats, starts, backing })
    }

    /// Whether the records are in a temporary file.
    #[cfg(test)]
    pub(super) fn spilled(&self) -> bool {
        matches!(self.backing, Backing::File(_))
    }

    /// Stores record `i` of segment `s` (each once; from any thread).
    pub(super) fn put(&self, s: usize, i: usize, data: &[f32]) -> Result<()> {
        if data.len() != self.floats[s] || i >= self.n {
            return Err(Error::Data(format!("record {i} of segment {s}: {} values, expected {}", data.len(), self.floats[s])));
        }
        match &self.backing {
            Backing::Memory(slots) => {
                slots[s * self.n + i].set(data.to_vec()).map_err(|_| Error::Data(format!("record {i} of segment {s} written twice")))
            }
            Backing::File(file) => file.write_all_at(bytemuck::cast_slice(data), self.offset(s, i)).map_err(|e| io_error("write", e)),
        }
    }

    /// Record `i` of segment `s`.
    pub(super) fn get(&self, s: usize, i: usize) -> Result<Vec<f32>> {
        match &self.backing {
            Backing::Memory(slots) => {
                slots[s * self.n + i].get().cloned().ok_or_else(|| Error::Data(format!("record {i} of segment {s} never written")))
            }
            Backing::File(file) => self.read(file, self.offset(s, i), self.floats[s]),
        }
    }

    /// Every record of segment `s`, in order, as one vector.
    pub(super) fn segment(&self, s: usize) -> Result<Vec<f32>> {
        match &self.backing {
            Backing::Memory(_) => {
                let mut out = Vec::with_capacity(self.n * self.floats[s]);
                for i in 0..self.n {
                    out.extend(self.get(s, i)?);
                }
                Ok(out)
            }
            Backing::File(file) => self.read(file, self.offset(s, 0), self.n * self.floats[s]),
        }
    }

    fn offset(&self, s: usize, i: usize) -> u64 {
        4 * (self.starts[s] + (i * self.floats[s]) as u64)
    }

    fn read(&self, file: &std::fs::File, at: u64, floats: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; floats];
        file.read_exact_at(bytemuck::cast_slice_mut(&mut out), at).map_err(|e| io_error("read", e))?;
        Ok(out)
    }
}

fn io_error(what: &str, e: std::io::Error) -> Error {
    Error::Data(format!("cannot {what} the calibration's temporary file (TMPDIR): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same records come back from memory and from the file.
    #[test]
    fn records_round_trip_in_memory_and_on_disk() {
        for limit in [u64::MAX, 0] {
            let spill = Spill::new(3, vec![2, 5], limit).unwrap();
            assert_eq!(spill.spilled(), limit == 0);
            for i in (0..3).rev() {
                spill.put(0, i, &[i as f32, -1.0]).unwrap();
                spill.put(1, i, &[i as f32 * 10.0; 5]).unwrap();
            }
            assert_eq!(spill.get(1, 2).unwrap(), vec![20.0; 5]);
            assert_eq!(spill.segment(0).unwrap(), vec![0.0, -1.0, 1.0, -1.0, 2.0, -1.0]);
            let e = spill.put(0, 1, &[1.0]).unwrap_err().to_string();
            assert!(e.contains("record 1 of segment 0: 1 values, expected 2"), "{e}");
        }
    }
}
