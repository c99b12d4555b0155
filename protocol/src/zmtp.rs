//! ZMTP 3 framing (RFC 23 and RFC 37): the greeting, frame headers,
//! commands and their metadata, and the PLAIN mechanism's HELLO (RFC 24).
//! Bytes in, bytes out: the transmitter's command socket speaks ZMTP with
//! these, so libzmq, pyzmq and the pure-Rust `zeromq` crate connect to it
//! unchanged.

/// Length of a ZMTP 3 greeting.
pub const GREETING_LEN: usize = 64;
/// Flag bit: more frames of this message follow.
const MORE: u8 = 0x01;
/// Flag bit: an 8-byte size follows instead of a 1-byte one.
const LONG: u8 = 0x02;
/// Flag bit: a command frame, not a message frame.
const COMMAND: u8 = 0x04;

/// A ZMTP security mechanism this crate speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// No authentication.
    Null,
    /// Username and password in clear (RFC 24).
    Plain,
}

impl Mechanism {
    /// The mechanism's name as written in a greeting.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Null => "NULL",
            Mechanism::Plain => "PLAIN",
        }
    }
}

/// Why bytes from a peer are not ZMTP we accept. Each one ends the
/// connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZmtpError {
    /// The first ten bytes are not a ZMTP signature.
    #[error("not a ZMTP signature")]
    Signature,
    /// A major version below 3 (ZMTP 1 and 2 are not spoken).
    #[error("ZMTP version {0} is not supported (3 or later)")]
    Version(u8),
    /// The peer's mechanism is not the one this socket requires.
    #[error("mechanism {0:?} where {1:?} is required")]
    Mechanism(String, &'static str),
    /// Reserved flag bits set, or a command frame with MORE.
    #[error("bad frame flags {0:#04x}")]
    Flags(u8),
    /// A frame longer than the limit.
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Length the header announced.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// A command body that does not parse.
    #[error("malformed {0} command")]
    Command(&'static str),
    /// A command or a message frame where the handshake expects another.
    #[error("unexpected {0} during the handshake")]
    Unexpected(String),
}

/// The host and port of a `tcp://host:port` endpoint, as written (an IPv6
/// host without its brackets); `None` for any other shape.
pub fn tcp_host_port(endpoint: &str) -> Option<(&str, &str)> {
    let (host, port) = endpoint.strip_prefix("tcp://")?.rsplit_once(':')?;
    Some((host.trim_start_matches('[').trim_end_matches(']'), port))
}

/// Writes the 64-byte greeting of ZMTP 3.1 with `mechanism`.
pub fn greeting(mechanism: Mechanism, as_server: bool) -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0] = 0xFF;
    g[8] = 1;
    g[9] = 0x7F;
    g[10] = 3;
    g[11] = 1;
    let name = mechanism.name().as_bytes();
    g[12..12 + name.len()].copy_from_slice(name);
    g[32] = u8::from(as_server);
    g
}

/// What a peer's greeting says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// Major version (3 or later).
    pub major: u8,
    /// Minor version.
    pub minor: u8,
    /// The mechanism name, without its zero padding.
    pub mechanism: Vec<u8>,
    /// Whether the peer acts as the mechanism's server.
    pub as_server: bool,
}

/// Checks the start of a greeting (the signature, then the major version)
/// as soon as its bytes arrive: a peer speaking something else, or ZMTP 1
/// or 2 (whose peers wait for an answer after byte 11), is cut off at once.
///
/// # Errors
/// [`ZmtpError::Signature`] when they are not a ZMTP signature,
/// [`ZmtpError::Version`] for a major version below 3.
pub fn check_greeting_head(head: &[u8]) -> Result<(), ZmtpError> {
    let ok = !matches!(head.first(), Some(b) if *b != 0xFF)
        && !matches!(head.get(9), Some(b) if *b != 0x7F);
    if !ok {
        return Err(ZmtpError::Signature);
    }
    match head.get(10) {
        Some(&major) if major < 3 => Err(ZmtpError::Version(major)),
        _ => Ok(()),
    }
}

/// Reads a whole greeting.
///
/// # Errors
/// A bad signature or a version below 3.
pub fn parse_greeting(g: &[u8; GREETING_LEN]) -> Result<Greeting, ZmtpError> {
    check_greeting_head(g)?;
    let mech = &g[12..32];
    let end = mech.iter().position(|b| *b == 0).unwrap_or(mech.len());
    Ok(Greeting {
        major: g[10],
        minor: g[11],
        mechanism: mech[..end].to_vec(),
        as_server: g[32] == 1,
    })
}

/// A frame header: what the frame is and how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// More frames of this message follow.
    pub more: bool,
    /// A command frame.
    pub command: bool,
    /// Length of the frame's body.
    pub len: usize,
    /// Length of the header itself (2 or 9 bytes).
    pub size: usize,
}

/// Reads the frame header at the start of `buf`, refusing frames longer
/// than `max` before any of their body is read.
///
/// # Errors
/// Reserved flags, a command with MORE, or a frame over `max`.
pub fn decode_header(buf: &[u8], max: usize) -> Result<Option<Header>, ZmtpError> {
    let Some(&flags) = buf.first() else {
        return Ok(None);
    };
    if flags & !(MORE | LONG | COMMAND) != 0 || flags & (MORE | COMMAND) == (MORE | COMMAND) {
        return Err(ZmtpError::Flags(flags));
    }
    let (len, size) = if flags & LONG != 0 {
        let Some(bytes) = buf.get(1..9) else {
            return Ok(None);
        };
        let mut be = [0u8; 8];
        be.copy_from_slice(bytes);
        (u64::from_be_bytes(be), 9)
    } else {
        let Some(&len) = buf.get(1) else {
            return Ok(None);
        };
        (u64::from(len), 2)
    };
    if len > max as u64 {
        return Err(ZmtpError::TooLarge { len, max });
    }
    Ok(Some(Header {
        more: flags & MORE != 0,
        command: flags & COMMAND != 0,
        len: len as usize,
        size,
    }))
}

/// Appends the header of a frame of `len` bytes.
pub fn encode_header(out: &mut Vec<u8>, len: usize, more: bool, command: bool) {
    let mut flags = if more { MORE } else { 0 };
    if command {
        flags |= COMMAND;
    }
    if len < 256 {
        out.extend_from_slice(&[flags, len as u8]);
    } else {
        out.push(flags | LONG);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Appends one message frame.
pub fn encode_frame(out: &mut Vec<u8>, body: &[u8], more: bool) {
    encode_header(out, body.len(), more, false);
    out.extend_from_slice(body);
}

/// Appends a command frame `name` whose data is `data`.
pub fn encode_command(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    encode_header(out, 1 + name.len() + data.len(), false, true);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(data);
}

/// Splits a command frame's body into its name and data.
///
/// # Errors
/// When the name length runs past the body.
pub fn parse_command(body: &[u8]) -> Result<(&[u8], &[u8]), ZmtpError> {
    let (&n, rest) = body.split_first().ok_or(ZmtpError::Command("empty"))?;
    let n = usize::from(n);
    if rest.len() < n {
        return Err(ZmtpError::Command("truncated"));
    }
    Ok(rest.split_at(n))
}

/// Writes metadata properties (READY, INITIATE): name-length octet, name,
/// 4-byte value length, value.
pub fn encode_properties(properties: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in properties {
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    out
}

/// One metadata property: its name and its value.
pub type Property<'a> = (&'a [u8], &'a [u8]);

/// Reads metadata properties.
///
/// # Errors
/// When a length runs past the data.
pub fn parse_properties(mut data: &[u8]) -> Result<Vec<Property<'_>>, ZmtpError> {
    let bad = ZmtpError::Command("metadata");
    let mut props = Vec::new();
    while let Some((&n, rest)) = data.split_first() {
        let n = usize::from(n);
        if n == 0 || rest.len() < n + 4 {
            return Err(bad);
        }
        let (name, rest) = rest.split_at(n);
        let (len, rest) = rest.split_at(4);
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if rest.len() < len {
            return Err(bad);
        }
        let (value, rest) = rest.split_at(len);
        props.push((name, value));
        data = rest;
    }
    Ok(props)
}

/// The value of property `name` (names compare without case).
pub fn property<'a>(props: &[Property<'a>], name: &str) -> Option<&'a [u8]> {
    props
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| *v)
}

/// Reads the data of a PLAIN HELLO: username and password, each behind a
/// length octet.
///
/// # Errors
/// When a length runs past the data or bytes are left over.
pub fn parse_plain_hello(data: &[u8]) -> Result<(&[u8], &[u8]), ZmtpError> {
    let bad = ZmtpError::Command("HELLO");
    let (&u, rest) = data.split_first().ok_or(bad.clone())?;
    let (user, rest) = rest.split_at_checked(usize::from(u)).ok_or(bad.clone())?;
    let (&p, rest) = rest.split_first().ok_or(bad.clone())?;
    if rest.len() != usize::from(p) {
        return Err(bad);
    }
    Ok((user, rest))
}

/// Writes the data of a PLAIN HELLO.
pub fn encode_plain_hello(user: &[u8], password: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + user.len() + password.len());
    out.push(user.len() as u8);
    out.extend_from_slice(user);
    out.push(password.len() as u8);
    out.extend_from_slice(password);
    out
}

/// The context of a ZMTP PING (after its 2-byte TTL), which the PONG
/// echoes.
pub fn ping_context(data: &[u8]) -> &[u8] {
    let context = data.get(2..).unwrap_or_default();
    &context[..context.len().min(16)]
}

/// Moves the bytes a reader has not handled yet, `buf[pos..filled]`, to
/// the front of its buffer, before the next read appends; returns how
/// many there are (the new `filled`; `pos` is then 0).
pub fn compact(buf: &mut [u8], pos: usize, filled: usize) -> usize {
    if pos > 0 && pos < filled {
        buf.copy_within(pos..filled, 0);
    }
    filled - pos
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacting_moves_what_is_left_to_the_front() {
        let mut buf = *b"abcdefgh";
        assert_eq!(compact(&mut buf, 3, 6), 3);
        assert_eq!(&buf[..3], b"def");
        assert_eq!(compact(&mut buf, 0, 3), 3, "nothing handled yet");
        assert_eq!(&buf[..3], b"def");
        assert_eq!(compact(&mut buf, 3, 3), 0, "all handled");
    }

    #[test]
    fn tcp_endpoints_split_into_host_and_port() {
        assert_eq!(
            tcp_host_port("tcp://127.0.0.1:5454"),
            Some(("127.0.0.1", "5454"))
        );
        assert_eq!(tcp_host_port("tcp://[::1]:0"), Some(("::1", "0")));
        assert_eq!(tcp_host_port("tcp://*:*"), Some(("*", "*")));
        assert_eq!(tcp_host_port("ipc:///tmp/x"), None);
        assert_eq!(tcp_host_port("tcp://127.0.0.1"), None);
    }

    #[test]
    fn a_greeting_is_64_bytes_that_read_back() {
        let g = greeting(Mechanism::Plain, true);
        assert_eq!(&g[..12], b"\xFF\0\0\0\0\0\0\0\x01\x7F\x03\x01");
        assert_eq!(&g[12..18], b"PLAIN\0");
        let read = parse_greeting(&g).unwrap();
        assert_eq!((read.major, read.minor), (3, 1));
        assert_eq!(read.mechanism, b"PLAIN");
        assert!(read.as_server);
        let mut old = g;
        old[10] = 2;
        assert_eq!(parse_greeting(&old), Err(ZmtpError::Version(2)));
        assert_eq!(
            check_greeting_head(b"GET / HTTP"),
            Err(ZmtpError::Signature)
        );
        assert_eq!(check_greeting_head(b"\xFF\0\0"), Ok(()));
        assert_eq!(check_greeting_head(&g[..10]), Ok(()));
        assert_eq!(check_greeting_head(&old[..11]), Err(ZmtpError::Version(2)));
    }

    #[test]
    fn headers_short_and_long_round_trip_and_oversize_is_refused_early() {
        for (len, more, command) in [(0, false, false), (255, true, false), (256, false, true)] {
            let mut out = Vec::new();
            encode_header(&mut out, len, more, command);
            let h = decode_header(&out, 1 << 20).unwrap().unwrap();
            assert_eq!(
                (h.len, h.more, h.command, h.size),
                (len, more, command, out.len())
            );
            assert_eq!(decode_header(&out[..out.len() - 1], 1 << 20), Ok(None));
        }
        let mut tera = vec![LONG];
        tera.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(matches!(
            decode_header(&tera, 1024),
            Err(ZmtpError::TooLarge { .. })
        ));
        assert_eq!(decode_header(&[0x80, 0], 9), Err(ZmtpError::Flags(0x80)));
        assert_eq!(decode_header(&[0x05, 0], 9), Err(ZmtpError::Flags(0x05)));
    }

    #[test]
    fn commands_properties_and_plain_hello_read_back() {
        let props = encode_properties(&[("Socket-Type", b"DEALER"), ("Identity", b"")]);
        let mut frame = Vec::new();
        encode_command(&mut frame, "READY", &props);
        let h = decode_header(&frame, 1024).unwrap().unwrap();
        assert!(h.command);
        let (name, data) = parse_command(&frame[h.size..]).unwrap();
        assert_eq!(name, b"READY");
        let read = parse_properties(data).unwrap();
        assert_eq!(property(&read, "socket-type"), Some(&b"DEALER"[..]));
        assert_eq!(property(&read, "Identity"), Some(&b""[..]));
        assert!(parse_properties(&data[..data.len() - 1]).is_err());
        let hello = encode_plain_hello(b"mesh", b"secret");
        assert_eq!(
            parse_plain_hello(&hello),
            Ok((&b"mesh"[..], &b"secret"[..]))
        );
        assert!(parse_plain_hello(&hello[..hello.len() - 1]).is_err());
        assert!(parse_command(&[9, b'P']).is_err());
        assert_eq!(ping_context(b"\0\x0aabc"), b"abc");
    }
}
