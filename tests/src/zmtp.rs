//! ZMTP 3 written by hand, byte by byte, for tests that talk to the
//! command socket below ZeroMQ: written apart from the transmitter's own
//! codec (`thynapse_protocol::zmtp`), so that a mistake there is not
//! repeated here.

/// Frame flag: more frames of the message follow.
pub const MORE: u8 = 0x01;
/// Frame flag: an 8-byte length follows.
pub const LONG: u8 = 0x02;
/// Frame flag: a command frame.
pub const COMMAND: u8 = 0x04;

/// A 64-byte ZMTP greeting of major version `major` (minor 1) with
/// `mechanism`, as a client.
pub fn greeting(major: u8, mechanism: &[u8]) -> Vec<u8> {
    let mut g = vec![0xFF, 0, 0, 0, 0, 0, 0, 0, 1, 0x7F, major, 1];
    let mut mech = [0u8; 20];
    mech[..mechanism.len()].copy_from_slice(mechanism);
    g.extend_from_slice(&mech);
    g.push(0); // as-server
    g.extend_from_slice(&[0u8; 31]);
    assert_eq!(g.len(), 64);
    g
}

/// Appends a frame header: `flags` (LONG added when needed) and `len`.
pub fn header(out: &mut Vec<u8>, flags: u8, len: usize) {
    if len < 256 {
        out.push(flags);
        out.push(u8::try_from(len).expect("short"));
    } else {
        out.push(flags | LONG);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// A command frame `name` with `data`.
pub fn command(name: &str, data: &[u8]) -> Vec<u8> {
    let mut body = vec![u8::try_from(name.len()).expect("short name")];
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(data);
    let mut out = Vec::new();
    header(&mut out, COMMAND, body.len());
    out.extend_from_slice(&body);
    out
}

/// Metadata properties: name-length octet, name, 4-byte length, value.
pub fn properties(props: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in props {
        out.push(u8::try_from(name.len()).expect("short name"));
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&u32::try_from(value.len()).expect("short").to_be_bytes());
        out.extend_from_slice(value);
    }
    out
}

/// A READY command saying we are a `socket_type`.
pub fn ready(socket_type: &str) -> Vec<u8> {
    command(
        "READY",
        &properties(&[("Socket-Type", socket_type.as_bytes())]),
    )
}
