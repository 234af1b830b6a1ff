//! The safetensors header (<https://huggingface.co/docs/safetensors>): an 8-byte little-endian
//! length, then that many bytes of JSON naming each tensor's dtype, shape and byte range in
//! the data that follows. Parsing is the `safetensors` crate's (it refuses headers over
//! 100 MB and offsets that do not tile the data exactly); on top of it every shape's element
//! count must fit in `usize` without overflow, so callers can size buffers safely.

use crate::FormatError;
use safetensors::SafeTensors;
pub use safetensors::tensor::{Metadata, TensorInfo};

/// A validated header: where the data start and what each tensor is.
#[derive(Debug)]
pub struct Header {
    /// Absolute offset of the data section (8 + the JSON length).
    pub data_start: usize,
    pub metadata: Metadata,
}

/// Parses and validates the header of `bytes` (the whole file).
pub fn parse(bytes: &[u8]) -> Result<Header, FormatError> {
    if bytes.len() < 8 {
        return Err(FormatError(format!("file of {} bytes is too short for a safetensors header", bytes.len())));
    }
    let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| FormatError(e.to_string()))?;
    for (name, info) in metadata.tensors() {
        let elements = info.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let bytes_needed = elements.and_then(|n| n.checked_mul(info.dtype.bitsize()).map(|b| b.div_ceil(8)));
        let (start, end) = info.data_offsets;
        match bytes_needed {
            Some(b) if end >= start && end - start == b => {}
            _ => {
                return Err(FormatError(format!(
                    "tensor `{name}`: shape {:?} of {:?} does not match its byte range {start}..{end}",
                    info.shape, info.dtype
                )));
            }
        }
    }
    let data_start = 8usize
        .checked_add(header_len)
        .ok_or_else(|| FormatError::new("header length overflows"))?;
    Ok(Header { data_start, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data: usize) -> Vec<u8> {
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.resize(out.len() + data, 0);
        out
    }

    #[test]
    fn valid_and_malformed_headers() {
        let ok = file(r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#, 16);
        let h = parse(&ok).expect("valid");
        assert_eq!(h.data_start, ok.len() - 16);
        assert!(parse(&ok[..ok.len() - 1]).is_err(), "truncated data");
        assert!(parse(b"short").is_err());
        let mut absurd = u64::MAX.to_le_bytes().to_vec();
        absurd.extend_from_slice(b"{}");
        assert!(parse(&absurd).is_err());
        let overflow = file(r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#, 16);
        assert!(parse(&overflow).is_err());
        assert!(parse(&file("not json", 0)).is_err());
    }
}
