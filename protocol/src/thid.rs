//! THIDs: the 160-bit identifiers of cells, transmitters and messages.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha1::{Digest, Sha1};

/// Length of a THID in bytes (160 bits).
pub const THID_LEN: usize = 20;

/// A 160-bit identifier, written on the wire as 40 lowercase hex characters.
///
/// Cells and transmitters draw theirs at random ([`Thid::random`]); a
/// message's THID is the SHA-1 of its contents ([`Thid::for_event`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Thid([u8; THID_LEN]);

/// All 20 bytes, as three fixed-size words: no length prefix and no
/// byte-slice loop (THIDs key the maps of every hot path).
impl std::hash::Hash for Thid {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let [a, b, c] = [&self.0[..8], &self.0[8..16], &self.0[16..]];
        state.write_u64(u64::from_le_bytes(a.try_into().expect("8 bytes")));
        state.write_u64(u64::from_le_bytes(b.try_into().expect("8 bytes")));
        state.write_u32(u32::from_le_bytes(c.try_into().expect("4 bytes")));
    }
}

/// The THIDs of one publisher's events ([`Thid::for_event`]), with the
/// publisher's part of the hash taken once rather than per event.
#[derive(Clone)]
pub struct EventHasher(Sha1);

impl EventHasher {
    /// The hasher of `from`'s events.
    pub fn new(from: &Thid) -> Self {
        let mut hasher = Sha1::new();
        hasher.update(from.hex());
        hasher.update(b"\n");
        EventHasher(hasher)
    }

    /// The THID of the event `seq` on `channel` carrying `payload`.
    pub fn thid(&self, seq: u64, channel: &str, payload: &[u8]) -> Thid {
        let mut hasher = self.0.clone();
        let mut digits = [0u8; 20];
        hasher.update(decimal(seq, &mut digits));
        hasher.update(b"\n");
        hasher.update(channel.as_bytes());
        hasher.update(b"\n");
        hasher.update(payload);
        Thid(hasher.finalize().into())
    }
}

impl fmt::Debug for EventHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventHasher").finish_non_exhaustive()
    }
}

/// Why a string is not a THID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ThidError {
    /// The string does not have exactly 40 characters.
    #[error("a THID has 40 hex characters, got {0}")]
    Length(usize),
    /// The string has a character that is not a hex digit.
    #[error("a THID is hex, got a non-hex character")]
    NotHex,
}

impl Thid {
    /// Wraps 20 raw bytes.
    pub const fn from_bytes(bytes: [u8; THID_LEN]) -> Self {
        Thid(bytes)
    }

    /// The 20 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; THID_LEN] {
        &self.0
    }

    /// Draws a THID at random (for a cell or a transmitter).
    pub fn random() -> Self {
        Thid(rand::random())
    }

    /// The THID of an event: SHA-1 over its publisher, its sequence number
    /// among that publisher's events, its channel and its payload bytes,
    /// joined by newlines (see PROTOCOL.md, "Message THIDs").
    ///
    /// Two distinct events with equal payloads differ in `seq`; a retry of
    /// the same event keeps its THID, which is what de-duplication keys on.
    pub fn for_event(from: &Thid, seq: u64, channel: &str, payload: &[u8]) -> Self {
        EventHasher::new(from).thid(seq, channel, payload)
    }

    /// The 40-character lowercase hex form.
    pub fn to_hex(&self) -> String {
        let hex = self.hex();
        // `hex` holds only ASCII hex digits.
        String::from_utf8(hex.to_vec()).expect("hex digits are ASCII")
    }

    /// The 40 lowercase hex digits as bytes, without allocating.
    pub fn hex(&self) -> [u8; THID_LEN * 2] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; THID_LEN * 2];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[usize::from(b >> 4)];
            out[2 * i + 1] = DIGITS[usize::from(b & 0x0f)];
        }
        out
    }

    /// Parses the hex form from bytes (as found inside a frame).
    ///
    /// # Errors
    /// [`ThidError`] when the input is not 40 hex characters.
    pub fn parse_hex(s: &[u8]) -> Result<Self, ThidError> {
        if s.len() != THID_LEN * 2 {
            return Err(ThidError::Length(s.len()));
        }
        let mut out = [0u8; THID_LEN];
        for (byte, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
            let (hi, lo) = (
                HEX_VALUE[usize::from(pair[0])],
                HEX_VALUE[usize::from(pair[1])],
            );
            if (hi | lo) > 0x0f {
                return Err(ThidError::NotHex);
            }
            *byte = (hi << 4) | lo;
        }
        Ok(Thid(out))
    }
}

/// The value of each byte as a hex digit (either case), or 0xff.
static HEX_VALUE: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut c = 0;
    while c < 256 {
        table[c] = match c as u8 {
            d @ b'0'..=b'9' => d - b'0',
            d @ b'a'..=b'f' => d - b'a' + 10,
            d @ b'A'..=b'F' => d - b'A' + 10,
            _ => 0xff,
        };
        c += 1;
    }
    table
};

/// The decimal digits of `n`, written into the end of `buf` (20 bytes
/// hold any `u64`), without the `String` of `to_string`: event THIDs hash
/// their sequence number this way, and clients write numbers into frames.
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

impl FromStr for Thid {
    type Err = ThidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Thid::parse_hex(s.as_bytes())
    }
}

impl fmt::Display for Thid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.hex();
        f.write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Thid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Thid({self})")
    }
}

impl Serialize for Thid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let hex = self.hex();
        s.serialize_str(std::str::from_utf8(&hex).map_err(serde::ser::Error::custom)?)
    }
}

impl<'de> Deserialize<'de> for Thid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s: std::borrow::Cow<'de, str> = Deserialize::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_of_a_thid_feeds_its_hash() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let hash = |t: &Thid| BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(t);
        let base = Thid::from_bytes([7; THID_LEN]);
        assert_eq!(hash(&base), hash(&Thid::from_bytes([7; THID_LEN])));
        for i in 0..THID_LEN {
            let mut bytes = [7; THID_LEN];
            bytes[i] = 8;
            assert_ne!(hash(&base), hash(&Thid::from_bytes(bytes)), "byte {i}");
        }
    }

    #[test]
    fn hex_round_trips_and_is_lowercase() {
        let t = Thid::from_bytes([0xAB; 20]);
        assert_eq!(t.to_hex(), "ab".repeat(20));
        assert_eq!(t.to_hex().parse::<Thid>().unwrap(), t);
        assert_eq!("AB".repeat(20).parse::<Thid>().unwrap(), t);
    }

    #[test]
    fn sequence_numbers_are_hashed_in_decimal() {
        let mut buf = [0u8; 20];
        for n in [0, 7, 10, 12345, u64::MAX] {
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }

    #[test]
    fn bad_hex_is_rejected() {
        assert_eq!("ab".parse::<Thid>(), Err(ThidError::Length(2)));
        assert_eq!("zz".repeat(20).parse::<Thid>(), Err(ThidError::NotHex));
    }

    /// The test vectors of PROTOCOL.md, "Message THIDs".
    #[test]
    fn event_thids_match_the_protocol_test_vectors() {
        let from: Thid = "0000000000000000000000000000000000000001".parse().unwrap();
        assert_eq!(
            Thid::for_event(&from, 1, "billing::invoice::paid", br#"{"amount":42}"#).to_hex(),
            "148a4ee4688b0986a14a263c835b18af1f96cf81"
        );
        assert_eq!(
            Thid::for_event(&from, 2, "billing::invoice::paid", br#"{"amount":42}"#).to_hex(),
            "6c71b12a14904ce01eb84382f632d85f97b23bf2"
        );
        assert_eq!(
            Thid::for_event(&from, 0, "a", b"").to_hex(),
            "bca398c84913300f5048feac7d0f4f5b9440e848"
        );
    }

    #[test]
    fn equal_payloads_with_other_sequence_numbers_get_other_thids() {
        let from = Thid::random();
        assert_ne!(
            Thid::for_event(&from, 1, "c", b"x"),
            Thid::for_event(&from, 2, "c", b"x")
        );
        assert_eq!(
            Thid::for_event(&from, 7, "c", b"x"),
            Thid::for_event(&from, 7, "c", b"x")
        );
    }
}
