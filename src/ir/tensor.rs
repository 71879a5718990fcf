//! Weights: ONNX `TensorProto`s decoded into ndarray arrays the passes can
//! rewrite. Dtypes the passes never touch stay as their original proto, so
//! they round-trip byte for byte.
use crate::error::{Error, Result};
use crate::onnx::{tensor_proto::DataType, TensorProto};
use bytes::Bytes;
use ndarray::{ArrayD, IxDyn};

/// Decoded tensor contents.
#[derive(Debug, Clone)]
pub enum Data {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    I64(ArrayD<i64>),
    /// Any other dtype: the data stays in the proto, untouched.
    Other,
}

/// A constant tensor (an initializer). `proto` keeps every field but the data
/// (for `F32`/`F64`/`I64`), so name, doc string and metadata survive.
#[derive(Debug, Clone)]
pub struct Weight {
    pub proto: TensorProto,
    data: Data,
    /// The bytes the data was read from, while the data is unchanged: saving
    /// an untouched weight then costs no conversion and no copy.
    original: Option<Bytes>,
}

/// Bytes per element of the fixed-size ONNX dtypes; `None` for strings and
/// unknown codes.
pub fn dtype_size(code: i32) -> Option<usize> {
    use DataType::*;
    let size = match DataType::try_from(code).ok()? {
        Float | Int32 | Uint32 => 4,
        Uint8 | Int8 | Bool | Float8e4m3fn | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz | Uint4 | Int4 | Float4e2m1 | Float8e8m0
        | Uint2 | Int2 | Float6e2m3 | Float6e3m2 => 1,
        Uint16 | Int16 | Float16 | Bfloat16 => 2,
        Int64 | Uint64 | Double | Complex64 => 8,
        Complex128 => 16,
        String | Undefined => return None,
    };
    Some(size)
}

/// Element count of `dims`, rejecting negative dimensions and overflow before
/// anything is allocated.
pub fn element_count(name: &str, dims: &[i64]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        let d = usize::try_from(d).map_err(|_| Error::tensor(name, format!("negative dimension {d} in {dims:?}")))?;
        acc.checked_mul(d).ok_or_else(|| Error::tensor(name, format!("dimensions {dims:?} overflow")))
    })
}

impl Weight {
    /// Decodes `proto`; `raw` is its data when it lives in an external file.
    pub fn decode(mut proto: TensorProto, external: Option<Bytes>) -> Result<Weight> {
        let name = proto.name().to_string();
        let code = proto.data_type.unwrap_or(0);
        if DataType::try_from(code).map_or(true, |t| t == DataType::Undefined) {
            return Err(Error::tensor(&name, format!("unsupported data type code {code}")));
        }
        let count = element_count(&name, &proto.dims)?;
        let shape: Vec<usize> = proto.dims.iter().map(|&d| d as usize).collect();
        if let Some(bytes) = external {
            proto.raw_data = Some(bytes);
            proto.external_data.clear();
            proto.data_location = None;
        }
        let original = proto.raw_data.clone().filter(|r| !r.is_empty() && cfg!(target_endian = "little"));
        let data = match DataType::try_from(code) {
            Ok(DataType::Float) => Data::F32(array(
                &name,
                shape,
                take_numbers(&mut proto, count, 4, |p| std::mem::take(&mut p.float_data), f32::from_le_bytes)?,
            )?),
            Ok(DataType::Double) => Data::F64(array(
                &name,
                shape,
                take_numbers(&mut proto, count, 8, |p| std::mem::take(&mut p.double_data), f64::from_le_bytes)?,
            )?),
            Ok(DataType::Int64) => Data::I64(array(
                &name,
                shape,
                take_numbers(&mut proto, count, 8, |p| std::mem::take(&mut p.int64_data), i64::from_le_bytes)?,
            )?),
            _ => {
                check_other_size(&name, &proto, code, count)?;
                Data::Other
            }
        };
        let original = if matches!(data, Data::Other) { None } else { original };
        Ok(Weight { proto, data, original })
    }

    pub fn data(&self) -> &Data {
        &self.data
    }

    /// Mutable access; the weight will be re-encoded on save.
    pub fn data_mut(&mut self) -> &mut Data {
        self.original = None;
        &mut self.data
    }

    pub fn set_data(&mut self, data: Data) {
        self.original = None;
        self.data = data;
    }

    pub fn from_f32(name: &str, array: ArrayD<f32>) -> Weight {
        let proto = TensorProto { name: Some(name.to_string()), data_type: Some(DataType::Float as i32), ..Default::default() };
        Weight { proto, data: Data::F32(array), original: None }
    }

    pub fn from_i64(name: &str, array: ArrayD<i64>) -> Weight {
        let proto = TensorProto { name: Some(name.to_string()), data_type: Some(DataType::Int64 as i32), ..Default::default() };
        Weight { proto, data: Data::I64(array), original: None }
    }

    pub fn name(&self) -> &str {
        self.proto.name()
    }

    pub fn dtype(&self) -> i32 {
        self.proto.data_type.unwrap_or(0)
    }

    pub fn shape(&self) -> Vec<usize> {
        match &self.data {
            Data::F32(a) => a.shape().to_vec(),
            Data::F64(a) => a.shape().to_vec(),
            Data::I64(a) => a.shape().to_vec(),
            Data::Other => self.proto.dims.iter().map(|&d| d.max(0) as usize).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values of a float tensor as f64 (None for other dtypes).
    pub fn to_f64_vec(&self) -> Option<Vec<f64>> {
        match self.data() {
            Data::F32(a) => Some(a.iter().map(|&v| v as f64).collect()),
            Data::F64(a) => Some(a.iter().copied().collect()),
            _ => None,
        }
    }

    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match &self.data {
            Data::F32(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_f32_mut(&mut self) -> Option<&mut ArrayD<f32>> {
        match self.data_mut() {
            Data::F32(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<&ArrayD<i64>> {
        match &self.data {
            Data::I64(a) => Some(a),
            _ => None,
        }
    }

    /// The proto to write: decoded data goes back as little-endian `raw_data`.
    pub fn encode(&self) -> TensorProto {
        let mut proto = self.proto.clone();
        if let Some(raw) = &self.original {
            proto.raw_data = Some(raw.clone());
            return proto;
        }
        let (dims, raw) = match &self.data {
            Data::F32(a) => (a.shape().to_vec(), le_bytes(a, f32::to_le_bytes)),
            Data::F64(a) => (a.shape().to_vec(), le_bytes(a, f64::to_le_bytes)),
            Data::I64(a) => (a.shape().to_vec(), le_bytes(a, i64::to_le_bytes)),
            Data::Other => return proto,
        };
        proto.dims = dims.iter().map(|&d| d as i64).collect();
        proto.raw_data = Some(Bytes::from(raw));
        proto
    }
}

fn array<T>(name: &str, shape: Vec<usize>, values: Vec<T>) -> Result<ArrayD<T>> {
    ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| Error::tensor(name, e.to_string()))
}

/// Takes the numbers out of `raw_data` or the typed field, checking the count.
fn take_numbers<T: bytemuck::Pod, const N: usize>(
    proto: &mut TensorProto,
    count: usize,
    size: usize,
    typed: impl Fn(&mut TensorProto) -> Vec<T>,
    from_le: fn([u8; N]) -> T,
) -> Result<Vec<T>> {
    let name = proto.name().to_string();
    let values = match proto.raw_data.take() {
        Some(raw) if !raw.is_empty() || count == 0 => {
            if raw.len() != count * size {
                return Err(Error::tensor(
                    &name,
                    format!("holds {} bytes but its shape {:?} needs {}", raw.len(), proto.dims, count * size),
                ));
            }
            from_le_bytes_all(&raw, from_le)
        }
        _ => typed(proto),
    };
    if values.len() != count {
        return Err(Error::tensor(&name, format!("holds {} values but its shape {:?} needs {count}", values.len(), proto.dims)));
    }
    Ok(values)
}

fn check_other_size(name: &str, proto: &TensorProto, code: i32, count: usize) -> Result<()> {
    let (Some(raw), Some(size)) = (&proto.raw_data, dtype_size(code)) else { return Ok(()) };
    // Sub-byte types pack several values per byte; only check byte-sized ones.
    let sub_byte = matches!(
        DataType::try_from(code),
        Ok(DataType::Uint4
            | DataType::Int4
            | DataType::Float4e2m1
            | DataType::Uint2
            | DataType::Int2
            | DataType::Float6e2m3
            | DataType::Float6e3m2)
    );
    if !sub_byte && raw.len() != count * size && proto.data_location != Some(1) {
        return Err(Error::tensor(name, format!("holds {} bytes but its shape {:?} needs {}", raw.len(), proto.dims, count * size)));
    }
    Ok(())
}

/// Little-endian bytes to numbers: one bulk copy on little-endian machines.
fn from_le_bytes_all<T: bytemuck::Pod, const N: usize>(raw: &[u8], from_le: fn([u8; N]) -> T) -> Vec<T> {
    if cfg!(target_endian = "little") {
        return bytemuck::pod_collect_to_vec(raw);
    }
    raw.chunks_exact(N).map(|c| from_le(c.try_into().expect("chunk of N bytes"))).collect()
}

fn le_bytes<T: bytemuck::Pod, const N: usize>(a: &ArrayD<T>, to_le: fn(T) -> [u8; N]) -> Vec<u8> {
    if let (true, Some(slice)) = (cfg!(target_endian = "little"), a.as_slice()) {
        return bytemuck::cast_slice(slice).to_vec();
    }
    let mut out = Vec::with_capacity(a.len() * N);
    for &v in a.iter() {
        out.extend_from_slice(&to_le(v));
    }
    out
}
