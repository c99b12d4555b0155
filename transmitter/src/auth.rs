//! The ZAP handler: authenticates every connection at the handshake.
//!
//! libzmq asks `inproc://zeromq.zap.01` about each new connection to a
//! socket that is a PLAIN server. This handler runs on its own thread with a
//! ROUTER socket, accepts PLAIN credentials whose password equals the
//! token (compared in constant time), and delays its answer to addresses
//! that keep failing, without holding up anyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The PLAIN username, and ZAP user id, of transmitters in a mesh.
pub const MESH_USER: &str = "mesh";
/// The ZAP user id of cells that presented the token.
pub const CELL_USER: &str = "cell";

/// The endpoint libzmq sends ZAP requests to.
pub const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";
/// Failures from one address before its answers are delayed.
pub const FREE_FAILURES: u32 = 3;
/// First delay once an address is slowed down; doubles per failure.
pub const FIRST_DELAY: Duration = Duration::from_millis(100);
/// Longest delay before a denial is sent.
pub const MAX_DELAY: Duration = Duration::from_secs(5);
/// How often the handler looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// Failures are forgotten after this long without another one.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(60);

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

/// How long to hold back the denial of an address that failed `failures`
/// times in a row.
pub fn denial_delay(failures: u32) -> Duration {
    if failures <= FREE_FAILURES {
        return Duration::ZERO;
    }
    let exp = (failures - FREE_FAILURES - 1).min(16);
    (FIRST_DELAY * 2u32.pow(exp)).min(MAX_DELAY)
}

/// Starts the ZAP handler thread on `ctx`; it stops when `stop` rises.
///
/// # Errors
/// When the inproc endpoint cannot be bound (another handler exists).
pub fn start(
    ctx: &zmq::Context,
    token: String,
    mesh_secret: Option<String>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, zmq::Error> {
    let socket = ctx.socket(zmq::ROUTER)?;
    socket.set_linger(0)?;
    socket.bind(ZAP_ENDPOINT)?;
    Ok(std::thread::Builder::new()
        .name("thynapse-zap".into())
        .spawn(move || serve(socket, token, mesh_secret, stop))
        .expect("spawning a thread at startup"))
}

struct Failures {
    count: u32,
    last: Instant,
}

/// Judges PLAIN credentials and remembers, per source address, how often
/// they failed: the ZAP handler (event socket) and the command socket
/// each keep one.
pub struct Gate {
    token: String,
    mesh_secret: Option<String>,
    failures: HashMap<String, Failures>,
}

impl Gate {
    /// A gate for `token` and, for transmitters, `mesh_secret`.
    pub fn new(token: String, mesh_secret: Option<String>) -> Gate {
        Gate {
            token,
            mesh_secret,
            failures: HashMap::new(),
        }
    }

    /// Who the PLAIN `credentials` (username, password) from `address`
    /// are; none (another mechanism) is nobody. `Err` holds how long to
    /// hold back the denial.
    pub fn judge(
        &mut self,
        address: &str,
        credentials: Option<(&[u8], &[u8])>,
        now: Instant,
    ) -> Result<&'static str, Duration> {
        let user = credentials.and_then(|(username, password)| {
            identify(username, password, &self.token, self.mesh_secret.as_deref())
        });
        self.failures
            .retain(|_, f| now.duration_since(f.last) < FAILURE_MEMORY);
        if let Some(user) = user {
            self.failures.remove(address);
            return Ok(user);
        }
        let f = self.failures.entry(address.to_owned()).or_insert(Failures {
            count: 0,
            last: now,
        });
        f.count += 1;
        f.last = now;
        tracing::warn!(%address, failures = f.count, "authentication failed");
        Err(denial_delay(f.count))
    }
}

/// Who a PLAIN username and password are: a transmitter of the mesh
/// (username `mesh` and the mesh secret, or the token when no secret is
/// set), a cell (the token), or nobody.
pub fn identify(
    username: &[u8],
    password: &[u8],
    token: &str,
    mesh_secret: Option<&str>,
) -> Option<&'static str> {
    let token_ok = constant_time_eq(password, token.as_bytes());
    if username == MESH_USER.as_bytes() {
        let secret_ok = mesh_secret.map_or(token_ok, |s| constant_time_eq(password, s.as_bytes()));
        return secret_ok.then_some(MESH_USER);
    }
    token_ok.then_some(CELL_USER)
}

fn serve(socket: zmq::Socket, token: String, mesh_secret: Option<String>, stop: Arc<AtomicBool>) {
    let mut gate = Gate::new(token, mesh_secret);
    let mut delayed: Vec<(Instant, Vec<Vec<u8>>)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let timeout = delayed
            .iter()
            .map(|(due, _)| due.saturating_duration_since(now))
            .chain([STOP_CHECK])
            .min()
            .unwrap_or(STOP_CHECK)
            .as_millis() as i64;
        match socket.poll(zmq::POLLIN, timeout) {
            Ok(_) => {}
            Err(_) => return,
        }
        let now = Instant::now();
        delayed.retain(|(due, reply)| {
            if *due <= now {
                let _ = socket.send_multipart(reply, 0);
                false
            } else {
                true
            }
        });
        loop {
            let request = match socket.recv_multipart(zmq::DONTWAIT) {
                Ok(r) => r,
                Err(zmq::Error::EAGAIN) => break,
                Err(_) => return,
            };
            // [routing id, empty, version, request id, domain, address,
            //  identity, mechanism, credentials...]
            if request.len() < 8 {
                continue;
            }
            let address = String::from_utf8_lossy(&request[5]).into_owned();
            let credentials = (request[7] == b"PLAIN" && request.len() >= 10)
                .then(|| (&request[8][..], &request[9][..]));
            let verdict = gate.judge(&address, credentials, now);
            let (status, text, user) = match verdict {
                Ok(user) => ("200", "OK", user),
                Err(_) => ("400", "bad credentials", ""),
            };
            let reply = vec![
                request[0].clone(),
                Vec::new(),
                b"1.0".to_vec(),
                request[3].clone(),
                status.as_bytes().to_vec(),
                text.as_bytes().to_vec(),
                user.as_bytes().to_vec(),
                Vec::new(),
            ];
            match verdict {
                Err(delay) if !delay.is_zero() => delayed.push((now + delay, reply)),
                _ => {
                    let _ = socket.send_multipart(&reply, 0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_content_and_length() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secre"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn mesh_peers_and_cells_are_told_apart() {
        assert_eq!(identify(b"cell", b"tok", "tok", None), Some(CELL_USER));
        assert_eq!(identify(b"anyone", b"tok", "tok", None), Some(CELL_USER));
        assert_eq!(identify(b"mesh", b"tok", "tok", None), Some(MESH_USER));
        assert_eq!(identify(b"mesh", b"tok", "tok", Some("sec")), None);
        assert_eq!(
            identify(b"mesh", b"sec", "tok", Some("sec")),
            Some(MESH_USER)
        );
        assert_eq!(identify(b"cell", b"sec", "tok", Some("sec")), None);
        assert_eq!(identify(b"cell", b"bad", "tok", None), None);
    }

    #[test]
    fn denials_slow_down_after_a_few_failures_and_are_capped() {
        assert_eq!(denial_delay(1), Duration::ZERO);
        assert_eq!(denial_delay(FREE_FAILURES), Duration::ZERO);
        assert_eq!(denial_delay(FREE_FAILURES + 1), FIRST_DELAY);
        assert_eq!(denial_delay(FREE_FAILURES + 2), FIRST_DELAY * 2);
        assert_eq!(denial_delay(100), MAX_DELAY);
    }
}
