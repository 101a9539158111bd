//! What a `.pth` claims, checked against the bytes that back it before anything is
//! allocated for the claim. Candle's pickle reader allocates a string's claimed length
//! (`BINUNICODE`, a 32-bit length) and a tensor's claimed element count before reading
//! them, so a few crafted bytes could ask for gigabytes; the fuzzer found the first.
//!
//! - [`pickle_lengths`] walks the opcodes Candle knows and refuses a length that runs past
//!   the end of the pickle;
//! - [`storage_sizes`] refuses a tensor whose shape, offset and dtype need more bytes than
//!   its storage entry in the zip holds.

use std::io::Read;
use std::path::Path;

use candle_core::pickle::TensorInfo;

use crate::error::{Error, Result};

fn refused(path: &Path, msg: String) -> Error {
    Error::WeightsFormat {
        path: path.display().to_string(),
        msg,
    }
}

/// Walks `pkl` opcode by opcode (the subset Candle's reader accepts; it stops at the first
/// other one, which Candle then refuses) and checks that every length-prefixed argument
/// fits in the bytes left.
///
/// # Errors
/// A length past the end, naming the entry, the opcode's offset and the claim.
pub fn pickle_lengths(path: &Path, entry: &str, pkl: &[u8]) -> Result<()> {
    let mut i = 0usize;
    let short = |at: usize, need: u64| {
        refused(
            path,
            format!(
                "{entry}: the pickle's opcode at byte {at} claims {need} bytes, but only {} remain (truncated or corrupt)",
                pkl.len().saturating_sub(at + 1)
            ),
        )
    };
    let u32_at = |j: usize| -> Option<u32> {
        pkl.get(j..j + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    while i < pkl.len() {
        let at = i;
        let op = pkl[i];
        i += 1;
        let skip: u64 = match op {
            b'.' => return Ok(()),
            0x80 | b'q' | b'K' | b'h' => 1,
            b'M' => 2,
            b'r' | b'J' | b'j' => 4,
            b'G' => 8,
            b'X' => {
                let len = u32_at(i).ok_or_else(|| short(at, 4))?;
                4 + u64::from(len)
            }
            0x8a => 1 + u64::from(*pkl.get(i).ok_or_else(|| short(at, 1))?),
            b'c' => {
                // Module and name, each ended by a newline.
                let mut lines = 0;
                while lines < 2 {
                    let b = *pkl.get(i).ok_or_else(|| short(at, 1))?;
                    i += 1;
                    if b == b'\n' {
                        lines += 1;
                    }
                }
                0
            }
            b')'
            | b'R'
            | b'('
            | b't'
            | b'Q'
            | b'N'
            | 0x85..=0x89
            | b's'
            | b'u'
            | b'}'
            | b'd'
            | b'b'
            | b']'
            | b'a'
            | b'e'
            | 0x81 => 0,
            _ => return Ok(()),
        };
        let left = (pkl.len() - i) as u64;
        if skip > left {
            return Err(short(at, skip));
        }
        i += skip as usize;
    }
    Ok(())
}

/// Reads a zip entry whole, bounded by what it can really hold: never more than the file
/// itself for a stored entry (`torch.save` stores), 1032x it (deflate's largest ratio)
/// for a compressed one.
///
/// # Errors
/// An unreadable entry.
pub fn read_entry(
    path: &Path,
    name: &str,
    entry: &mut zip::read::ZipFile<'_, impl Read>,
    file_len: u64,
) -> Result<Vec<u8>> {
    let cap = entry_capacity(entry, file_len);
    let mut out = Vec::new();
    entry
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| refused(path, format!("{name}: {e}")))?;
    Ok(out)
}

fn entry_capacity(entry: &zip::read::ZipFile<'_, impl Read>, file_len: u64) -> u64 {
    let most = if entry.compression() == zip::CompressionMethod::Stored {
        file_len
    } else {
        file_len.saturating_mul(1032)
    };
    entry.size().min(most)
}

/// Checks that every tensor's data (offset + elements, times the dtype's size) lies
/// within its storage entry in the zip.
///
/// # Errors
/// A tensor that needs more bytes than its storage holds, or a missing storage entry,
/// naming the tensor.
pub fn storage_sizes(path: &Path, infos: &[TensorInfo]) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| refused(path, format!("not a PyTorch zip archive: {e}")))?;
    for t in infos {
        let entry = zip
            .by_name(&t.path)
            .map_err(|e| refused(path, format!("tensor {}: storage {}: {e}", t.name, t.path)))?;
        let holds = entry_capacity(&entry, file_len);
        let need = (t.layout.start_offset() as u64)
            .checked_add(t.layout.shape().elem_count() as u64)
            .and_then(|n| n.checked_mul(t.dtype.size_in_bytes() as u64));
        if need.is_none_or(|n| n > holds) {
            return Err(refused(
                path,
                format!(
                    "tensor {} claims shape {:?} ({:?}) at offset {}, more than its storage {} holds ({holds} bytes)",
                    t.name,
                    t.layout.dims(),
                    t.dtype,
                    t.layout.start_offset(),
                    t.path
                ),
            ));
        }
    }
    Ok(())
}
