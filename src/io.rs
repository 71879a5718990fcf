//! Loading and saving ONNX files. Saving is atomic: the model goes to a
//! temporary file in the target folder, renamed over the target only once
//! it is completely written, so a failure never leaves a half-written model
//! (and `-o` equal to the input replaces it only on success).
use crate::error::{Error, Result};
use crate::ir::{Graph, Model, Weight};
use crate::onnx::{tensor_proto::DataLocation, ModelProto, StringStringEntryProto, TensorProto};
use bytes::Bytes;
use indexmap::IndexMap;
use prost::Message;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Tensors at least this large go to the side file with `--external-data`.
const EXTERNAL_MIN_BYTES: usize = 1024;

/// Reads, decodes and validates a model. The file is memory-mapped, so
/// tensor data that no pass changes is never copied: it goes from the
/// page cache to the output file directly.
pub fn load(path: &Path) -> Result<Model> {
    load_with(path, &Default::default())
}

/// [`load`] validating with input shape overrides (`--input-shape`): a
/// model whose declared input cannot run (a fixed pool on a 1x1 input) may
/// still load at the size the user gives.
pub fn load_with(path: &Path, overrides: &crate::shape::InputShapes) -> Result<Model> {
    let read_err = |source| Error::Read { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(read_err)?;
    if file.metadata().map_err(read_err)?.len() == 0 {
        return Err(Error::EmptyFile { path: path.to_path_buf() });
    }
    // SAFETY: the map is read-only and private; as with every reader that
    // maps its input (tract, onnxruntime), truncating the file while we run
    // is the one thing not supported.
    let bytes = match unsafe { memmap2::MmapOptions::new().populate().map(&file) } {
        Ok(map) => Bytes::from_owner(map),
        // Not mappable (a pipe, some network file systems): read it.
        Err(_) => Bytes::from(std::fs::read(path).map_err(read_err)?),
    };
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let model = from_bytes(bytes, &path.display().to_string(), Some(&dir))?;
    crate::validate::validate(&model.graph, overrides)?;
    Ok(model)
}

/// Decodes a model from memory; `dir` resolves external data.
pub fn from_bytes(bytes: Bytes, what: &str, dir: Option<&Path>) -> Result<Model> {
    let mut proto = ModelProto::decode(bytes).map_err(|source| Error::Decode { what: what.to_string(), source })?;
    let not_onnx = |reason: &str| Error::NotOnnx { what: what.to_string(), reason: reason.to_string() };
    let mut graph = proto.graph.take().ok_or_else(|| not_onnx("it has no graph"))?;
    if proto.ir_version.unwrap_or(0) <= 0 {
        return Err(not_onnx("it has no ir_version"));
    }
    if graph.node.is_empty() {
        return Err(not_onnx("its graph has no nodes"));
    }
    let mut files = ExternalFiles { dir: dir.map(Path::to_path_buf), cache: HashMap::new() };
    let mut weights = IndexMap::with_capacity(graph.initializer.len());
    let tensors: Vec<(TensorProto, Option<Bytes>)> =
        std::mem::take(&mut graph.initializer).into_iter().map(|t| files.data_of(&t).map(|e| (t, e))).collect::<Result<_>>()?;
    // Decoding copies ~100 MB of numbers for ResNet-50: in parallel.
    use rayon::prelude::*;
    let decoded: Vec<Result<Weight>> = tensors.into_par_iter().map(|(t, external)| Weight::decode(t, external)).collect();
    for w in decoded {
        let w = w?;
        if w.name().is_empty() {
            return Err(Error::invalid("an initializer has no name"));
        }
        if weights.insert(w.name().to_string(), w).is_some() {
            return Err(Error::invalid("two initializers share a name"));
        }
    }
    let nodes = std::mem::take(&mut graph.node);
    Ok(Model { proto, graph: Graph::new(nodes, weights, graph)? })
}

/// `location` joined to the model's folder `dir`, if it stays inside it:
/// not absolute, no `..`, and no link leading out (as onnx refuses since
/// 1.16, CVE-2024-27318/27319). A model from elsewhere must not make us read,
/// and then write into the output, any other file of the machine.
fn inside(dir: &Path, location: &str) -> std::result::Result<PathBuf, String> {
    use std::path::Component;
    let relative = Path::new(location);
    if relative.as_os_str().is_empty() {
        return Err("is empty".into());
    }
    for part in relative.components() {
        match part {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err("leaves the model's folder (`..`)".into()),
            Component::RootDir | Component::Prefix(_) => return Err("is an absolute path, not one inside the model's folder".into()),
        }
    }
    let path = dir.join(relative);
    let (Ok(real_dir), Ok(real)) = (dir.canonicalize(), path.canonicalize()) else { return Ok(path) };
    if !real.starts_with(&real_dir) {
        return Err(format!("leads out of the model's folder (to {})", real.display()));
    }
    Ok(path)
}

/// External-data files, each read once.
struct ExternalFiles {
    dir: Option<PathBuf>,
    cache: HashMap<String, Bytes>,
}

impl ExternalFiles {
    fn data_of(&mut self, t: &TensorProto) -> Result<Option<Bytes>> {
        if t.data_location != Some(DataLocation::External as i32) {
            return Ok(None);
        }
        let entry = |key: &str| t.external_data.iter().find(|e| e.key() == key).map(|e| e.value().to_string());
        let name = t.name();
        let location = entry("location").ok_or_else(|| Error::tensor(name, "external data without a location"))?;
        let number = |key: &str| -> Result<Option<usize>> {
            entry(key)
                .map(|v| v.parse::<usize>().map_err(|_| Error::tensor(name, format!("external data {key} `{v}` is not a number"))))
                .transpose()
        };
        let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?);
        let dir = self.dir.clone().ok_or_else(|| Error::tensor(name, "external data needs the model's folder"))?;
        let path = inside(&dir, &location).map_err(|why| Error::tensor(name, format!("external data location `{location}` {why}")))?;
        let file = match self.cache.get(&location) {
            Some(b) => b.clone(),
            None => {
                let b = Bytes::from(std::fs::read(&path).map_err(|source| Error::Read { path: path.clone(), source })?);
                self.cache.insert(location.clone(), b.clone());
                b
            }
        };
        let end = length.map_or(Some(file.len()), |l| offset.checked_add(l));
        match end {
            Some(end) if end <= file.len() && offset <= end => Ok(Some(file.slice(offset..end))),
            _ => Err(Error::tensor(
                name,
                format!("external data range offset {offset} length {length:?} exceeds {} ({} bytes)", path.display(), file.len()),
            )),
        }
    }
}

/// Encodes a model. With `external`, tensor data goes to `<file name>.data`
/// beside `path` (for models over protobuf's 2 GB limit).
pub fn save(model: &Model, path: &Path, external: bool) -> Result<()> {
    let mut proto = model.to_proto()?;
    if external {
        let side = side_file_name(path);
        let data = move_data_out(&mut proto, &side);
        write_atomic(&path.with_file_name(&side), &data)?;
    }
    write_atomic_with(path, |file| {
        let mut sink = FileSink::new(file);
        proto.encode(&mut sink).map_err(std::io::Error::other)?;
        sink.finish()
    })
}

/// Bytes tensors at least this large skip the sink's buffer.
const DIRECT_WRITE_BYTES: usize = 64 * 1024;

/// A `BufMut` that streams an encoding to a file through a 1 MB buffer,
/// writing large byte fields (tensor data) straight from where they are:
/// no 100 MB output buffer to allocate, fault in and copy.
struct FileSink<'a> {
    file: &'a mut std::fs::File,
    buf: Vec<u8>,
    error: Option<std::io::Error>,
}

impl<'a> FileSink<'a> {
    fn new(file: &'a mut std::fs::File) -> Self {
        FileSink { file, buf: Vec::with_capacity(1 << 20), error: None }
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.error.is_none() {
            self.error = self.file.write_all(bytes).err();
        }
    }

    fn flush(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.write(&buf);
        self.buf = buf;
        self.buf.clear();
    }

    fn finish(mut self) -> std::io::Result<()> {
        self.flush();
        self.error.map_or(Ok(()), Err)
    }
}

// SAFETY: `chunk_mut` hands out the vector's spare capacity and
// `advance_mut` only extends the length over bytes the caller initialized.
unsafe impl bytes::BufMut for FileSink<'_> {
    fn remaining_mut(&self) -> usize {
        isize::MAX as usize - self.buf.len()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        let len = self.buf.len() + cnt;
        assert!(len <= self.buf.capacity(), "advance past the buffer");
        // SAFETY: the caller initialized these `cnt` bytes (BufMut contract).
        unsafe { self.buf.set_len(len) };
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        if self.buf.len() == self.buf.capacity() {
            self.flush();
        }
        bytes::buf::UninitSlice::uninit(self.buf.spare_capacity_mut())
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() >= DIRECT_WRITE_BYTES {
            self.flush();
            self.write(src);
            return;
        }
        if self.buf.capacity() - self.buf.len() < src.len() {
            self.flush();
        }
        self.buf.extend_from_slice(src);
    }

    fn put<T: bytes::Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        while src.has_remaining() {
            let chunk = src.chunk();
            let n = chunk.len();
            self.put_slice(chunk);
            src.advance(n);
        }
    }
}

pub fn to_bytes(model: &Model) -> Result<Vec<u8>> {
    Ok(model.to_proto()?.encode_to_vec())
}

fn side_file_name(path: &Path) -> String {
    format!("{}.data", path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()))
}

/// Moves large tensors' raw data into one buffer, pointing the protos at it.
fn move_data_out(proto: &mut ModelProto, location: &str) -> Vec<u8> {
    let mut data = Vec::new();
    let Some(graph) = proto.graph.as_mut() else { return data };
    for t in &mut graph.initializer {
        let Some(raw) = t.raw_data.take_if(|r| r.len() >= EXTERNAL_MIN_BYTES) else { continue };
        // Keep 64-byte alignment so readers may memory-map the file.
        data.resize(data.len().next_multiple_of(64), 0);
        let offset = data.len();
        data.extend_from_slice(&raw);
        t.data_location = Some(DataLocation::External as i32);
        t.external_data = [("location", location.to_string()), ("offset", offset.to_string()), ("length", raw.len().to_string())]
            .into_iter()
            .map(|(k, v)| StringStringEntryProto { key: Some(k.into()), value: Some(v) })
            .collect();
    }
    data
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// Lets `write` fill a temporary file beside `path`, then renames it over `path`.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    let werr = |source| Error::Write { path: path.to_path_buf(), source };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new().prefix(".cresnet-opt-").suffix(".tmp").tempfile_in(&dir).map_err(werr)?;
    write(tmp.as_file_mut()).map_err(werr)?;
    // The temp file is created 0600; give the result the usual permissions
    // (or the replaced file's). No fsync: the rename is what makes the write
    // all-or-nothing for a failing process, and fsync doubles the save time.
    let perms = std::fs::metadata(path).map(|m| m.permissions()).unwrap_or_else(|_| default_permissions());
    tmp.as_file().set_permissions(perms).map_err(werr)?;
    tmp.persist(path).map_err(|e| werr(e.error))?;
    Ok(())
}

#[cfg(unix)]
fn default_permissions() -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    std::fs::Permissions::from_mode(0o644)
}

#[cfg(not(unix))]
fn default_permissions() -> std::fs::Permissions {
    tempfile::tempfile().and_then(|f| f.metadata()).map(|m| m.permissions()).expect("a temporary file")
}
