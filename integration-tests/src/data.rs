//! Deterministic test data and streaming hashes, so gigabytes can be checked byte for byte
//! without holding them.

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Size of the blocks a [`Pattern`] yields.
pub const BLOCK: usize = 64 * 1024;

/// A stream of `len` pseudo-random bytes in [`BLOCK`]-sized pieces. Every block differs (it is
/// seeded by its index), so lost, duplicated or reordered blocks change the hash.
#[derive(Debug)]
pub struct Pattern {
    remaining: u64,
    block: u64,
}

impl Pattern {
    /// `len` bytes in all.
    pub fn new(len: u64) -> Self {
        Self {
            remaining: len,
            block: 0,
        }
    }

    /// The next block (the last may be short), or `None` at the end.
    pub fn next_block(&mut self) -> Option<Bytes> {
        if self.remaining == 0 {
            return None;
        }
        let n = (self.remaining as usize).min(BLOCK);
        let mut state = self.block.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut out = Vec::with_capacity(BLOCK);
        while out.len() < n {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.truncate(n);
        self.remaining -= n as u64;
        self.block += 1;
        Some(Bytes::from(out))
    }

    /// SHA-256 of the whole pattern of `len` bytes.
    pub fn digest(len: u64) -> [u8; 32] {
        let mut p = Self::new(len);
        let mut h = Sha256::new();
        while let Some(b) = p.next_block() {
            h.update(&b);
        }
        h.finalize().into()
    }
}
