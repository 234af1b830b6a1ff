//! GGUF, llama.cpp's model container (spec: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>).
//!
//! Layout (little-endian): magic `GGUF`, `u32` version (2 or 3), `u64` tensor count, `u64`
//! metadata count; the metadata key/value pairs (typed, arrays included); the tensor table
//! (name, dimensions innermost first, GGML type, offset into the data section); padding to
//! `general.alignment` (default 32); the tensor data.
//!
//! The parser works on a borrowed byte slice (a memory map) and never trusts a count: every
//! length is checked against the bytes that remain before anything is allocated, every
//! dimension product is checked for overflow, and every tensor's data range must lie inside
//! the file. [`dequantize`] turns F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K data
//! into `f32` (ggml's `dequantize_row_*`); other types are named in the error. The quantized
//! ones all reduce to [`AffineGroups`] ([`affine_groups`]): runs of 16 or 32 consecutive
//! elements sharing a scale and an offset over small unsigned codes, which a consumer can keep
//! quantized instead of expanding; [`packed_groups`], which decodes every block type once,
//! gives them with the codes already packed into 32-bit words.
//!
//! [`hf`] maps GGUF metadata and tensor names to the Hugging Face equivalents, as
//! `transformers.integrations.gguf` does when it loads a GGUF file.

use crate::FormatError;
use std::collections::BTreeMap;

pub const MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// Nested arrays deeper than this are refused (the format allows them; no model uses them).
const MAX_ARRAY_DEPTH: usize = 3;

/// Whether the file at `path` starts with the GGUF magic.
pub fn is_gguf_file(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file() && std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == MAGIC
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type that fits in a `u64` without a sign change.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }
}

/// A GGML tensor type: its id, name and block geometry (ggml's `type_traits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    /// Elements per block.
    pub block_size: u64,
    /// Bytes per block.
    pub type_size: u64,
}

impl GgmlType {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q4_0: u32 = 2;
    pub const Q4_1: u32 = 3;
    pub const Q8_0: u32 = 8;
    pub const Q2_K: u32 = 10;
    pub const Q4_K: u32 = 12;
    pub const Q5_K: u32 = 13;
    pub const Q6_K: u32 = 14;
    pub const BF16: u32 = 30;

    /// The type with this id, if ggml defines it.
    pub fn from_id(id: u32) -> Option<Self> {
        let (name, block_size, type_size) = match id {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 36),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            16 => ("IQ2_XXS", 256, 66),
            17 => ("IQ2_XS", 256, 74),
            18 => ("IQ3_XXS", 256, 98),
            19 => ("IQ1_S", 256, 50),
            20 => ("IQ4_NL", 32, 18),
            21 => ("IQ3_S", 256, 110),
            22 => ("IQ2_S", 256, 82),
            23 => ("IQ4_XS", 256, 136),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            29 => ("IQ1_M", 256, 56),
            30 => ("BF16", 1, 2),
            34 => ("TQ1_0", 256, 54),
            35 => ("TQ2_0", 256, 66),
            39 => ("MXFP4", 32, 17),
            _ => return None,
        };
        Some(Self { id, name, block_size, type_size })
    }

    /// Whether [`dequantize`] reads this type.
    pub fn is_supported(&self) -> bool {
        matches!(
            self.id,
            Self::F32 | Self::F16 | Self::BF16 | Self::Q8_0 | Self::Q4_0 | Self::Q4_1 | Self::Q4_K | Self::Q5_K | Self::Q6_K
        )
    }
}

/// The types [`dequantize`] reads, for error messages.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K";

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The shape in row-major (PyTorch / safetensors) order: the GGML dimensions reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file (metadata and tensor table; the data stay in the caller's bytes).
#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Length of the whole file (`bytes` may be only its head).
    file_len: u64,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], FormatError> {
        if n > self.remaining() {
            return Err(FormatError(format!(
                "truncated: {what} needs {n} bytes at offset {} but the file has {} left",
                self.pos,
                self.remaining()
            )));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], FormatError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_item_bytes` long: refused when the rest of the
    /// file could not hold that many. `what` is `(prefix, name)`, joined only for an error:
    /// a tokenizer's hundred thousand strings each have a count, and formatting a name for
    /// every one took most of a 2 MB metadata parse.
    fn count(&mut self, (prefix, name): (&str, &str), min_item_bytes: usize) -> Result<usize, FormatError> {
        let what = || format!("{prefix}{name}");
        if self.remaining() < 8 {
            return Err(FormatError(format!(
                "truncated: {} needs 8 bytes at offset {} but the file has {} left",
                what(),
                self.pos,
                self.remaining()
            )));
        }
        let n = self.u64(name)?;
        let left_in_file = self.file_len.saturating_sub(self.pos as u64);
        let fits = left_in_file / min_item_bytes.max(1) as u64;
        if n > fits {
            return Err(FormatError(format!("{} is {n}, but the {left_in_file} bytes left in the file can hold at most {fits}", what())));
        }
        let fits_here = (self.remaining() / min_item_bytes.max(1)) as u64;
        if n > fits_here {
            // Plausible for the file, but past the head we were given: the caller reads more.
            return Err(FormatError(format!(
                "truncated: {} is {n}, more than the {} bytes read so far can hold",
                what(),
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, FormatError> {
        let len = self.count(("length of ", what), 1)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FormatError(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, type_id: u32, what: &str, depth: usize) -> Result<Value, FormatError> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(FormatError(format!("{what}: bool byte {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(FormatError(format!("{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let item_type = self.u32(what)?;
                let min = match item_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => return Err(FormatError(format!("{what}: unknown metadata value type {other} in array"))),
                };
                let n = self.count(("element count of ", what), min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_type, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(FormatError(format!("{what}: unknown metadata value type {other}"))),
        })
    }
}

impl Gguf {
    /// Parses and validates the header, metadata and tensor table of `bytes` (the whole file).
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        Self::parse_prefix(bytes, bytes.len() as u64)
    }

    /// As [`parse`](Self::parse), from the first bytes of a file of `file_len` bytes (enough
    /// to hold the metadata and tensor table; tensor ranges are checked against `file_len`).
    pub fn parse_prefix(bytes: &[u8], file_len: u64) -> Result<Self, FormatError> {
        let mut r = Reader { bytes, pos: 0, file_len: file_len.max(bytes.len() as u64) };
        let magic = r.array::<4>("magic")?;
        if magic != MAGIC {
            return Err(FormatError(format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")")));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(FormatError(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        // A tensor entry takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset)
        // bytes; a metadata entry at least 8 (key length) + 4 (type) + 1 (value).
        let tensor_count = r.count(("", "tensor count"), 24)?;
        let kv_count = r.count(("", "metadata count"), 13)?;
        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&format!("metadata key #{i}"))?;
            let type_id = r.u32(&format!("type of `{key}`"))?;
            let value = r.value(type_id, &format!("metadata `{key}`"), 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(FormatError(format!("metadata key `{key}` appears twice")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => return Err(FormatError(format!("general.alignment {v:?} is not a power of two up to 1 MiB"))),
            },
        };
        let mut tensors = Vec::with_capacity(tensor_count);
        let mut names = std::collections::HashSet::new();
        for i in 0..tensor_count {
            let name = r.string(&format!("name of tensor #{i}"))?;
            let n_dims = r.u32(&format!("dimension count of `{name}`"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(FormatError(format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&format!("dimensions of `{name}`"))?);
            }
            let type_id = r.u32(&format!("type of `{name}`"))?;
            let offset = r.u64(&format!("offset of `{name}`"))?;
            let ggml_type = GgmlType::from_id(type_id)
                .ok_or_else(|| FormatError(format!("tensor `{name}` has unknown GGML type id {type_id}")))?;
            let n_elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| FormatError(format!("tensor `{name}`: dimensions {dims:?} overflow")))?;
            if dims.contains(&0) {
                return Err(FormatError(format!("tensor `{name}` has a zero dimension {dims:?}")));
            }
            if dims[0] % ggml_type.block_size != 0 {
                return Err(FormatError(format!(
                    "tensor `{name}`: innermost dimension {} is not a multiple of the {} block size {}",
                    dims[0], ggml_type.name, ggml_type.block_size
                )));
            }
            let n_bytes = (n_elements / ggml_type.block_size)
                .checked_mul(ggml_type.type_size)
                .ok_or_else(|| FormatError(format!("tensor `{name}`: byte size overflows")))?;
            if offset % alignment != 0 {
                return Err(FormatError(format!("tensor `{name}`: offset {offset} is not aligned to {alignment}")));
            }
            if !names.insert(name.clone()) {
                return Err(FormatError(format!("tensor `{name}` appears twice")));
            }
            tensors.push(TensorInfo { name, dims, ggml_type, offset, n_elements, n_bytes });
        }
        let table_end = r.pos as u64;
        let data_offset = table_end.div_ceil(alignment) * alignment;
        for t in &tensors {
            let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(FormatError(format!(
                        "tensor `{}` ({} bytes at data offset {}) lies past the end of the {file_len}-byte file",
                        t.name, t.n_bytes, t.offset
                    )));
                }
            }
        }
        Ok(Self { version, metadata, tensors, alignment, data_offset })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn typed<'a, T>(&'a self, key: &str, want: &str, f: impl Fn(&'a Value) -> Option<T>) -> Result<Option<T>, FormatError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => f(v)
                .map(Some)
                .ok_or_else(|| FormatError(format!("metadata `{key}` is a {}, expected {want}", v.type_name()))),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, FormatError> {
        self.typed(key, "an unsigned integer", Value::as_u64)
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>, FormatError> {
        self.typed(key, "a number", Value::as_f64)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, FormatError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(FormatError(format!("metadata `{key}` is a {}, expected a string", v.type_name()))),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, FormatError> {
        self.typed(key, "a bool", Value::as_bool)
    }

    /// An array of strings (`tokenizer.ggml.tokens`, `tokenizer.ggml.merges`).
    pub fn get_strings(&self, key: &str) -> Result<Option<Vec<&str>>, FormatError> {
        self.typed(key, "an array of strings", |v| v.as_array()?.iter().map(Value::as_str).collect())
    }

    /// An array of strings moved out of the metadata (the key removed), not copied: a large
    /// vocabulary's strings are then held once while they are turned into a tokenizer.
    pub fn take_strings(&mut self, key: &str) -> Result<Option<Vec<String>>, FormatError> {
        let Some(value) = self.metadata.remove(key) else { return Ok(None) };
        let kind = value.type_name();
        let bad = || FormatError(format!("metadata `{key}` is a {kind}, expected an array of strings"));
        match value {
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(bad()),
                })
                .collect::<Result<Vec<String>, _>>()
                .map(Some),
            _ => Err(bad()),
        }
    }

    /// An array of integers (`tokenizer.ggml.token_type`).
    pub fn get_ints(&self, key: &str) -> Result<Option<Vec<i64>>, FormatError> {
        self.typed(key, "an array of integers", |v| {
            v.as_array()?
                .iter()
                .map(|x| match *x {
                    Value::I32(i) => Some(i64::from(i)),
                    Value::I64(i) => Some(i),
                    Value::I8(i) => Some(i64::from(i)),
                    Value::I16(i) => Some(i64::from(i)),
                    _ => x.as_u64().and_then(|u| i64::try_from(u).ok()),
                })
                .collect()
        })
    }

    /// The token a `tokenizer.ggml.*_token_id` key names, with its id (`None` when the key is
    /// absent or the id is past the vocabulary).
    pub fn special_token(&self, id_key: &str) -> Result<Option<(&str, u32)>, FormatError> {
        let Some(id) = self.get_u64(id_key)? else { return Ok(None) };
        let token = self
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .and_then(|t| t.get(usize::try_from(id).ok()?))
            .and_then(Value::as_str);
        Ok(token.and_then(|t| u32::try_from(id).ok().map(|id| (t, id))))
    }

    /// `general.architecture`, required by the format.
    pub fn architecture(&self) -> Result<&str, FormatError> {
        self.get_str("general.architecture")?
            .ok_or_else(|| FormatError::new("metadata `general.architecture` is missing"))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor of this file (`file` is the same bytes given to [`parse`](Self::parse)).
    pub fn tensor_bytes<'a>(&self, file: &'a [u8], info: &TensorInfo) -> Result<&'a [u8], FormatError> {
        let start = self.data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(info.n_bytes));
        match (start, end) {
            (Some(s), Some(e)) if e <= file.len() as u64 => Ok(&file[s as usize..e as usize]),
            _ => Err(FormatError(format!("tensor `{}` lies outside the file", info.name))),
        }
    }
}

fn f16_at(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// A quantized tensor's values as groups of consecutive elements sharing a scale and an
/// offset: element `i` is `scales[i / group] * codes[i] as f32 + mins[i / group]` (ggml's
/// `dequantize_row_*` reduced to one form; exact for every type listed, given finite f16
/// fields, up to the sign of a zero).
#[derive(Clone, Debug, PartialEq)]
pub struct AffineGroups {
    /// Bits a code is stored in: 4 (Q4_0, Q4_1, Q4_K) or 8 (Q8_0, Q5_K, Q6_K: codes of 8, 5 and 6 bits).
    pub bits: u32,
    /// Elements per group: 32 (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K) or 16 (Q6_K).
    pub group: usize,
    /// One code per element in GGML element order, each below 2^bits (unsigned).
    pub codes: Vec<u8>,
    /// One scale per group.
    pub scales: Vec<f32>,
    /// One offset per group.
    pub mins: Vec<f32>,
}

impl AffineGroups {
    /// The values, `scale * code + min` per element (a product then a sum, no fused multiply-add).
    pub fn values(&self) -> Vec<f32> {
        self.codes
            .chunks(self.group.max(1))
            .zip(self.scales.iter().zip(&self.mins))
            .flat_map(|(codes, (&scale, &min))| codes.iter().map(move |&c| scale * f32::from(c) + min))
            .collect()
    }
}

/// A quantized tensor's codes already packed into 32-bit words, with its groups' scales and
/// offsets: the [`AffineGroups`] of the tensor (same `bits`, `group`, `scales` and `mins`)
/// with `codes` packed along the elements — 4-bit: element `8w + k` in bits `4k..4k + 4` of
/// word `w`; 8-bit: element `4w + k` in byte `k` — the layout the engine's quantized matrices
/// keep (`inference_pio_kernels::quant::QuantizedMatrix`), so a load takes it as it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PackedGroups {
    pub bits: u32,
    pub group: usize,
    pub words: Vec<u32>,
    pub scales: Vec<f32>,
    pub mins: Vec<f32>,
}

/// [`PackedGroups`] straight from the blocks of a quantized tensor (`Q8_0`, `Q4_0`, `Q4_1`,
/// `Q4_K`, `Q5_K`, `Q6_K`), without a byte per element on the way (the built-in model's load
/// spent most of its time on those and on packing them); `None` for the float types. Errors
/// as [`affine_groups`].
pub fn packed_groups(info: &TensorInfo, data: &[u8]) -> Result<Option<PackedGroups>, FormatError> {
    let mut p = PackedGroups::default();
    Ok(append_packed_groups(info, data, &mut p)?.then_some(p))
}

/// The words and groups [`packed_groups`] makes of `info`'s tensor; `None` for a type it does
/// not pack.
pub fn packed_len(info: &TensorInfo) -> Option<(usize, usize)> {
    let (bits, group) = packed_layout(info.ggml_type.id)?;
    let elements = usize::try_from(info.n_elements).ok()?;
    Some((elements * bits as usize / 32, elements / group))
}

/// Bits per code and elements per group of the types [`packed_groups`] packs.
fn packed_layout(id: u32) -> Option<(u32, usize)> {
    match id {
        GgmlType::Q8_0 | GgmlType::Q5_K => Some((8, 32)),
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => Some((4, 32)),
        GgmlType::Q6_K => Some((8, 16)),
        _ => None,
    }
}

/// [`packed_groups`] appended to `out` (its words, scales and offsets; `bits` and `group` set),
/// so that a tensor read in slices of whole rows is packed into one buffer without a copy per
/// slice; `false` (and `out` untouched) for a float type. An unsupported type or a wrong byte
/// count is an error naming the tensor.
pub fn append_packed_groups(info: &TensorInfo, data: &[u8], out: &mut PackedGroups) -> Result<bool, FormatError> {
    let t = info.ggml_type;
    let n_blocks = check_data(info, data)?;
    let Some((bits, group)) = packed_layout(t.id) else {
        return Ok(false);
    };
    if !out.words.is_empty() && (out.bits, out.group) != (bits, group) {
        return Err(FormatError(format!("tensor `{}`: {bits}-bit groups of {group} appended to {}-bit groups of {}", info.name, out.bits, out.group)));
    }
    (out.bits, out.group) = (bits, group);
    let PackedGroups { words, scales, mins, .. } = out;
    let elements = n_blocks * t.block_size as usize;
    words.reserve(elements * bits as usize / 32);
    scales.reserve(elements / group);
    mins.reserve(elements / group);
    // Eight bytes' low nibbles into one word, the first byte's lowest.
    let nibbles = |x: u64| -> u32 {
        let x = x & 0x0f0f_0f0f_0f0f_0f0f;
        let x = (x | (x >> 4)) & 0x00ff_00ff_00ff_00ff;
        let x = (x | (x >> 8)) & 0x0000_ffff_0000_ffff;
        ((x | (x >> 16)) & 0xffff_ffff) as u32
    };
    let le64 = |b: &[u8]| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let u16_at = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if matches!(t.id, GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K) {
        // The K-quants, four codes or eight nibbles a word; one f16 scale (and min) per 256
        // elements, so converted one by one.
        for block in data.chunks_exact(t.type_size as usize) {
            if t.id == GgmlType::Q6_K {
                // block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }: per 128 elements
                // n, element 32k + l (k < 4, l < 32) takes the low (k < 2) or high nibble of
                // ql[64n + 32(k % 2) + l] and bits 2k, 2k + 1 of qh[32n + l] as bits 4, 5;
                // x = d * scales[i / 16] * (q - 32).
                let (ql, rest) = block.split_at(128);
                let (qh, rest) = rest.split_at(64);
                let (sc, d) = rest.split_at(16);
                let d = f16_at(d);
                for n in 0..2 {
                    for k in 0..4 {
                        let low = &ql[64 * n + 32 * (k % 2)..][..32];
                        let high = &qh[32 * n..32 * n + 32];
                        let shift = if k < 2 { 0 } else { 4 };
                        for i in 0..8 {
                            let lo = (le32(&low[4 * i..]) >> shift) & 0x0f0f_0f0f;
                            let hi = (le32(&high[4 * i..]) >> (2 * k)) & 0x0303_0303;
                            words.push(lo | (hi << 4));
                        }
                    }
                }
                for &s in sc {
                    let scale = d * f32::from(s as i8);
                    scales.push(scale);
                    mins.push(-32.0 * scale);
                }
                continue;
            }
            // block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }
            // block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }
            // Per 64 elements j: 32 low nibbles of qs[32j..] (sub-block 2j), then 32 high
            // nibbles (2j + 1); x = d * sc * q - dmin * m. Q5_K adds 16 to q where bit 2j
            // (low) or 2j + 1 (high) of qh[l] is set.
            let d = f16_at(&block[0..2]);
            let dmin = f16_at(&block[2..4]);
            let packed = &block[4..16];
            let (qh, qs) = if t.id == GgmlType::Q5_K { (Some(&block[16..48]), &block[48..]) } else { (None, &block[16..]) };
            for j in 0..4 {
                let ql = &qs[32 * j..32 * j + 32];
                for (half, shift) in [(0, 0), (1, 4)] {
                    let (sc, m) = scale_min_k4(2 * j + half, packed);
                    scales.push(d * f32::from(sc));
                    mins.push(-(dmin * f32::from(m)));
                    match qh {
                        None => words.extend((0..4).map(|i| nibbles(le64(&ql[8 * i..]) >> shift))),
                        Some(qh) => {
                            let bit = 2 * j + half;
                            words.extend((0..8).map(|i| ((le32(&ql[4 * i..]) >> shift) & 0x0f0f_0f0f) | (((le32(&qh[4 * i..]) >> bit) & 0x0101_0101) << 4)));
                        }
                    }
                }
            }
        }
        return Ok(true);
    }
    // The blocks' f16 scales (and Q4_1's offsets) are collected as bits and converted a slice
    // at a time (F16C where the CPU has it): one by one they were a tenth of the load.
    let (mut d_bits, mut m_bits) = (Vec::with_capacity(n_blocks), Vec::new());
    let blocks = data.chunks_exact(t.type_size as usize);
    match t.id {
        GgmlType::Q8_0 => {
            // block_q8_0 { f16 d; i8 qs[32]; }: x = d * q = d * (q + 128) - 128 d, so the codes
            // are q + 128 (the sign bit flipped).
            for block in blocks {
                d_bits.push(u16_at(&block[0..2]));
                words.extend(block[2..34].chunks_exact(4).map(|b| le32(b) ^ 0x8080_8080));
            }
        }
        _ => {
            // block_q4_0 { f16 d; u8 qs[16]; }: x[j] = d * (lo(qs[j]) - 8), x[j+16] = d * (hi(qs[j]) - 8)
            // block_q4_1 { f16 d; f16 m; u8 qs[16]; }: x[j] = d * lo(qs[j]) + m, x[j+16] = d * hi(qs[j]) + m
            let q4_1 = t.id == GgmlType::Q4_1;
            if q4_1 {
                m_bits.reserve(n_blocks);
            }
            for block in blocks {
                d_bits.push(u16_at(&block[0..2]));
                let qs = if q4_1 {
                    m_bits.push(u16_at(&block[2..4]));
                    &block[4..20]
                } else {
                    &block[2..18]
                };
                let (a, b) = (le64(&qs[0..8]), le64(&qs[8..16]));
                words.push(nibbles(a));
                words.push(nibbles(b));
                words.push(nibbles(a >> 4));
                words.push(nibbles(b >> 4));
            }
        }
    }
    let f32s = |bits: &[u16], out: &mut Vec<f32>| {
        let start = out.len();
        out.resize(start + bits.len(), 0.0);
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(half::slice::HalfBitsSliceExt::reinterpret_cast::<half::f16>(bits), &mut out[start..]);
    };
    let s0 = scales.len();
    f32s(&d_bits, scales);
    match t.id {
        GgmlType::Q4_1 => f32s(&m_bits, mins),
        GgmlType::Q8_0 => mins.extend(scales[s0..].iter().map(|d| -128.0 * d)),
        _ => mins.extend(scales[s0..].iter().map(|d| -8.0 * d)),
    }
    Ok(true)
}

/// Checks that `info`'s type is one [`dequantize`] reads and that `data` holds exactly its
/// blocks; returns the number of blocks.
fn check_data(info: &TensorInfo, data: &[u8]) -> Result<usize, FormatError> {
    let t = info.ggml_type;
    if !t.is_supported() {
        return Err(FormatError(format!(
            "tensor `{}` has GGML type {}, which is not supported (supported: {SUPPORTED_TYPES})",
            info.name, t.name
        )));
    }
    if data.len() as u64 != info.n_bytes {
        return Err(FormatError(format!("tensor `{}`: {} data bytes, expected {}", info.name, data.len(), info.n_bytes)));
    }
    let blocks = info.n_elements / t.block_size;
    if !info.n_elements.is_multiple_of(t.block_size) || blocks.checked_mul(t.type_size) != Some(info.n_bytes) {
        return Err(FormatError(format!(
            "tensor `{}`: {} elements of {} do not take {} bytes",
            info.name, info.n_elements, t.name, info.n_bytes
        )));
    }
    usize::try_from(blocks).map_err(|_| FormatError(format!("tensor `{}`: too many blocks", info.name)))
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of a Q4_K or
/// Q5_K block, packed in 12 bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// A quantized tensor's data as [`AffineGroups`] (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, after
/// ggml-common.h and ggml-quants.c): [`packed_groups`] with its words unpacked to one code per
/// element; `None` for F32, F16 and BF16, which have no groups. Errors name the tensor for an
/// unsupported type or a wrong byte count.
pub fn affine_groups(info: &TensorInfo, data: &[u8]) -> Result<Option<AffineGroups>, FormatError> {
    let Some(PackedGroups { bits, group, words, scales, mins }) = packed_groups(info, data)? else {
        return Ok(None);
    };
    let (per_word, mask) = (32 / bits, (1u32 << bits) - 1);
    let codes = words.iter().flat_map(|&w| (0..per_word).map(move |k| ((w >> (k * bits)) & mask) as u8)).collect();
    Ok(Some(AffineGroups { bits, group, codes, scales, mins }))
}

/// Dequantizes a tensor's data to `f32` in GGML element order (ggml `dequantize_row_*`):
/// F32, F16 and BF16 directly, the quantized types through [`affine_groups`].
pub fn dequantize(info: &TensorInfo, data: &[u8]) -> Result<Vec<f32>, FormatError> {
    if let Some(groups) = affine_groups(info, data)? {
        return Ok(groups.values());
    }
    Ok(match info.ggml_type.id {
        GgmlType::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        GgmlType::F16 => data.chunks_exact(2).map(f16_at).collect(),
        GgmlType::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => unreachable!("affine_groups covers every other supported type"),
    })
}

/// Hugging Face names and config for GGUF files (`transformers.integrations.gguf`).
pub mod hf {
    use super::Gguf;
    use crate::FormatError;
    use serde_json::{Map, Value as Json, json};

    /// The HF `architectures` entry for a GGUF `general.architecture`.
    pub fn architecture_class(arch: &str) -> Option<&'static str> {
        Some(match arch {
            "llama" => "LlamaForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            "qwen3moe" => "Qwen3MoeForCausalLM",
            "glm4moe" => "Glm4MoeForCausalLM",
            _ => return None,
        })
    }

    /// The HF `model_type` for a GGUF `general.architecture`.
    fn model_type(arch: &str) -> &str {
        match arch {
            "qwen3moe" => "qwen3_moe",
            "glm4moe" => "glm4_moe",
            other => other,
        }
    }

    /// Architectures whose Q and K projection rows llama.cpp's converter permuted (from
    /// HF's rotate-half layout to interleaved pairs); loading must undo it.
    pub fn permutes_qk(arch: &str) -> bool {
        arch == "llama"
    }

    /// The HF tensor name for a GGUF tensor name, `None` for tensors HF has no parameter
    /// for (`rope_freqs.weight`, llama 3's precomputed RoPE factors).
    pub fn tensor_name(gguf_name: &str) -> Option<String> {
        let fixed = match gguf_name {
            "token_embd.weight" => Some("model.embed_tokens.weight"),
            "output_norm.weight" => Some("model.norm.weight"),
            "output.weight" => Some("lm_head.weight"),
            _ => None,
        };
        if let Some(name) = fixed {
            return Some(name.to_string());
        }
        let rest = gguf_name.strip_prefix("blk.")?;
        let (layer, rest) = rest.split_once('.')?;
        layer.parse::<usize>().ok()?;
        let (module, suffix) = rest.rsplit_once('.')?;
        if suffix != "weight" && suffix != "bias" {
            return None;
        }
        // GLM-4.x's router score bias (llama.cpp's `exp_probs_b`), a parameter of the router
        // without a `.bias` of its own in HF.
        if module == "exp_probs_b" && suffix == "bias" {
            return Some(format!("model.layers.{layer}.mlp.gate.e_score_correction_bias"));
        }
        let hf = match module {
            "attn_norm" => "input_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            "ffn_norm" => "post_attention_layernorm",
            // `glm4moe`'s name for the same norm.
            "post_attention_norm" => "post_attention_layernorm",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            // A mixture of experts' router (its experts: [`expert_views`]) and shared experts.
            "ffn_gate_inp" => "mlp.gate",
            "ffn_gate_shexp" => "mlp.shared_experts.gate_proj",
            "ffn_up_shexp" => "mlp.shared_experts.up_proj",
            "ffn_down_shexp" => "mlp.shared_experts.down_proj",
            _ => return None,
        };
        Some(format!("model.layers.{layer}.{hf}.{suffix}"))
    }

    /// llama.cpp's stacked expert weights (`blk.N.ffn_gate_exps.weight`, `ffn_up_exps`,
    /// `ffn_down_exps`: GGML dims `[in, out, experts]`, one expert's `[out, in]` matrix after
    /// another) as one tensor per expert, each named as HF's per-expert weight
    /// (`model.layers.N.mlp.experts.E.gate_proj.weight`): expert `E`'s rows of the stacked
    /// tensor, their blocks as stored (whole rows, so whole blocks).
    pub fn expert_views(file: &Gguf) -> Result<Vec<(String, super::TensorInfo)>, FormatError> {
        let mut out = Vec::new();
        for t in &file.tensors {
            let Some(rest) = t.name.strip_prefix("blk.") else { continue };
            let Some((layer, module)) = rest.split_once('.') else { continue };
            let proj = match module {
                "ffn_gate_exps.weight" => "gate_proj",
                "ffn_up_exps.weight" => "up_proj",
                "ffn_down_exps.weight" => "down_proj",
                _ => continue,
            };
            let layer: usize = layer.parse().map_err(|_| FormatError(format!("tensor `{}`: layer `{layer}` is not a number", t.name)))?;
            let &[cols, rows, experts] = t.dims.as_slice() else {
                return Err(FormatError(format!("tensor `{}` has dims {:?}; stacked experts have three", t.name, t.dims)));
            };
            if experts == 0 || !t.n_bytes.is_multiple_of(experts) || t.n_elements != cols * rows * experts {
                return Err(FormatError(format!("tensor `{}` ({} bytes) does not split into {experts} experts of [{rows}, {cols}]", t.name, t.n_bytes)));
            }
            let bytes = t.n_bytes / experts;
            for e in 0..experts {
                let view = super::TensorInfo {
                    name: format!("{}[{e}]", t.name),
                    dims: vec![cols, rows],
                    ggml_type: t.ggml_type,
                    offset: t.offset + e * bytes,
                    n_elements: cols * rows,
                    n_bytes: bytes,
                };
                out.push((format!("model.layers.{layer}.mlp.experts.{e}.{proj}.weight"), view));
            }
        }
        Ok(out)
    }

    /// Undoes llama.cpp's Q/K row permutation (`LlamaModel.permute` in
    /// `convert_hf_to_gguf.py`; transformers' `_reverse_permute_weights`) on a row-major
    /// `[rows, cols]` matrix whose rows are `heads` heads of `rows / heads` channels.
    pub fn unpermute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Result<Vec<f32>, FormatError> {
        if values.len() != rows * cols {
            return Err(FormatError(format!("cannot un-permute a [{rows}, {cols}] projection of {} values", values.len())));
        }
        let order = unpermute_order(rows, cols, heads)?;
        Ok(order.iter().flat_map(|&src| values[src * cols..(src + 1) * cols].iter().copied()).collect())
    }

    /// The row order [`unpermute_rows`] applies to a `[rows, cols]` projection of `heads`
    /// heads: HF row `dst` is GGUF row `order[dst]`.
    pub fn unpermute_order(rows: usize, cols: usize, heads: usize) -> Result<Vec<usize>, FormatError> {
        if heads == 0 || !rows.is_multiple_of(2 * heads) {
            return Err(FormatError(format!("cannot un-permute a [{rows}, {cols}] projection into {heads} heads")));
        }
        let half = rows / heads / 2;
        let mut order = vec![0; rows];
        // GGUF row (h, i, j) with j in {0,1}, i < half holds HF row (h, j, i).
        for h in 0..heads {
            for i in 0..half {
                for j in 0..2 {
                    order[(h * 2 + j) * half + i] = (h * half + i) * 2 + j;
                }
            }
        }
        Ok(order)
    }

    /// A transformers-style `config.json` for the model a GGUF file holds.
    pub fn config(file: &Gguf) -> Result<Json, FormatError> {
        let arch = file.architecture()?;
        let class = architecture_class(arch).ok_or_else(|| {
            FormatError(format!("GGUF architecture `{arch}` is not supported (supported: llama, qwen2, qwen3, qwen3moe, glm4moe)"))
        })?;
        let key = |name: &str| format!("{arch}.{name}");
        let need = |name: &str| -> Result<u64, FormatError> {
            file.get_u64(&key(name))?.ok_or_else(|| FormatError(format!("metadata `{}` is missing", key(name))))
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let vocab = match file.get_u64(&key("vocab_size"))? {
            Some(v) => v,
            None => file
                .get_strings("tokenizer.ggml.tokens")?
                .map(|t| t.len() as u64)
                .ok_or_else(|| FormatError(format!("neither `{}` nor `tokenizer.ggml.tokens` is present", key("vocab_size"))))?,
        };
        let mut c = Map::new();
        c.insert("architectures".into(), json!([class]));
        c.insert("model_type".into(), json!(model_type(arch)));
        c.insert("vocab_size".into(), json!(vocab));
        c.insert("hidden_size".into(), json!(hidden));
        c.insert("intermediate_size".into(), json!(need("feed_forward_length")?));
        // `glm4moe` counts its multi-token-prediction layers among the blocks (after the
        // decoder's, as HF stores them); the decoder does not run them.
        let nextn = file.get_u64(&key("nextn_predict_layers"))?.unwrap_or(0);
        let layers = need("block_count")?.checked_sub(nextn).ok_or_else(|| FormatError(format!("metadata `{}` exceeds `{}`", key("nextn_predict_layers"), key("block_count"))))?;
        c.insert("num_hidden_layers".into(), json!(layers));
        if nextn > 0 {
            c.insert("num_nextn_predict_layers".into(), json!(nextn));
        }
        c.insert("num_attention_heads".into(), json!(heads));
        c.insert("num_key_value_heads".into(), json!(file.get_u64(&key("attention.head_count_kv"))?.unwrap_or(heads)));
        let head_dim = match file.get_u64(&key("attention.key_length"))? {
            Some(d) => d,
            None if heads > 0 => hidden / heads,
            None => 0,
        };
        c.insert("head_dim".into(), json!(head_dim));
        if let Some(rope_dim) = file.get_u64(&key("rope.dimension_count"))?
            && head_dim > 0
            && rope_dim != head_dim
        {
            c.insert("partial_rotary_factor".into(), json!(rope_dim as f64 / head_dim as f64));
        }
        if let Some(n) = file.get_u64(&key("context_length"))? {
            c.insert("max_position_embeddings".into(), json!(n));
        }
        if let Some(eps) = file.get_f64(&key("attention.layer_norm_rms_epsilon"))? {
            c.insert("rms_norm_eps".into(), json!(eps));
        }
        if let Some(theta) = file.get_f64(&key("rope.freq_base"))? {
            c.insert("rope_theta".into(), json!(theta));
        }
        match file.get_str(&key("rope.scaling.type"))? {
            None | Some("none") => {}
            Some(kind) => {
                let factor = file.get_f64(&key("rope.scaling.factor"))?;
                c.insert("rope_scaling".into(), json!({ "rope_type": kind, "factor": factor }));
            }
        }
        // GLM-4.x (llama.cpp's `glm4moe`, written by `convert_hf_to_gguf.py`'s `Glm4MoeModel`,
        // read by `src/models/glm4-moe.cpp`): `Glm4MoeConfig`'s routing keys. Sigmoid scores with
        // the `exp_probs_b` bias, the chosen weights renormalised when `expert_weights_norm`
        // says so and scaled by `expert_weights_scale`; the first `leading_dense_block_count`
        // layers dense; group-limited choice where `expert_group_count` is given (llama.cpp's
        // converter writes none for GLM: the released models have one group); QK-norm where the
        // file has its weights.
        if arch == "glm4moe" {
            // llama.cpp's gating function numbers: 1 softmax, 2 sigmoid (its default for glm4moe).
            if let Some(gating) = file.get_u64(&key("expert_gating_func"))?
                && gating != 2
            {
                return Err(FormatError(format!("metadata `{}` = {gating}: GLM-4 routing scores are sigmoids (2)", key("expert_gating_func"))));
            }
            c.insert("n_routed_experts".into(), json!(need("expert_count")?));
            c.insert("num_experts_per_tok".into(), json!(need("expert_used_count")?));
            c.insert("moe_intermediate_size".into(), json!(need("expert_feed_forward_length")?));
            c.insert("n_shared_experts".into(), json!(file.get_u64(&key("expert_shared_count"))?.unwrap_or(0)));
            c.insert("first_k_dense_replace".into(), json!(file.get_u64(&key("leading_dense_block_count"))?.unwrap_or(0).min(layers)));
            c.insert("routed_scaling_factor".into(), json!(file.get_f64(&key("expert_weights_scale"))?.filter(|&s| s != 0.0).unwrap_or(1.0)));
            c.insert("norm_topk_prob".into(), json!(file.get_bool(&key("expert_weights_norm"))?.unwrap_or(false)));
            c.insert("n_group".into(), json!(file.get_u64(&key("expert_group_count"))?.unwrap_or(1).max(1)));
            c.insert("topk_group".into(), json!(file.get_u64(&key("expert_group_used_count"))?.unwrap_or(1).max(1)));
            c.insert("use_qk_norm".into(), json!(file.tensor("blk.0.attn_q_norm.weight").is_some()));
            // GLM's default is half the head rotated; the file says how much in its rope
            // dimension (set above where it is not the whole head).
            if !c.contains_key("partial_rotary_factor") {
                c.insert("partial_rotary_factor".into(), json!(1.0));
            }
        }
        // A mixture of experts (llama.cpp's `qwen3moe`): its graph renormalises the chosen
        // experts' weights (`build_moe_ffn(..., norm_w = true, ...)`), every layer with a
        // router is sparse, and a layer without one holds a dense MLP (HF's `mlp_only_layers`).
        if arch == "qwen3moe"
            && let Some(experts) = file.get_u64(&key("expert_count"))?
            && experts > 0
        {
            if let Some(scale) = file.get_f64(&key("expert_weights_scale"))?
                && scale != 0.0
                && scale != 1.0
            {
                return Err(FormatError(format!("metadata `{}` = {scale}: scaled expert weights are not supported", key("expert_weights_scale"))));
            }
            c.insert("num_experts".into(), json!(experts));
            c.insert("num_experts_per_tok".into(), json!(need("expert_used_count")?));
            c.insert("moe_intermediate_size".into(), json!(need("expert_feed_forward_length")?));
            c.insert("norm_topk_prob".into(), json!(true));
            c.insert("decoder_sparse_step".into(), json!(1));
            let dense: Vec<u64> = (0..layers).filter(|l| file.tensor(&format!("blk.{l}.ffn_gate_inp.weight")).is_none()).collect();
            c.insert("mlp_only_layers".into(), json!(dense));
        }
        let tied = file.tensor("output.weight").is_none();
        c.insert("tie_word_embeddings".into(), json!(tied));
        let bias = file.tensor("blk.0.attn_q.bias").is_some();
        if arch == "llama" || arch == "glm4moe" {
            c.insert("attention_bias".into(), json!(bias));
        }
        c.insert("hidden_act".into(), json!("silu"));
        for (ours, theirs) in [("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id")] {
            if let Some(id) = file.get_u64(&format!("tokenizer.ggml.{theirs}"))? {
                c.insert(ours.into(), json!(id));
            }
        }
        c.insert("torch_dtype".into(), json!("float32"));
        Ok(Json::Object(c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF writer for tests: metadata entries and tensors given as raw bytes.
    pub(crate) struct Writer {
        kv: Vec<u8>,
        kv_count: u64,
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    }

    impl Writer {
        pub fn new() -> Self {
            Self { kv: Vec::new(), kv_count: 0, tensors: Vec::new() }
        }
        fn key(&mut self, k: &str, type_id: u32) {
            self.kv.extend((k.len() as u64).to_le_bytes());
            self.kv.extend(k.as_bytes());
            self.kv.extend(type_id.to_le_bytes());
            self.kv_count += 1;
        }
        pub fn u32(mut self, k: &str, v: u32) -> Self {
            self.key(k, 4);
            self.kv.extend(v.to_le_bytes());
            self
        }
        pub fn f32(mut self, k: &str, v: f32) -> Self {
            self.key(k, 6);
            self.kv.extend(v.to_le_bytes());
            self
        }
        pub fn string(mut self, k: &str, v: &str) -> Self {
            self.key(k, 8);
            self.kv.extend((v.len() as u64).to_le_bytes());
            self.kv.extend(v.as_bytes());
            self
        }
        pub fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> Self {
            self.tensors.push((name.into(), dims.to_vec(), type_id, data));
            self
        }
        pub fn build(self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(3u32.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend(self.kv_count.to_le_bytes());
            out.extend(&self.kv);
            let mut offset = 0u64;
            let mut offsets = Vec::new();
            for (name, dims, type_id, data) in &self.tensors {
                out.extend((name.len() as u64).to_le_bytes());
                out.extend(name.as_bytes());
                out.extend((dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend(d.to_le_bytes());
                }
                out.extend(type_id.to_le_bytes());
                out.extend(offset.to_le_bytes());
                offsets.push(offset);
                offset += (data.len() as u64).div_ceil(32) * 32;
            }
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
            let start = out.len();
            for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
                out.resize(start + off as usize, 0);
                out.extend(data);
            }
            out
        }
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn parses_metadata_and_tensors() {
        let bytes = Writer::new()
            .string("general.architecture", "llama")
            .u32("llama.block_count", 2)
            .tensor("a", &[4, 2], GgmlType::F32, f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.]))
            .tensor("b", &[2], GgmlType::F32, f32_bytes(&[9., 10.]))
            .build();
        let g = Gguf::parse(&bytes).expect("parse");
        assert_eq!(g.architecture().expect("arch"), "llama");
        assert_eq!(g.get_u64("llama.block_count").expect("u64"), Some(2));
        let a = g.tensor("a").expect("a").clone();
        assert_eq!(a.shape(), vec![2, 4]);
        let values = dequantize(&a, g.tensor_bytes(&bytes, &a).expect("bytes")).expect("dequantize");
        assert_eq!(values, vec![1., 2., 3., 4., 5., 6., 7., 8.]);
        let b = g.tensor("b").expect("b").clone();
        assert_eq!(dequantize(&b, g.tensor_bytes(&bytes, &b).expect("bytes")).expect("b"), vec![9., 10.]);
        assert!(g.get_str("llama.block_count").is_err());
    }

    #[test]
    fn taken_strings_leave_the_metadata_and_other_types_are_named_errors() {
        let mut g = Gguf::parse(&Writer::new().string("general.architecture", "llama").u32("llama.block_count", 2).build()).expect("parse");
        let words = vec![Value::String("a b".into()), Value::String("Ġthe".into())];
        g.metadata.insert("tokenizer.ggml.merges".into(), Value::Array(words));
        g.metadata.insert("tokenizer.ggml.mixed".into(), Value::Array(vec![Value::String("a".into()), Value::U32(1)]));
        assert_eq!(g.take_strings("tokenizer.ggml.merges").expect("strings"), Some(vec!["a b".to_string(), "Ġthe".to_string()]));
        assert!(!g.metadata.contains_key("tokenizer.ggml.merges"));
        assert_eq!(g.take_strings("tokenizer.ggml.merges").expect("gone"), None);
        for key in ["tokenizer.ggml.mixed", "llama.block_count"] {
            let e = g.take_strings(key).expect_err("not strings");
            assert!(e.0.contains(key) && e.0.contains("expected an array of strings"), "{e}");
        }
    }

    #[test]
    fn qwen3moe_files_give_a_moe_config_and_one_tensor_per_expert() {
        // Two layers: 0 with a router and 3 stacked experts of [2, 32] (Q8_0: 34 bytes a row),
        // 1 dense.
        let expert_rows: Vec<u8> = (0..3 * 2).flat_map(|r| [r as u8, 0].into_iter().chain(std::iter::repeat_n(r as u8, 32))).collect();
        let base = Writer::new()
            .string("general.architecture", "qwen3moe")
            .u32("qwen3moe.embedding_length", 32)
            .u32("qwen3moe.attention.head_count", 2)
            .u32("qwen3moe.feed_forward_length", 64)
            .u32("qwen3moe.block_count", 2)
            .u32("qwen3moe.vocab_size", 10)
            .u32("qwen3moe.expert_count", 3)
            .u32("qwen3moe.expert_used_count", 2)
            .u32("qwen3moe.expert_feed_forward_length", 2)
            .tensor("blk.0.ffn_gate_inp.weight", &[32, 3], GgmlType::F32, f32_bytes(&[0.0; 96]))
            .tensor("blk.0.ffn_up_exps.weight", &[32, 2, 3], GgmlType::Q8_0, expert_rows);
        let bytes = base.build();
        let g = Gguf::parse(&bytes).expect("parse");
        let c = hf::config(&g).expect("config");
        assert_eq!(c["architectures"][0], "Qwen3MoeForCausalLM");
        assert_eq!((c["num_experts"].as_u64(), c["num_experts_per_tok"].as_u64(), c["moe_intermediate_size"].as_u64()), (Some(3), Some(2), Some(2)));
        assert_eq!((c["norm_topk_prob"].as_bool(), c["mlp_only_layers"].clone()), (Some(true), serde_json::json!([1])));
        assert_eq!(hf::tensor_name("blk.0.ffn_gate_inp.weight").as_deref(), Some("model.layers.0.mlp.gate.weight"));
        let views = hf::expert_views(&g).expect("views");
        assert_eq!(views.len(), 3);
        for (e, (name, view)) in views.iter().enumerate() {
            assert_eq!(name, &format!("model.layers.0.mlp.experts.{e}.up_proj.weight"));
            assert_eq!((view.shape(), view.n_bytes), (vec![2, 32], 68));
            // Expert e's rows: 2e and 2e + 1 (each row's first scale byte is its number).
            let data = g.tensor_bytes(&bytes, view).expect("bytes");
            assert_eq!((data[0], data[34]), (2 * e as u8, 2 * e as u8 + 1));
        }
        // Scaled expert weights are refused by name; a stack that does not split is an error.
        let scaled = Writer::new()
            .string("general.architecture", "qwen3moe")
            .u32("qwen3moe.embedding_length", 32)
            .u32("qwen3moe.attention.head_count", 2)
            .u32("qwen3moe.feed_forward_length", 64)
            .u32("qwen3moe.block_count", 1)
            .u32("qwen3moe.vocab_size", 10)
            .u32("qwen3moe.expert_count", 3)
            .f32("qwen3moe.expert_weights_scale", 2.5)
            .build();
        let err = hf::config(&Gguf::parse(&scaled).expect("parse")).expect_err("scaled");
        assert!(err.to_string().contains("expert_weights_scale"), "{err}");
        let flat = Writer::new().tensor("blk.0.ffn_down_exps.weight", &[32, 2], GgmlType::F32, f32_bytes(&[0.0; 64])).build();
        assert!(hf::expert_views(&Gguf::parse(&flat).expect("parse")).is_err());
    }

    #[test]
    fn quantized_blocks_follow_ggml() {
        let d = half::f16::from_f32(0.5).to_le_bytes();
        let m = half::f16::from_f32(-1.0).to_le_bytes();
        // Q8_0: one block of 32, values q * d.
        let mut q8 = d.to_vec();
        q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
        // Q4_0: nibbles, low first: x[j] = (lo - 8) d, x[j+16] = (hi - 8) d.
        let mut q40 = d.to_vec();
        q40.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        // Q4_1: x = q d + m.
        let mut q41 = d.to_vec();
        q41.extend(m);
        q41.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let bytes = Writer::new()
            .string("general.architecture", "llama")
            .tensor("q8", &[32], GgmlType::Q8_0, q8)
            .tensor("q40", &[32], GgmlType::Q4_0, q40)
            .tensor("q41", &[32], GgmlType::Q4_1, q41)
            .tensor("f16", &[2], GgmlType::F16, [half::f16::from_f32(1.5).to_le_bytes(), half::f16::from_f32(-2.0).to_le_bytes()].concat())
            .tensor("bf16", &[2], GgmlType::BF16, [half::bf16::from_f32(0.25).to_le_bytes(), half::bf16::from_f32(3.0).to_le_bytes()].concat())
            .build();
        let g = Gguf::parse(&bytes).expect("parse");
        let get = |n: &str| {
            let t = g.tensor(n).expect("tensor").clone();
            dequantize(&t, g.tensor_bytes(&bytes, &t).expect("bytes")).expect("dequantize")
        };
        assert_eq!(get("q8"), (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect::<Vec<_>>());
        let expect40: Vec<f32> = (0..16).map(|j| (j as f32 - 8.0) * 0.5).chain((0..16).map(|j| (15 - j) as f32 * 0.5 - 4.0)).collect();
        assert_eq!(get("q40"), expect40);
        let expect41: Vec<f32> = (0..16).map(|j| j as f32 * 0.5 - 1.0).chain((0..16).map(|j| (15 - j) as f32 * 0.5 - 1.0)).collect();
        assert_eq!(get("q41"), expect41);
        assert_eq!(get("f16"), vec![1.5, -2.0]);
        assert_eq!(get("bf16"), vec![0.25, 3.0]);
    }

    /// gguf-py's numpy dequantization (an implementation independent of this one) of two
    /// random blocks per type: `tests/fixtures/kquant-<TYPE>.bin` holds the block bytes then the
    /// reference `f32` values (written by `tests/fixtures/make_kquant_fixtures.py`).
    #[test]
    fn every_quantized_type_matches_gguf_py() {
        let fixtures: [(u32, u32, usize, &[u8]); 6] = [
            (GgmlType::Q8_0, 8, 32, include_bytes!("../tests/fixtures/kquant-Q8_0.bin")),
            (GgmlType::Q4_0, 4, 32, include_bytes!("../tests/fixtures/kquant-Q4_0.bin")),
            (GgmlType::Q4_1, 4, 32, include_bytes!("../tests/fixtures/kquant-Q4_1.bin")),
            (GgmlType::Q4_K, 4, 32, include_bytes!("../tests/fixtures/kquant-Q4_K.bin")),
            (GgmlType::Q5_K, 8, 32, include_bytes!("../tests/fixtures/kquant-Q5_K.bin")),
            (GgmlType::Q6_K, 8, 16, include_bytes!("../tests/fixtures/kquant-Q6_K.bin")),
        ];
        for (id, bits, group, file) in fixtures {
            let t = GgmlType::from_id(id).expect("type");
            assert!(t.is_supported() && SUPPORTED_TYPES.contains(t.name), "{}", t.name);
            let n = 2 * t.block_size;
            let n_bytes = 2 * t.type_size;
            assert_eq!(file.len() as u64, n_bytes + 4 * n, "{} fixture size", t.name);
            let (data, reference) = file.split_at(n_bytes as usize);
            let reference: Vec<f32> = reference.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            assert!(reference.iter().all(|v| v.is_finite()) && reference.iter().any(|&v| v != 0.0), "{}", t.name);
            let info = TensorInfo { name: format!("t_{}", t.name), dims: vec![n], ggml_type: t, offset: 0, n_elements: n, n_bytes };

            let g = affine_groups(&info, data).expect("affine_groups").expect("quantized");
            assert_eq!((g.bits, g.group), (bits, group), "{}", t.name);
            assert_eq!(g.codes.len() as u64, n, "{}", t.name);
            assert_eq!(g.scales.len(), g.codes.len() / group, "{}", t.name);
            assert_eq!(g.mins.len(), g.scales.len(), "{}", t.name);
            let code_bits = match t.name {
                "Q5_K" => 5,
                "Q6_K" => 6,
                _ => bits,
            };
            assert!(g.codes.iter().all(|&c| u32::from(c) < 1 << code_bits), "{}: codes past {code_bits} bits", t.name);
            // Random bytes reach the top code bit (Q5_K's qh bit, Q6_K's two qh bits).
            assert!(g.codes.iter().any(|&c| u32::from(c) >= 1 << (code_bits - 1)), "{}", t.name);

            let rebuilt: Vec<f32> =
                g.codes.iter().enumerate().map(|(i, &c)| g.scales[i / group] * f32::from(c) + g.mins[i / group]).collect();
            let values = dequantize(&info, data).expect("dequantize");
            assert_eq!(values, rebuilt, "{}: dequantize is the affine reconstruction", t.name);
            for (i, (&ours, &theirs)) in values.iter().zip(&reference).enumerate() {
                // Exact, up to the sign of a zero (`d * (8 - 8)` is -0 for a negative d).
                assert!(ours == theirs, "{} element {i}: {ours} vs gguf-py {theirs}", t.name);
            }

            // The packed words hold the same codes, element by element, in the documented
            // layout; the scales and offsets are the same.
            match packed_groups(&info, data).expect("packed_groups") {
                Some(p) => {
                    assert_eq!((p.bits, p.group, &p.scales, &p.mins), (g.bits, g.group, &g.scales, &g.mins), "{}", t.name);
                    let per_word = (32 / p.bits) as usize;
                    let unpacked: Vec<u8> = (0..g.codes.len()).map(|i| ((p.words[i / per_word] >> ((i % per_word) as u32 * p.bits)) & ((1 << p.bits) - 1)) as u8).collect();
                    assert_eq!(unpacked, g.codes, "{}: packed codes", t.name);
                    assert!(packed_groups(&info, &data[1..]).is_err(), "{}", t.name);
                    assert_eq!(packed_len(&info), Some((p.words.len(), p.scales.len())), "{}", t.name);
                    // Appended in two slices of one block each: the same as at once.
                    let mut two = PackedGroups::default();
                    let half = TensorInfo { n_elements: n / 2, n_bytes: n_bytes / 2, ..info.clone() };
                    for part in data.chunks(data.len() / 2) {
                        assert!(append_packed_groups(&half, part, &mut two).expect("append"), "{}", t.name);
                    }
                    assert_eq!(two, p, "{}", t.name);
                }
                None => panic!("{}: a quantized type not packed", t.name),
            }

            // A byte count off by one is an error naming the tensor.
            let e = affine_groups(&info, &data[1..]).expect_err("short").to_string();
            assert!(e.contains(&info.name) && e.contains("bytes"), "{e}");
            assert!(dequantize(&info, &data[1..]).is_err());
        }
        // The float types have no groups.
        let f = TensorInfo { name: "f".into(), dims: vec![2], ggml_type: GgmlType::from_id(GgmlType::F16).expect("F16"), offset: 0, n_elements: 2, n_bytes: 4 };
        assert_eq!(affine_groups(&f, &[0; 4]).expect("F16"), None);
    }

    #[test]
    fn malformed_files_are_named_errors() {
        let good = Writer::new()
            .string("general.architecture", "llama")
            .tensor("a", &[4], GgmlType::F32, f32_bytes(&[1., 2., 3., 4.]))
            .build();
        let err = |bytes: &[u8]| Gguf::parse(bytes).expect_err("must fail").to_string();
        assert!(err(b"GGML\x03\0\0\0").contains("not a GGUF file"));
        assert!(err(b"GG").contains("truncated"));
        let mut v1 = good.clone();
        v1[4] = 1;
        assert!(err(&v1).contains("version 1"));
        // Absurd tensor count: refused before any allocation.
        let mut counts = good.clone();
        counts[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&counts).contains("tensor count"), "{}", err(&counts));
        let mut kvs = good.clone();
        kvs[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(err(&kvs).contains("metadata count"));
        // Truncated data section.
        assert!(err(&good[..good.len() - 1]).contains("past the end"));
        // Unknown tensor type and unsupported (but known) type.
        let unknown = Writer::new().tensor("x", &[4], 77, vec![0; 16]).build();
        assert!(err(&unknown).contains("unknown GGML type id 77"));
        let q2k = Writer::new().tensor("k", &[256], GgmlType::Q2_K, vec![0; 84]).build();
        let g = Gguf::parse(&q2k).expect("Q2_K parses");
        let t = g.tensor("k").expect("k").clone();
        let e = dequantize(&t, g.tensor_bytes(&q2k, &t).expect("bytes")).expect_err("Q2_K").to_string();
        assert!(e.contains("Q2_K") && e.contains("not supported"), "{e}");
        let e = affine_groups(&t, g.tensor_bytes(&q2k, &t).expect("bytes")).expect_err("Q2_K").to_string();
        assert!(e.contains("`k`") && e.contains("Q2_K") && e.contains("not supported"), "{e}");
        // Overflowing dimension product.
        let huge = Writer::new().tensor("h", &[1 << 32, 1 << 32, 1 << 32], 0, vec![]).build();
        assert!(err(&huge).contains("overflow"));
        // Offset past the end.
        let mut far = good.clone();
        // header 24 + metadata (8 + 20 + 4 + 8 + 5) + tensor entry up to its offset (8 + 1 + 4 + 8 + 4)
        let pos = 24 + 45 + 25;
        assert_eq!(far[pos..pos + 8], 0u64.to_le_bytes());
        far[pos..pos + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(err(&far).contains("past the end"));
        // Not-a-multiple-of-block dimension.
        let odd = Writer::new().tensor("o", &[33], GgmlType::Q8_0, vec![0; 68]).build();
        assert!(err(&odd).contains("block size"));
    }

    #[test]
    fn names_and_unpermute_match_transformers() {
        assert_eq!(hf::tensor_name("blk.3.attn_q.weight").as_deref(), Some("model.layers.3.self_attn.q_proj.weight"));
        assert_eq!(hf::tensor_name("blk.0.ffn_norm.weight").as_deref(), Some("model.layers.0.post_attention_layernorm.weight"));
        assert_eq!(hf::tensor_name("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf::tensor_name("rope_freqs.weight"), None);
        assert_eq!(hf::tensor_name("blk.x.attn_q.weight"), None);
        // llama.cpp permute: w.reshape(heads, 2, half, cols).swapaxes(1, 2); un-permuting undoes it.
        let (heads, half, cols) = (2, 3, 2);
        let rows = heads * 2 * half;
        let hf_rows: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut permuted = vec![0.0; rows * cols];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    let src = (h * 2 + j) * half + i;
                    let dst = (h * half + i) * 2 + j;
                    permuted[dst * cols..(dst + 1) * cols].copy_from_slice(&hf_rows[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(hf::unpermute_rows(&permuted, rows, cols, heads).expect("unpermute"), hf_rows);
        assert!(hf::unpermute_rows(&permuted, rows, cols, 5).is_err());
    }
}

#[cfg(test)]
mod prefix_tests {
    use super::tests_support::small_file;
    use super::*;

    #[test]
    fn a_short_head_asks_for_more_and_a_long_enough_one_parses() {
        let bytes = small_file();
        let full = Gguf::parse(&bytes).expect("whole file");
        // A head that ends inside the metadata or tensor table is "truncated" (read more), never
        // another error; one that holds them parses to the same file.
        let mut parsed_from = None;
        for cut in 0..full.data_offset as usize {
            match Gguf::parse_prefix(&bytes[..cut], bytes.len() as u64) {
                Ok(g) => {
                    assert_eq!(g.tensors, full.tensors, "cut {cut}");
                    parsed_from.get_or_insert(cut);
                }
                Err(e) => {
                    assert!(parsed_from.is_none(), "cut {cut} fails after a shorter head parsed");
                    assert!(e.to_string().contains("truncated"), "cut {cut}: {e}");
                }
            }
        }
        assert!(parsed_from.is_some_and(|c| c > 300), "the table ends well past the start");
        let head = Gguf::parse_prefix(&bytes[..full.data_offset as usize], bytes.len() as u64).expect("head");
        assert_eq!(head.tensors, full.tensors);
    }
}

#[cfg(test)]
mod tests_support {
    /// A file with a string array (counts checked against the head) and two tensors.
    pub fn small_file() -> Vec<u8> {
        let mut kv = Vec::new();
        let key = |kv: &mut Vec<u8>, k: &str, t: u32| {
            kv.extend((k.len() as u64).to_le_bytes());
            kv.extend(k.as_bytes());
            kv.extend(t.to_le_bytes());
        };
        key(&mut kv, "general.architecture", 8);
        kv.extend(5u64.to_le_bytes());
        kv.extend(b"llama");
        key(&mut kv, "tokenizer.ggml.tokens", 9);
        kv.extend(8u32.to_le_bytes());
        kv.extend(40u64.to_le_bytes());
        for i in 0..40 {
            let t = format!("tok{i}");
            kv.extend((t.len() as u64).to_le_bytes());
            kv.extend(t.as_bytes());
        }
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(2u64.to_le_bytes());
        out.extend(2u64.to_le_bytes());
        out.extend(&kv);
        for (i, name) in ["a", "b"].iter().enumerate() {
            out.extend((name.len() as u64).to_le_bytes());
            out.extend(name.as_bytes());
            out.extend(1u32.to_le_bytes());
            out.extend(8u64.to_le_bytes());
            out.extend(0u32.to_le_bytes());
            out.extend((i as u64 * 32).to_le_bytes());
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(vec![0u8; 64]);
        out
    }
}
