//! The teacher's outputs kept on disk between runs (`distill.teacher_cache`),
//! keyed by exactly what the teacher saw.
//!
//! Why: every run of `distill` asks the teacher about every view it trains
//! on, and the answers do not change when the student does. On ResNet-50 at
//! 224 px the teacher (tract, one image per core) is ~40 % of an epoch of
//! the 1/5 student; a user who tries other budgets, learning rates or epoch
//! counts on the same teacher, photos and `seed` asks the same questions
//! again. Fast knowledge distillation (Shen & Xing 2021) stores a teacher's
//! soft labels per crop for the same reason.
//!
//! The key of a view is the SHA-256 of its input tensor (f32, little-endian)
//! as the teacher receives it: whatever produced it (crop, flip, mixup,
//! preprocessing, size), the same input gets the same answer, and a change
//! anywhere upstream is a new key, never a stale label. Reused outputs are
//! the stored f32 values, so a run on a warm cache writes the same bytes as
//! one on a cold cache or with none.
//!
//! File: `DIR/<id>.labels`, id = SHA-256 of the identity the caller gives
//! (the teacher's bytes, its input shape and outputs, the engine and CPU:
//! see `distill::open_cache`), so each teacher and question has its own
//! file. A record per view: `u32 n`, n bytes of body, then the first 8
//! bytes of the body's SHA-256; body = 32-byte key, `u32` output count, per
//! output a `u32` length and its f32 values (all little-endian).
//!
//! Opening reads the file record by record into an index (key → offset,
//! ~100 bytes per view whatever the file holds); the first torn or corrupt
//! record ends the file (a run killed mid-write), and what follows it is cut
//! off. A hit reads its record back and checks it again. New records are
//! written after each batch under an exclusive lock on the file: first the
//! records other runs appended since are indexed (a torn one cut off), then
//! ours are written at the end, and a failed write is cut back, so runs
//! sharing a directory neither interleave nor lose each other's records.
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bumped when the record layout changes: old files are then left alone.
const FORMAT: &str = "cresnet-opt teacher labels v1";
/// Bytes of a record's checksum (a prefix of the body's SHA-256).
const CHECK: usize = 8;
/// No view has outputs this large (ResNet-50's pooled features: 8 KB).
const MAX_BODY: usize = 1 << 28;

/// The SHA-256 of a view's input.
pub type Key = [u8; 32];

/// Per view, where its record's body starts in the file and its length.
type Index = HashMap<Key, (u64, usize)>;

/// The key of one view: the SHA-256 of its values' bytes.
pub fn key(x: &[f32]) -> Key {
    Sha256::digest(bytemuck::cast_slice::<f32, u8>(x)).into()
}

/// One teacher's stored outputs (per view, its outputs in the runner's order).
pub struct TeacherCache {
    path: PathBuf,
    file: File,
    entries: Index,
    /// End of the last whole record this process knows of.
    end: u64,
    /// Views found in the file when opened.
    pub loaded: usize,
    /// Bytes of torn or corrupt records cut off.
    pub cut: u64,
    /// Views served from the store, and views added to it, by this run.
    pub hits: usize,
    pub added: usize,
}

impl TeacherCache {
    /// Opens (or starts) the store of the teacher `identity` in `dir`,
    /// creating the directory if needed.
    pub fn open(dir: &Path, identity: &[&[u8]]) -> Result<TeacherCache> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Write { path: dir.to_path_buf(), source })?;
        let mut id = Sha256::new();
        for part in std::iter::once(FORMAT.as_bytes()).chain(identity.iter().copied()) {
            // Length-prefixed: no two identities hash the same bytes.
            id.update((part.len() as u64).to_le_bytes());
            id.update(part);
        }
        let path = dir.join(format!("{}.labels", hex(&id.finalize()[..16])));
        // Not `append`: every write seeks to the end under the lock, and
        // cutting a torn tail needs write access.
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path);
        let file = file.map_err(|source| Error::Write { path: path.clone(), source })?;
        let mut cache = TeacherCache { path, file, entries: Index::new(), end: 0, loaded: 0, cut: 0, hits: 0, added: 0 };
        cache.locked(|c| c.catch_up())?;
        cache.loaded = cache.entries.len();
        Ok(cache)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Views this process knows of (read at open, added since, and those
    /// other runs appended before our last write).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The stored outputs of the view `key`, counted as a hit, if its
    /// record still reads back intact (else it is forgotten: a miss).
    pub fn get(&mut self, key: &Key) -> Option<Vec<Vec<f32>>> {
        let &(offset, len) = self.entries.get(key)?;
        let outputs = self.read_back(offset, len).filter(|(stored, _)| stored == key).map(|(_, o)| o);
        match outputs {
            Some(_) => self.hits += 1,
            None => {
                self.entries.remove(key);
            }
        }
        outputs
    }

    /// Writes new views at the end of the file in one write (views already
    /// known, and any too large to store, are skipped).
    pub fn add(&mut self, views: impl IntoIterator<Item = (Key, Vec<Vec<f32>>)>) -> Result<()> {
        let views: Vec<(Key, Vec<Vec<f32>>)> = views.into_iter().collect();
        self.locked(|c| {
            c.catch_up()?;
            let mut bytes = Vec::new();
            let mut placed: Index = Index::new();
            for (key, outputs) in &views {
                if c.entries.contains_key(key) || placed.contains_key(key) {
                    continue;
                }
                let at = bytes.len();
                if let Some(len) = record(key, outputs, &mut bytes) {
                    placed.insert(*key, (c.end + at as u64 + 4, len));
                }
            }
            if bytes.is_empty() {
                return Ok(());
            }
            let start = c.end;
            let written = c.file.seek(SeekFrom::Start(start)).and_then(|_| c.file.write_all(&bytes)).and_then(|_| c.file.flush());
            if let Err(source) = written {
                // No torn record of ours left behind for the next reader.
                let _ = c.file.set_len(start);
                return Err(Error::Write { path: c.path.clone(), source });
            }
            c.end = start + bytes.len() as u64;
            c.added += placed.len();
            c.entries.extend(placed);
            Ok(())
        })
    }

    /// Runs `f` holding the exclusive lock on the file.
    fn locked<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.file.lock().map_err(|source| Error::Write { path: self.path.clone(), source })?;
        let out = f(self);
        let unlocked = self.file.unlock().map_err(|source| Error::Write { path: self.path.clone(), source });
        let out = out?;
        unlocked?;
        Ok(out)
    }

    /// Indexes what was appended past `end` (by other runs) and cuts a
    /// torn or corrupt record there. Call with the lock held.
    fn catch_up(&mut self) -> Result<()> {
        let read_err = |source| Error::Read { path: self.path.clone(), source };
        let total = self.file.metadata().map_err(read_err)?.len();
        if total < self.end {
            // Cut behind our back (by hand): start over.
            self.entries.clear();
            self.end = 0;
        }
        if total == self.end {
            return Ok(());
        }
        let (more, valid) = index(&self.file, self.end, total).map_err(read_err)?;
        self.entries.extend(more);
        if valid < total {
            self.file.set_len(valid).map_err(|source| Error::Write { path: self.path.clone(), source })?;
            self.cut += total - valid;
        }
        self.end = valid;
        Ok(())
    }

    /// The record body at `offset` (`len` bytes), checked, as key and outputs.
    fn read_back(&mut self, offset: u64, len: usize) -> Option<(Key, Vec<Vec<f32>>)> {
        let mut bytes = vec![0; len + CHECK];
        self.file.seek(SeekFrom::Start(offset)).and_then(|_| self.file.read_exact(&mut bytes)).ok()?;
        let (body, check) = bytes.split_at(len);
        (Sha256::digest(body)[..CHECK] == *check).then(|| parse_body(body)).flatten()
    }
}

/// Reads `file` record by record from `from` (a record boundary) to
/// `total`: the index of the whole, intact records and where the first
/// torn or corrupt one starts (`total` if none).
fn index(file: &File, from: u64, total: u64) -> std::io::Result<(Index, u64)> {
    let mut reader = BufReader::with_capacity(1 << 16, file);
    reader.seek(SeekFrom::Start(from))?;
    let (mut entries, mut at, mut body) = (Index::new(), from, Vec::new());
    while let Some(key) = next_record(&mut reader, total - at, &mut body)? {
        // A record whose checksum holds but whose body does not parse
        // (another version's?) is skipped: its boundaries are sound.
        if let Some(key) = key {
            entries.insert(key, (at + 4, body.len()));
        }
        at += (4 + body.len() + CHECK) as u64;
    }
    Ok((entries, at))
}

/// The next record if it is whole (within the `left` bytes of the file) and
/// its checksum holds: Some(its key, None if its body does not parse), its
/// body left in `body`.
fn next_record(reader: &mut impl Read, left: u64, body: &mut Vec<u8>) -> std::io::Result<Option<Option<Key>>> {
    let mut head = [0; 4];
    if left < 4 {
        return Ok(None);
    }
    reader.read_exact(&mut head)?;
    let n = u32::from_le_bytes(head) as usize;
    if n > MAX_BODY || (4 + n + CHECK) as u64 > left {
        return Ok(None);
    }
    body.resize(n, 0);
    reader.read_exact(body)?;
    let mut check = [0; CHECK];
    reader.read_exact(&mut check)?;
    if Sha256::digest(&body[..])[..CHECK] != check {
        return Ok(None);
    }
    Ok(Some(parse_body(body).map(|(key, _)| key)))
}

fn parse_body(body: &[u8]) -> Option<(Key, Vec<Vec<f32>>)> {
    let key: Key = body.get(..32)?.try_into().ok()?;
    let count = u32_at(body, 32)? as usize;
    let mut at = 36usize;
    let mut outputs = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        let len = u32_at(body, at)? as usize;
        let end = at.checked_add(4)?.checked_add(len.checked_mul(4)?)?;
        let values = body.get(at + 4..end)?;
        outputs.push(values.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect());
        at = end;
    }
    (at == body.len()).then_some((key, outputs))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// Appends the record of one view to `out`; returns its body's length, or
/// None (nothing appended) when it is too large to store.
fn record(key: &Key, outputs: &[Vec<f32>], out: &mut Vec<u8>) -> Option<usize> {
    let len = 36 + outputs.iter().map(|o| 4 + 4 * o.len()).sum::<usize>();
    if len > MAX_BODY {
        return None;
    }
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(key);
    body.extend_from_slice(&(outputs.len() as u32).to_le_bytes());
    for o in outputs {
        body.extend_from_slice(&(o.len() as u32).to_le_bytes());
        o.iter().for_each(|v| body.extend_from_slice(&v.to_le_bytes()));
    }
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&Sha256::digest(&body)[..CHECK]);
    Some(body.len())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outputs(seed: f32) -> Vec<Vec<f32>> {
        vec![vec![seed, -1.5, f32::MIN_POSITIVE], (0..5).map(|i| seed * i as f32).collect()]
    }

    #[test]
    fn records_come_back_bit_for_bit_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let id: [&[u8]; 2] = [b"teacher", b"1,3,8,8"];
        let (a, b) = (key(&[1.0, 2.0]), key(&[1.0, 2.5]));
        let mut cache = TeacherCache::open(dir.path(), &id).unwrap();
        assert_eq!((cache.loaded, cache.cut), (0, 0));
        cache.add([(a, outputs(0.25)), (b, outputs(-3.0)), (a, outputs(9.0))]).unwrap();
        assert_eq!((cache.len(), cache.added), (2, 2), "a key already stored is not added again");
        assert_eq!(cache.get(&b).unwrap(), outputs(-3.0), "read back from the file in the same run");
        // A second run sharing the directory: each sees the other's records
        // once it writes (they are indexed under the lock).
        let (c, d) = (key(&[7.0]), key(&[8.0]));
        let mut second = TeacherCache::open(dir.path(), &id).unwrap();
        second.add([(c, outputs(7.0))]).unwrap();
        cache.add([(d, outputs(8.0)), (c, outputs(70.0))]).unwrap();
        assert_eq!(cache.added, 3, "the second run's view is not written again");
        assert_eq!(cache.get(&c).unwrap(), outputs(7.0));
        assert_eq!(cache.get(&d).unwrap(), outputs(8.0));
        assert_eq!(second.get(&c).unwrap(), outputs(7.0));
        let path = cache.path().to_path_buf();
        drop((cache, second));
        assert_eq!(TeacherCache::open(dir.path(), &id).unwrap().loaded, 4);
        // Back to the two first records (same-sized), then a run killed
        // mid-write: half a record at the end.
        let bytes = std::fs::read(&path).unwrap();
        let whole = bytes.len() / 2;
        std::fs::write(&path, &bytes[..whole]).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let mut again = TeacherCache::open(dir.path(), &id).unwrap();
        assert_eq!((again.loaded, again.cut), (2, 7));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole as u64);
        assert_eq!(again.get(&a).unwrap(), outputs(0.25));
        assert_eq!(again.get(&b).unwrap(), outputs(-3.0));
        assert_eq!(again.get(&c), None, "cut with the second half of the file");
        assert_eq!(again.hits, 2);
        // Another teacher (or question) is another file.
        let other = TeacherCache::open(dir.path(), &[b"teacher", b"1,3,8,9"]).unwrap();
        assert_ne!(other.path(), path);
        assert_eq!(other.loaded, 0);
    }

    /// A run killed mid-write while another goes on: the survivor's next
    /// write cuts the torn record first, so no later record sits behind it.
    #[test]
    fn a_torn_record_of_another_run_is_cut_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let id: [&[u8]; 1] = [b"t"];
        let mut cache = TeacherCache::open(dir.path(), &id).unwrap();
        cache.add([(key(&[1.0]), outputs(1.0))]).unwrap();
        let mut f = OpenOptions::new().append(true).open(cache.path()).unwrap();
        f.write_all(&[200, 0, 0, 0, 9, 9]).unwrap();
        drop(f);
        cache.add([(key(&[2.0]), outputs(2.0))]).unwrap();
        assert_eq!(cache.cut, 6);
        let again = TeacherCache::open(dir.path(), &id).unwrap();
        assert_eq!((again.loaded, again.cut), (2, 0));
    }

    #[test]
    fn a_flipped_bit_ends_the_file_at_the_record_before() {
        let dir = tempfile::tempdir().unwrap();
        let id: [&[u8]; 1] = [b"t"];
        let mut cache = TeacherCache::open(dir.path(), &id).unwrap();
        let keys: Vec<Key> = (0..3).map(|i| key(&[i as f32])).collect();
        cache.add(keys.iter().map(|&k| (k, outputs(1.0)))).unwrap();
        let path = cache.path().to_path_buf();
        // Flipped under a live reader: the hit fails its check, a miss.
        let mut bytes = std::fs::read(&path).unwrap();
        let record = bytes.len() / 3;
        bytes[record + 50] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(cache.get(&keys[1]), None);
        assert_eq!(cache.get(&keys[2]).unwrap(), outputs(1.0));
        drop(cache);
        let again = TeacherCache::open(dir.path(), &id).unwrap();
        assert_eq!((again.loaded, again.cut), (1, 2 * record as u64));
    }

    #[test]
    fn a_file_where_the_directory_should_be_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("labels");
        std::fs::write(&file, b"x").unwrap();
        let e = TeacherCache::open(&file, &[b"t"]).err().unwrap();
        assert!(e.to_string().contains("cannot write") && e.to_string().contains("labels"), "{e}");
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_keep_no_record() {
        let mut rng = crate::rng::Rng::new(11);
        let dir = tempfile::tempdir().unwrap();
        let id: [&[u8]; 1] = [b"junk"];
        let path = TeacherCache::open(dir.path(), &id).unwrap().path().to_path_buf();
        for len in [1usize, 3, 4, 40, 4096, 70_000] {
            let junk: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
            std::fs::write(&path, &junk).unwrap();
            let cache = TeacherCache::open(dir.path(), &id).unwrap();
            assert_eq!((cache.loaded, cache.cut), (0, len as u64));
        }
    }
}
