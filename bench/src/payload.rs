//! Payloads that carry their sequence number in their first 8 bytes, so a
//! receiver can tell lost and duplicated events apart.

/// Smallest payload: room for the sequence number.
pub const MIN_PAYLOAD: usize = 8;

/// A payload of `size` bytes (at least [`MIN_PAYLOAD`]) whose first 8 bytes
/// are `seq` little-endian and the rest a fixed filler.
pub fn make(size: usize, seq: u64) -> Vec<u8> {
    let mut p = template(size);
    stamp(&mut p, seq);
    p
}

/// A payload buffer to [`stamp`] again and again without allocating.
pub fn template(size: usize) -> Vec<u8> {
    let size = size.max(MIN_PAYLOAD);
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Writes `seq` into the first 8 bytes of `p`.
pub fn stamp(p: &mut [u8], seq: u64) {
    p[..MIN_PAYLOAD].copy_from_slice(&seq.to_le_bytes());
}

/// The sequence number a payload carries, if it is long enough.
pub fn seq_of(p: &[u8]) -> Option<u64> {
    p.first_chunk::<MIN_PAYLOAD>()
        .map(|b| u64::from_le_bytes(*b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_gives_back_its_sequence_number() {
        let p = make(128, 123_456);
        assert_eq!(p.len(), 128);
        assert_eq!(seq_of(&p), Some(123_456));
        assert_eq!(make(2, 7).len(), MIN_PAYLOAD);
    }
}
