//! Metadata queries: which cells of a service a sender targets.
//!
//! Every cell carries metadata, a JSON object whose values are strings,
//! integers, floats, versions (strings that parse as SemVer, `"2.10.0"`),
//! booleans, lists and maps. A [`Query`] says which cells match and, when
//! the sender wants one cell, which one to pick. It has one AST and two
//! spellings that parse into it:
//!
//! - a JSON object, compatible with singyeong's query operators
//!   ([`Query::from_json`]);
//! - a compact selector string in the style of Kubernetes label selectors
//!   ([`Query::parse_selector`]).
//!
//! The code is pure: no sockets, no clocks, no randomness. A query runs over
//! the replicated view of the mesh, so every transmitter that runs the same
//! query over the same cells makes the same choice.
//!
//! # The selector string
//!
//! Terms separated by `,` or by the word `and` (whitespace anywhere between
//! tokens is ignored); every term must hold:
//!
//! | term | holds when |
//! | --- | --- |
//! | `k=v`, `k==v` | the value at `k` equals `v` |
//! | `k!=v` | it does not (a missing `k` counts as "not equal") |
//! | `k>v`, `k>=v`, `k<v`, `k<=v` | it compares so with `v`, a number or a version |
//! | `k in (a,b)` | it equals one of the listed values |
//! | `k notin (a,b)` | it equals none of them (a missing `k` counts) |
//! | `k` | `k` exists |
//! | `!k` | `k` does not exist |
//!
//! A key is a metadata key (`region`, `app.kubernetes.io/name`: a key that
//! does not start with `/` is taken whole) or a `/path` into nested maps and
//! lists (`/labels/tier`, `/zones/0`). A value is a run of characters other
//! than whitespace and `,()"!=<>`, or a double-quoted string in which `\`
//! escapes the next character. Values are text; comparisons give them a type
//! (see [Comparisons](#comparisons)). An empty selector matches every cell.
//!
//! ```
//! use serde_json::json;
//! use thynapse_protocol::query::Query;
//!
//! let q = Query::parse_selector("version>=2.0.0,region=eu,tier in (gold,silver),!canary").unwrap();
//! let cell = json!({"version": "2.10.0", "region": "eu", "tier": "gold"});
//! assert!(q.matches(cell.as_object().unwrap()));
//!
//! let q = Query::parse_selector("version >= 2.0.0 and /labels/zone = b").unwrap();
//! let cell = json!({"version": "2.9.1", "labels": {"zone": "b"}});
//! assert!(q.matches(cell.as_object().unwrap()));
//! ```
//!
//! # The JSON form
//!
//! ```json
//! {
//!   "service": "backend",
//!   "ops": [
//!     {"path": "/version", "op": "$gte", "to": "2.0.0"},
//!     {"path": "/region", "op": "$in", "to": ["eu", "us"]},
//!     {"op": "$or", "with": [
//!       {"path": "/labels/tier", "op": "$eq", "to": "gold"},
//!       {"path": "/load", "op": "$lt", "to": 0.5}
//!     ]}
//!   ],
//!   "selector": {"$min": "/load"},
//!   "optional": false,
//!   "droppable": false,
//!   "key": "user-123"
//! }
//! ```
//!
//! Top-level fields, all optional; any other field is an error:
//! - `service` (or `application`, singyeong's name): the service whose cells
//!   the query runs over. The query does not check it: the caller hands
//!   [`Query::choose`] the cells of that service.
//! - `ops`: every op must hold (none: every cell matches). Either an array
//!   of ops or a selector string (`"ops": "version>=2,region=eu"`).
//! - `selector`: `{"$min": path}`, `{"$max": path}` or `{"$avg": path}`: pick
//!   the matching cell with the least, the greatest, or the value closest to
//!   the average at `path` ([`Selector`]).
//! - `optional` (default `false`): when no cell matches, fall back to every
//!   cell of the service.
//! - `droppable` (default `false`): when no cell matches, drop the message
//!   silently instead of answering the sender with an error.
//! - `key`: a string (a number is taken as its decimal text): the same key
//!   goes to the same cell as long as the set of matching cells does not
//!   change (rendezvous hashing, [`rendezvous_score`]).
//!
//! An op is written in one of three ways:
//! - canonical, as [`Query::to_json`] writes it:
//!   `{"path": "/p", "op": "$gte", "to": 2}`, `{"path": "/p", "op": "$exists",
//!   "to": false}` and `{"op": "$and", "with": [op, ...]}`;
//! - a logical shorthand: `{"$or": [op, ...]}` (also `$and`, `$nor`);
//! - singyeong's per-key form: `{"/p": {"$gte": 2, "$lt": 5}}` (several
//!   operators: all hold), `{"region": "eu"}` (a bare value means `$eq`), and
//!   logical operators over one key: `{"load": {"$or": [{"$lt": 1}, {"$gt":
//!   9}]}}`. Several keys in one object must all hold.
//!
//! Comparison operators: `$eq $ne $gt $gte $lt $lte $in $nin $contains
//! $ncontains`, plus `$exists` (`to` is `true` or `false`) so that both
//! spellings say the same things. `$in` and `$nin` take an array. `to` is
//! never `null`: ask `$exists` instead. Ops nest at most [`MAX_QUERY_DEPTH`]
//! levels. A JSON string in place of the whole query is a selector string.
//!
//! ```
//! use serde_json::json;
//! use thynapse_protocol::query::{Query, Selector};
//!
//! let q = Query::from_json(&json!({
//!     "service": "backend",
//!     "ops": [{"path": "/version", "op": "$gte", "to": "2.0.0"}],
//!     "selector": {"$min": "/load"},
//!     "key": "user-123"
//! })).unwrap();
//! assert_eq!(q.service.as_deref(), Some("backend"));
//! assert!(matches!(q.selector, Some(Selector::Min(_))));
//!
//! // singyeong's per-key form parses into the same AST.
//! let a = Query::from_json(&json!({"ops": [{"/version": {"$gte": "2.0.0"}}]})).unwrap();
//! let b = Query::parse_selector("/version>=2.0.0").unwrap();
//! assert_eq!(a, b);
//! ```
//!
//! # Paths
//!
//! A path that starts with `/` is a JSON pointer (RFC 6901, `~1` for `/` and
//! `~0` for `~` inside a segment) into the metadata: `/labels/tier` is key
//! `tier` of map `labels`, `/zones/0` the first element of list `zones`.
//! Anything else is one top-level key. A path that leads nowhere (a missing
//! key, an index past the end, a segment into a string) finds no value, and
//! neither does a value that is `null`: a cell clears a key by setting it to
//! `null`.
//!
//! # Comparisons
//!
//! - When both sides are numbers, or strings that parse as numbers (`"10"`,
//!   `"2.5"`), they compare as numbers: `"10" > 9`, `1 == 1.0`.
//! - Otherwise, when both are versions and at least one is a full SemVer
//!   version, they compare by SemVer precedence: `2.10.0 > 2.9.0`,
//!   `1.0.0-alpha < 1.0.0-alpha.1 < 1.0.0-beta < 1.0.0-rc.1 < 1.0.0`, build
//!   metadata ignored. A leading `v` is allowed (`v2.1.0`), and a
//!   partial version (`2`, `2.1`, or a non-negative integer) compared with a
//!   full one is padded with zeros: `version>=2` means `>= 2.0.0`. Versions
//!   never compare as strings.
//! - Other strings order by bytes (`$gt`, `$lt`...) and are equal when they
//!   are the same text; a boolean equals the string `"true"` or `"false"`;
//!   lists and maps are equal element by element.
//! - Anything else is a type mismatch: `$eq` and the ordering operators do
//!   not match (nothing panics). A string that is a version does not order
//!   against one that is not.
//! - `$contains` holds when a list has an element equal to the value, when a
//!   string contains the value as a substring, or when a map has the value as
//!   a key.
//!
//! # Missing keys
//!
//! A missing key matches no comparison: `$eq $gt $gte $lt $lte $in
//! $contains` and `k=v`, `k>v`, `k in (...)` are false. The negated
//! operators are exactly the negations of their positive twins, as in
//! Kubernetes label selectors: `$ne`, `$nin`, `$ncontains`, `k!=v` and `k
//! notin (...)` are true for a cell without the key, and for a cell whose
//! value is of another type. `!k` matches exactly the cells without `k`.
//!
//! # Choosing a cell
//!
//! [`Query::choose`] takes the cells of the service and answers with every
//! matching cell (for a broadcast) and an [`Outcome`] for a send to one cell:
//! 1. the cells the query matches; if none and `optional`, every cell;
//! 2. if there are none: [`Outcome::Drop`] when `droppable`, else
//!    [`Outcome::NoMatch`];
//! 3. the selector keeps the cells with the best value (ties kept); cells
//!    without a usable value are skipped, and if no cell has one the
//!    selector keeps them all;
//! 4. with a `key`, rendezvous hashing picks one of those; without one, a
//!    single cell is [`Outcome::One`] and several are [`Outcome::Any`],
//!    left to the caller's own policy (round-robin, least in flight).

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use sha1::{Digest, Sha1};

/// Longest selector string, in bytes.
pub const MAX_SELECTOR_LEN: usize = 4096;

/// Deepest nesting of ops in a JSON query (logical operators inside
/// logical operators).
pub const MAX_QUERY_DEPTH: usize = 32;

/// Longest excerpt of the offending JSON that an error quotes, in bytes.
const MAX_ERROR_TERM: usize = 80;

/// Why a query is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The selector string is longer than [`MAX_SELECTOR_LEN`].
    #[error("selector of {len} bytes exceeds {max}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The selector string has an unexpected token.
    #[error("at byte {pos}: expected {expected}, found {found:?}")]
    Syntax {
        /// Byte offset of the token in the selector string.
        pos: usize,
        /// The token as written, or `end of input`.
        found: String,
        /// What would have been accepted there.
        expected: &'static str,
    },
    /// A term of the selector string is well formed but means nothing.
    #[error("term {term:?} at byte {pos}: {reason}")]
    BadTerm {
        /// Byte offset of the term in the selector string.
        pos: usize,
        /// The term as written.
        term: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A path is not a valid key or JSON pointer.
    #[error("path {path:?}: {reason}")]
    BadPath {
        /// The path as written.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A JSON query has a field or op that is not understood.
    #[error("{reason} at {at:?} in the query: {term}")]
    Json {
        /// JSON pointer to the offending place in the query document.
        at: String,
        /// The offending JSON or name, shortened.
        term: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A JSON query nests ops deeper than [`MAX_QUERY_DEPTH`].
    #[error("ops nested deeper than {max} levels at {at:?}")]
    TooDeep {
        /// JSON pointer to the op that is too deep.
        at: String,
        /// The limit.
        max: usize,
    },
}

// ---------------------------------------------------------------------------
// Paths

/// Where a value lives in a cell's metadata: a top-level key, or a JSON
/// pointer into nested maps and lists.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Path {
    /// The keys and list indices from the top, unescaped; never empty.
    segments: Vec<String>,
}

impl Path {
    /// Parses `/a/b/0` as a JSON pointer, or any other text as one key.
    ///
    /// # Errors
    /// [`QueryError::BadPath`] when `s` is empty or has a `~` that is not
    /// `~0` or `~1` in a pointer.
    pub fn parse(s: &str) -> Result<Path, QueryError> {
        let bad = |reason| QueryError::BadPath {
            path: s.to_owned(),
            reason,
        };
        if s.is_empty() {
            return Err(bad("a path is not empty"));
        }
        let Some(rest) = s.strip_prefix('/') else {
            return Ok(Path::key(s));
        };
        let segments = rest
            .split('/')
            .map(unescape_segment)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("'~' is written '~0' and '/' '~1' in a path segment"))?;
        Ok(Path { segments })
    }

    /// The path to one top-level key, taken as is.
    pub fn key(name: &str) -> Path {
        Path {
            segments: vec![name.to_owned()],
        }
    }

    /// The keys and list indices from the top.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The value at this path, or `None` when there is none or it is `null`.
    pub fn resolve<'m>(&self, metadata: &'m Map<String, Value>) -> Option<&'m Value> {
        let (first, rest) = self.segments.split_first()?;
        let mut value = metadata.get(first)?;
        for segment in rest {
            value = match value {
                Value::Object(map) => map.get(segment)?,
                Value::Array(list) => list.get(list_index(segment)?)?,
                _ => return None,
            };
        }
        (!value.is_null()).then_some(value)
    }
}

/// A canonical list index: digits, no leading zero (RFC 6901).
fn list_index(segment: &str) -> Option<usize> {
    let canonical = segment == "0"
        || (!segment.starts_with('0')
            && !segment.is_empty()
            && segment.bytes().all(|b| b.is_ascii_digit()));
    if canonical {
        segment.parse().ok()
    } else {
        None
    }
}

fn unescape_segment(segment: &str) -> Option<String> {
    if !segment.contains('~') {
        return Some(segment.to_owned());
    }
    let mut out = String::with_capacity(segment.len());
    let mut chars = segment.chars();
    while let Some(c) = chars.next() {
        if c == '~' {
            match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

fn escape_segment(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

impl fmt::Display for Path {
    /// Writes the path as a JSON pointer, which [`Path::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for segment in &self.segments {
            write!(f, "/{}", escape_segment(segment))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Path({self})")
    }
}

// ---------------------------------------------------------------------------
// Typed views of values

/// A number, from a JSON number or a string that parses as one.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Int(i128),
    /// Always finite.
    Float(f64),
}

impl Num {
    fn of(value: &Value) -> Option<Num> {
        match value {
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Some(Num::Int(i.into()))
                } else if let Some(u) = n.as_u64() {
                    Some(Num::Int(u.into()))
                } else {
                    n.as_f64().filter(|f| f.is_finite()).map(Num::Float)
                }
            }
            Value::String(s) => Num::parse(s),
            _ => None,
        }
    }

    fn parse(s: &str) -> Option<Num> {
        // Only digits, signs, points and exponents: no "inf" or "NaN".
        let numeric = s.len() <= 64
            && s.bytes().any(|b| b.is_ascii_digit())
            && s.bytes()
                .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'));
        if !numeric {
            return None;
        }
        if let Ok(i) = s.parse::<i128>() {
            return Some(Num::Int(i));
        }
        s.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Num::Float)
    }

    fn as_f64(self) -> f64 {
        match self {
            // Rounds beyond 2^53, which is fine for ordering.
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn compare(self, other: Num) -> Ordering {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => a.cmp(&b),
            _ => self.as_f64().total_cmp(&other.as_f64()),
        }
    }
}

/// A version: full SemVer, or a partial `M` / `M.m` padded with zeros.
#[derive(Debug, Clone, PartialEq)]
struct Ver {
    version: semver::Version,
    /// Whether it was a full SemVer version, not a padded partial one.
    full: bool,
}

impl Ver {
    fn of(value: &Value) -> Option<Ver> {
        match value {
            Value::String(s) => Ver::parse(s),
            Value::Number(n) => n.as_u64().map(|major| Ver {
                version: semver::Version::new(major, 0, 0),
                full: false,
            }),
            _ => None,
        }
    }

    fn parse(s: &str) -> Option<Ver> {
        let s = s.strip_prefix(['v', 'V']).unwrap_or(s);
        if let Ok(version) = semver::Version::parse(s) {
            return Some(Ver {
                version,
                full: true,
            });
        }
        let mut parts = s.split('.');
        let major = version_number(parts.next()?)?;
        let minor = match parts.next() {
            Some(p) => version_number(p)?,
            None => 0,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Ver {
            version: semver::Version::new(major, minor, 0),
            full: false,
        })
    }

    fn full(s: &str) -> bool {
        Ver::parse(s).is_some_and(|v| v.full)
    }

    /// SemVer precedence: build metadata does not count.
    fn compare(&self, other: &Ver) -> Ordering {
        let (a, b) = (&self.version, &other.version);
        (a.major, a.minor, a.patch)
            .cmp(&(b.major, b.minor, b.patch))
            .then_with(|| a.pre.cmp(&b.pre))
    }
}

fn version_number(part: &str) -> Option<u64> {
    let ok = !part.is_empty() && part.len() <= 19 && part.bytes().all(|b| b.is_ascii_digit());
    if ok {
        part.parse().ok()
    } else {
        None
    }
}

/// A value in a query, with its number and version readings worked out once
/// at parse time rather than once per cell.
#[derive(Clone)]
pub struct Literal {
    value: Value,
    num: Option<Num>,
    ver: Option<Ver>,
}

impl Literal {
    /// Wraps a value to compare metadata with.
    pub fn new(value: Value) -> Literal {
        Literal {
            num: Num::of(&value),
            ver: Ver::of(&value),
            value,
        }
    }

    /// The value as written in the query.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// Whether `actual` equals this value (see the module docs).
    fn equals(&self, actual: &Value) -> bool {
        if let Some(b) = self.num {
            if let Some(a) = Num::of(actual) {
                return a.compare(b) == Ordering::Equal;
            }
        }
        if let Some(b) = &self.ver {
            if let Some(a) = Ver::of(actual) {
                if a.full || b.full {
                    return a.compare(b) == Ordering::Equal;
                }
            }
        }
        plain_eq(actual, &self.value)
    }

    /// How `actual` orders against this value, or `None` on a type
    /// mismatch.
    fn order(&self, actual: &Value) -> Option<Ordering> {
        if let Some(b) = self.num {
            if let Some(a) = Num::of(actual) {
                return Some(a.compare(b));
            }
        }
        let actual_ver = Ver::of(actual);
        if let (Some(a), Some(b)) = (&actual_ver, &self.ver) {
            if a.full || b.full {
                return Some(a.compare(b));
            }
        }
        match (actual, &self.value) {
            (Value::String(a), Value::String(b))
                if self.num.is_none()
                    && self.ver.is_none()
                    && actual_ver.is_none()
                    && Num::parse(a).is_none() =>
            {
                Some(a.as_str().cmp(b.as_str()))
            }
            _ => None,
        }
    }

    /// Whether `actual` (a list, string or map) contains this value.
    fn contained_in(&self, actual: &Value) -> bool {
        match (actual, &self.value) {
            (Value::Array(items), _) => items.iter().any(|item| self.equals(item)),
            (Value::String(s), Value::String(needle)) => s.contains(needle.as_str()),
            (Value::Object(map), Value::String(key)) => map.contains_key(key),
            _ => false,
        }
    }
}

impl PartialEq for Literal {
    fn eq(&self, other: &Literal) -> bool {
        self.value == other.value
    }
}

impl Eq for Literal {}

impl fmt::Debug for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Literal({})", self.value)
    }
}

/// Equality of two raw values, both read as numbers and versions first.
fn values_eq(a: &Value, b: &Value) -> bool {
    if let (Some(x), Some(y)) = (Num::of(a), Num::of(b)) {
        return x.compare(y) == Ordering::Equal;
    }
    if let (Some(x), Some(y)) = (Ver::of(a), Ver::of(b)) {
        if x.full || y.full {
            return x.compare(&y) == Ordering::Equal;
        }
    }
    plain_eq(a, b)
}

/// Equality once numbers and versions are out of the way.
fn plain_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Bool(x), Value::String(s)) | (Value::String(s), Value::Bool(x)) => {
            s == if *x { "true" } else { "false" }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| values_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| values_eq(v, w)))
        }
        (Value::Null, Value::Null) => true,
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// The AST

/// A comparison operator (`$in` and `$nin` are [`Expr::In`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `$eq`, `=`, `==`: equal.
    Eq,
    /// `$ne`, `!=`: not equal; true when the key is missing.
    Ne,
    /// `$gt`, `>`: greater.
    Gt,
    /// `$gte`, `>=`: greater or equal.
    Gte,
    /// `$lt`, `<`: less.
    Lt,
    /// `$lte`, `<=`: less or equal.
    Lte,
    /// `$contains`: a list has the element, a string the substring, a map
    /// the key.
    Contains,
    /// `$ncontains`: the negation of `$contains`; true when the key is
    /// missing.
    Ncontains,
}

impl Op {
    /// The JSON name, `$eq` and so on.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "$eq",
            Op::Ne => "$ne",
            Op::Gt => "$gt",
            Op::Gte => "$gte",
            Op::Lt => "$lt",
            Op::Lte => "$lte",
            Op::Contains => "$contains",
            Op::Ncontains => "$ncontains",
        }
    }

    fn from_name(name: &str) -> Option<Op> {
        Some(match name {
            "$eq" => Op::Eq,
            "$ne" => Op::Ne,
            "$gt" => Op::Gt,
            "$gte" => Op::Gte,
            "$lt" => Op::Lt,
            "$lte" => Op::Lte,
            "$contains" => Op::Contains,
            "$ncontains" => Op::Ncontains,
            _ => return None,
        })
    }

    fn holds(self, actual: Option<&Value>, to: &Literal) -> bool {
        let order = |want: fn(Ordering) -> bool| actual.and_then(|a| to.order(a)).is_some_and(want);
        match self {
            Op::Eq => actual.is_some_and(|a| to.equals(a)),
            Op::Ne => !actual.is_some_and(|a| to.equals(a)),
            Op::Gt => order(Ordering::is_gt),
            Op::Gte => order(Ordering::is_ge),
            Op::Lt => order(Ordering::is_lt),
            Op::Lte => order(Ordering::is_le),
            Op::Contains => actual.is_some_and(|a| to.contained_in(a)),
            Op::Ncontains => !actual.is_some_and(|a| to.contained_in(a)),
        }
    }
}

/// One condition on a cell's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `$and`: every sub-condition holds (true when empty).
    And(Vec<Expr>),
    /// `$or`: some sub-condition holds (false when empty).
    Or(Vec<Expr>),
    /// `$nor`: no sub-condition holds (true when empty).
    Nor(Vec<Expr>),
    /// The value at `path` compares with `to` as `op` says.
    Compare {
        /// Where the value is.
        path: Path,
        /// How it compares.
        op: Op,
        /// What it is compared with.
        to: Literal,
    },
    /// `$in` / `k in (...)`, or with `negated`, `$nin` / `k notin (...)`:
    /// the value at `path` equals one of `set` (negated: none of them, or
    /// the key is missing).
    In {
        /// Where the value is.
        path: Path,
        /// `$nin` rather than `$in`.
        negated: bool,
        /// The values it may equal.
        set: Vec<Literal>,
    },
    /// `$exists` / `k` and `!k`: whether there is a value at `path`.
    Exists {
        /// Where the value would be.
        path: Path,
        /// `true` for `k`, `false` for `!k`.
        exists: bool,
    },
}

impl Expr {
    /// Whether this condition holds for `metadata`.
    pub fn matches(&self, metadata: &Map<String, Value>) -> bool {
        match self {
            Expr::And(all) => all.iter().all(|e| e.matches(metadata)),
            Expr::Or(any) => any.iter().any(|e| e.matches(metadata)),
            Expr::Nor(none) => !none.iter().any(|e| e.matches(metadata)),
            Expr::Compare { path, op, to } => op.holds(path.resolve(metadata), to),
            Expr::In { path, negated, set } => {
                let hit = path
                    .resolve(metadata)
                    .is_some_and(|a| set.iter().any(|l| l.equals(a)));
                hit != *negated
            }
            Expr::Exists { path, exists } => path.resolve(metadata).is_some() == *exists,
        }
    }

    /// The canonical JSON form of this op (see the module docs).
    pub fn to_json(&self) -> Value {
        let logical = |name: &str, with: &[Expr]| {
            let with: Vec<Value> = with.iter().map(Expr::to_json).collect();
            serde_json::json!({"op": name, "with": with})
        };
        match self {
            Expr::And(with) => logical("$and", with),
            Expr::Or(with) => logical("$or", with),
            Expr::Nor(with) => logical("$nor", with),
            Expr::Compare { path, op, to } => {
                serde_json::json!({"path": path.to_string(), "op": op.as_str(), "to": to.value})
            }
            Expr::In { path, negated, set } => {
                let to: Vec<Value> = set.iter().map(|l| l.value.clone()).collect();
                let op = if *negated { "$nin" } else { "$in" };
                serde_json::json!({"path": path.to_string(), "op": op, "to": to})
            }
            Expr::Exists { path, exists } => {
                serde_json::json!({"path": path.to_string(), "op": "$exists", "to": exists})
            }
        }
    }
}

/// Picks one cell among the matching ones by the value at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// `$min`: the least value (numbers, else full versions).
    Min(Path),
    /// `$max`: the greatest value (numbers, else full versions).
    Max(Path),
    /// `$avg`: the number closest to the average over the matching cells.
    Avg(Path),
}

impl Selector {
    /// The path whose value decides.
    pub fn path(&self) -> &Path {
        match self {
            Selector::Min(p) | Selector::Max(p) | Selector::Avg(p) => p,
        }
    }

    /// The JSON name, `$min`, `$max` or `$avg`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Selector::Min(_) => "$min",
            Selector::Max(_) => "$max",
            Selector::Avg(_) => "$avg",
        }
    }

    /// The cells of `pool` with the best value, ties kept; all of `pool`
    /// when none has a usable value.
    fn narrow<'a, C>(
        &self,
        pool: &[&'a C],
        metadata_of: &impl Fn(&C) -> &Map<String, Value>,
    ) -> Vec<&'a C> {
        let path = self.path();
        let nums: Vec<(&'a C, Num)> = pool
            .iter()
            .filter_map(|&c| Some((c, Num::of(path.resolve(metadata_of(c))?)?)))
            .collect();
        let best: Vec<&'a C> = match self {
            Selector::Avg(_) => {
                if nums.is_empty() {
                    return pool.to_vec();
                }
                // A running mean cannot overflow where a sum could.
                let mut mean = 0.0_f64;
                for (k, (_, n)) in nums.iter().enumerate() {
                    mean += (n.as_f64() - mean) / (k + 1) as f64;
                }
                let dist: Vec<(&'a C, f64)> = nums
                    .iter()
                    .map(|&(c, n)| (c, (n.as_f64() - mean).abs()))
                    .collect();
                keep_best(&dist, |a, b| a.total_cmp(b))
            }
            Selector::Min(_) | Selector::Max(_) => {
                let flip = |o: Ordering| match self {
                    Selector::Max(_) => o.reverse(),
                    _ => o,
                };
                if nums.is_empty() {
                    let vers: Vec<(&'a C, Ver)> = pool
                        .iter()
                        .filter_map(|&c| {
                            let v = Ver::of(path.resolve(metadata_of(c))?)?;
                            v.full.then_some((c, v))
                        })
                        .collect();
                    keep_best(&vers, |a, b| flip(a.compare(b)))
                } else {
                    keep_best(&nums, |a, b| flip(a.compare(*b)))
                }
            }
        };
        if best.is_empty() {
            pool.to_vec()
        } else {
            best
        }
    }
}

/// The items whose key is least by `cmp`, in their original order.
fn keep_best<'a, C, K>(items: &[(&'a C, K)], cmp: impl Fn(&K, &K) -> Ordering) -> Vec<&'a C> {
    let Some(best) = items.iter().map(|(_, k)| k).min_by(|a, b| cmp(a, b)) else {
        return Vec::new();
    };
    items
        .iter()
        .filter(|(_, k)| cmp(k, best) == Ordering::Equal)
        .map(|&(c, _)| c)
        .collect()
}

/// A parsed query: the conditions a cell must meet, and how to pick one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// The service whose cells the query runs over, when the JSON form
    /// names one; [`Query::choose`] does not look at it.
    pub service: Option<String>,
    /// Every one must hold; none means every cell matches.
    pub ops: Vec<Expr>,
    /// Picks one cell among the matching ones.
    pub selector: Option<Selector>,
    /// When nothing matches, fall back to every cell.
    pub optional: bool,
    /// When nothing matches, drop the message without an error.
    pub droppable: bool,
    /// Consistent choice: the same key picks the same cell while the set of
    /// matching cells does not change.
    pub key: Option<String>,
}

/// The answer of [`Query::choose`].
#[derive(Debug)]
pub struct Choice<'a, C> {
    /// Every matching cell, in the order given (every cell when the query
    /// matched none and is `optional`): the targets of a broadcast.
    pub matched: Vec<&'a C>,
    /// Whether `matched` is the `optional` fall-back to every cell.
    pub fallback: bool,
    /// What to do for a send to one cell.
    pub outcome: Outcome<'a, C>,
}

/// Which cell a send to one cell goes to.
#[derive(Debug)]
pub enum Outcome<'a, C> {
    /// This one: the selector or the key picked it, or it was the only
    /// candidate left.
    One(&'a C),
    /// Any of these (two or more, neither selector nor key could tell them
    /// apart): the caller applies its own policy.
    Any(Vec<&'a C>),
    /// Nothing matched and the query is `droppable`: drop it silently.
    Drop,
    /// Nothing matched: answer the sender with an error.
    NoMatch,
}

impl<'a, C> Outcome<'a, C> {
    /// The chosen cell, when there is exactly one.
    pub fn one(&self) -> Option<&'a C> {
        match self {
            Outcome::One(c) => Some(*c),
            _ => None,
        }
    }
}

/// The rendezvous (highest random weight) score of a cell for a key: the
/// first 8 bytes, big-endian, of SHA-1 over the key's length as a
/// big-endian `u64`, the key, and the cell's id. The cell with the highest
/// score gets the key (ties, which need a SHA-1 collision, go to the
/// smaller id). Removing any other cell leaves the winner in place.
///
/// The formula is part of the mesh's contract: every transmitter must pick
/// the same cell.
pub fn rendezvous_score(key: &[u8], id: &[u8]) -> u64 {
    let mut hasher = Sha1::new();
    hasher.update((key.len() as u64).to_be_bytes());
    hasher.update(key);
    hasher.update(id);
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

impl Query {
    /// Parses a selector string (see the module docs).
    ///
    /// # Errors
    /// [`QueryError::TooLong`], [`QueryError::Syntax`] or
    /// [`QueryError::BadTerm`], with the byte offset of the bad token or
    /// term.
    pub fn parse_selector(s: &str) -> Result<Query, QueryError> {
        if s.len() > MAX_SELECTOR_LEN {
            return Err(QueryError::TooLong {
                len: s.len(),
                max: MAX_SELECTOR_LEN,
            });
        }
        let ops = SelectorParser::new(s)?.parse()?;
        Ok(Query {
            ops,
            ..Query::default()
        })
    }

    /// Reads the JSON form (see the module docs); a JSON string is read as
    /// a selector string.
    ///
    /// # Errors
    /// [`QueryError::Json`] naming the JSON pointer of the bad field or op,
    /// [`QueryError::TooDeep`], or the errors of
    /// [`Query::parse_selector`] for a selector string.
    pub fn from_json(value: &Value) -> Result<Query, QueryError> {
        match value {
            Value::String(s) => Query::parse_selector(s),
            Value::Object(fields) => from_json_object(fields),
            other => Err(json_err(
                "",
                other,
                "a query is a JSON object or a selector string",
            )),
        }
    }

    /// The canonical JSON form, which [`Query::from_json`] reads back to an
    /// equal query.
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        if let Some(service) = &self.service {
            out.insert("service".into(), Value::String(service.clone()));
        }
        out.insert(
            "ops".into(),
            Value::Array(self.ops.iter().map(Expr::to_json).collect()),
        );
        if let Some(selector) = &self.selector {
            let mut s = Map::new();
            s.insert(
                selector.as_str().into(),
                Value::String(selector.path().to_string()),
            );
            out.insert("selector".into(), Value::Object(s));
        }
        out.insert("optional".into(), Value::Bool(self.optional));
        out.insert("droppable".into(), Value::Bool(self.droppable));
        if let Some(key) = &self.key {
            out.insert("key".into(), Value::String(key.clone()));
        }
        Value::Object(out)
    }

    /// Whether a cell with this metadata matches (every op holds).
    pub fn matches(&self, metadata: &Map<String, Value>) -> bool {
        self.ops.iter().all(|e| e.matches(metadata))
    }

    /// Runs the query over the cells of a service: which match, and which
    /// one a send to one cell goes to (see the module docs).
    ///
    /// `metadata_of` gives a cell's metadata and `id_of` its id (a THID's
    /// bytes, say), which the `key` hashes over.
    pub fn choose<'a, C>(
        &self,
        candidates: &'a [C],
        metadata_of: impl Fn(&C) -> &Map<String, Value>,
        id_of: impl Fn(&C) -> &[u8],
    ) -> Choice<'a, C> {
        let mut matched: Vec<&'a C> = candidates
            .iter()
            .filter(|c| self.matches(metadata_of(c)))
            .collect();
        let mut fallback = false;
        if matched.is_empty() && self.optional && !candidates.is_empty() {
            matched = candidates.iter().collect();
            fallback = true;
        }
        if matched.is_empty() {
            let outcome = if self.droppable {
                Outcome::Drop
            } else {
                Outcome::NoMatch
            };
            return Choice {
                matched,
                fallback,
                outcome,
            };
        }
        let pool = match &self.selector {
            Some(selector) => selector.narrow(&matched, &metadata_of),
            None => matched.clone(),
        };
        let outcome = match (&self.key, pool.as_slice()) {
            (_, [only]) => Outcome::One(*only),
            (Some(key), _) => {
                let winner = pool
                    .iter()
                    .map(|&c| (rendezvous_score(key.as_bytes(), id_of(c)), id_of(c), c))
                    .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)));
                match winner {
                    Some((_, _, c)) => Outcome::One(c),
                    // `matched` is not empty and `narrow` never empties it.
                    None => Outcome::NoMatch,
                }
            }
            (None, _) => Outcome::Any(pool),
        };
        Choice {
            matched,
            fallback,
            outcome,
        }
    }
}

impl FromStr for Query {
    type Err = QueryError;

    /// Same as [`Query::parse_selector`].
    fn from_str(s: &str) -> Result<Query, QueryError> {
        Query::parse_selector(s)
    }
}

impl Serialize for Query {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Query {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Query, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Query::from_json(&value).map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------
// The JSON form

fn shorten(mut s: String) -> String {
    if s.len() > MAX_ERROR_TERM {
        let mut cut = MAX_ERROR_TERM;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

fn json_err(at: &str, term: &Value, reason: &'static str) -> QueryError {
    QueryError::Json {
        at: at.to_owned(),
        term: shorten(term.to_string()),
        reason,
    }
}

fn name_err(at: &str, name: &str, reason: &'static str) -> QueryError {
    QueryError::Json {
        at: at.to_owned(),
        term: shorten(name.to_owned()),
        reason,
    }
}

fn child(at: &str, name: &str) -> String {
    format!("{at}/{}", escape_segment(name))
}

fn from_json_object(fields: &Map<String, Value>) -> Result<Query, QueryError> {
    let mut q = Query::default();
    if fields.contains_key("service") && fields.contains_key("application") {
        return Err(name_err(
            "/application",
            "application",
            "give service or application, not both",
        ));
    }
    for (name, value) in fields {
        let at = child("", name);
        match name.as_str() {
            "service" | "application" => {
                q.service = match value {
                    Value::String(s) => Some(s.clone()),
                    Value::Null => None,
                    other => return Err(json_err(&at, other, "the service is a string")),
                }
            }
            "ops" => {
                q.ops = match value {
                    Value::Array(items) => items
                        .iter()
                        .enumerate()
                        .map(|(i, op)| parse_op(op, &format!("/ops/{i}"), 1))
                        .collect::<Result<_, _>>()?,
                    Value::String(s) => Query::parse_selector(s)?.ops,
                    Value::Null => Vec::new(),
                    other => {
                        return Err(json_err(
                            &at,
                            other,
                            "ops is an array of ops or a selector string",
                        ))
                    }
                }
            }
            "selector" => {
                q.selector = match value {
                    Value::Null => None,
                    Value::Object(s) => Some(parse_selector_object(s)?),
                    other => return Err(json_err(&at, other, "the selector is an object")),
                }
            }
            "optional" | "droppable" => {
                let Value::Bool(b) = value else {
                    return Err(json_err(&at, value, "the flag is true or false"));
                };
                if name == "optional" {
                    q.optional = *b;
                } else {
                    q.droppable = *b;
                }
            }
            "key" => {
                q.key = match value {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    Value::Null => None,
                    other => return Err(json_err(&at, other, "the key is a string")),
                }
            }
            _ => return Err(name_err(&at, name, "unknown field")),
        }
    }
    Ok(q)
}

fn parse_selector_object(fields: &Map<String, Value>) -> Result<Selector, QueryError> {
    let mut entries = fields.iter();
    let (Some((name, value)), None) = (entries.next(), entries.next()) else {
        return Err(json_err(
            "/selector",
            &Value::Object(fields.clone()),
            "the selector has exactly one of $min, $max, $avg",
        ));
    };
    let at = child("/selector", name);
    let Value::String(p) = value else {
        return Err(json_err(&at, value, "a selector's path is a string"));
    };
    let path = path_at(p, &at)?;
    match name.as_str() {
        "$min" => Ok(Selector::Min(path)),
        "$max" => Ok(Selector::Max(path)),
        "$avg" => Ok(Selector::Avg(path)),
        _ => Err(name_err(
            &at,
            name,
            "unknown selector; use $min, $max or $avg",
        )),
    }
}

fn path_at(p: &str, at: &str) -> Result<Path, QueryError> {
    Path::parse(p).map_err(|e| match e {
        QueryError::BadPath { reason, .. } => name_err(at, p, reason),
        other => other,
    })
}

fn literal_at(value: &Value, at: &str) -> Result<Literal, QueryError> {
    if value.is_null() {
        return Err(json_err(
            at,
            value,
            "null is not a value to compare with; use $exists",
        ));
    }
    Ok(Literal::new(value.clone()))
}

fn set_at(value: &Value, at: &str) -> Result<Vec<Literal>, QueryError> {
    let Value::Array(items) = value else {
        return Err(json_err(at, value, "$in and $nin take an array"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| literal_at(item, &format!("{at}/{i}")))
        .collect()
}

fn exists_at(value: &Value, at: &str) -> Result<bool, QueryError> {
    match value {
        Value::Bool(b) => Ok(*b),
        other => Err(json_err(at, other, "$exists takes true or false")),
    }
}

fn depth_check(at: &str, depth: usize) -> Result<(), QueryError> {
    if depth > MAX_QUERY_DEPTH {
        Err(QueryError::TooDeep {
            at: at.to_owned(),
            max: MAX_QUERY_DEPTH,
        })
    } else {
        Ok(())
    }
}

fn logical(name: &str, with: Vec<Expr>) -> Option<Expr> {
    match name {
        "$and" => Some(Expr::And(with)),
        "$or" => Some(Expr::Or(with)),
        "$nor" => Some(Expr::Nor(with)),
        _ => None,
    }
}

fn is_logical(name: &str) -> bool {
    matches!(name, "$and" | "$or" | "$nor")
}

fn all_of(mut exprs: Vec<Expr>) -> Expr {
    if exprs.len() == 1 {
        exprs.remove(0)
    } else {
        Expr::And(exprs)
    }
}

/// One op, in any of its three spellings.
fn parse_op(value: &Value, at: &str, depth: usize) -> Result<Expr, QueryError> {
    depth_check(at, depth)?;
    let Value::Object(fields) = value else {
        return Err(json_err(at, value, "an op is a JSON object"));
    };
    if let Some(Value::String(op)) = fields.get("op") {
        return parse_canonical(fields, op, at, depth);
    }
    if fields.is_empty() {
        return Err(json_err(at, value, "an op is not empty"));
    }
    if fields.len() == 1 {
        if let Some((name, with)) = fields.iter().next().filter(|(n, _)| is_logical(n)) {
            let at = child(at, name);
            let subs = sub_ops(with, &at, depth)?;
            if let Some(expr) = logical(name, subs) {
                return Ok(expr);
            }
        }
    }
    let mut exprs = Vec::new();
    for (name, ops) in fields {
        let at = child(at, name);
        if name.starts_with('$') {
            return Err(name_err(
                &at,
                name,
                "unknown operator here; $and, $or and $nor stand alone in their object",
            ));
        }
        let path = path_at(name, &at)?;
        exprs.extend(parse_key_ops(&path, ops, &at, depth + 1)?);
    }
    Ok(all_of(exprs))
}

fn sub_ops(with: &Value, at: &str, depth: usize) -> Result<Vec<Expr>, QueryError> {
    let Value::Array(items) = with else {
        return Err(json_err(
            at,
            with,
            "$and, $or and $nor take an array of ops",
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, sub)| parse_op(sub, &format!("{at}/{i}"), depth + 1))
        .collect()
}

/// `{"path": ..., "op": ..., "to": ...}` or `{"op": "$and", "with": [...]}`.
fn parse_canonical(
    fields: &Map<String, Value>,
    op: &str,
    at: &str,
    depth: usize,
) -> Result<Expr, QueryError> {
    for name in fields.keys() {
        if !matches!(name.as_str(), "op" | "path" | "to" | "with") {
            return Err(name_err(&child(at, name), name, "unknown field in an op"));
        }
    }
    if is_logical(op) {
        if let Some(name) = ["path", "to"].into_iter().find(|n| fields.contains_key(*n)) {
            return Err(name_err(
                &child(at, name),
                name,
                "a logical op has only op and with",
            ));
        }
        let with_at = child(at, "with");
        let with = fields
            .get("with")
            .ok_or_else(|| name_err(at, op, "a logical op needs with"))?;
        let subs = sub_ops(with, &with_at, depth)?;
        return logical(op, subs).ok_or_else(|| name_err(at, op, "unknown operator"));
    }
    if fields.contains_key("with") {
        return Err(name_err(
            &child(at, "with"),
            "with",
            "only $and, $or and $nor take with",
        ));
    }
    let path_loc = child(at, "path");
    let path = match fields.get("path") {
        Some(Value::String(p)) => path_at(p, &path_loc)?,
        Some(other) => return Err(json_err(&path_loc, other, "a path is a string")),
        None => return Err(name_err(at, op, "a comparison needs a path")),
    };
    let to_at = child(at, "to");
    let to = fields.get("to");
    match op {
        "$exists" => Ok(Expr::Exists {
            path,
            exists: match to {
                Some(v) => exists_at(v, &to_at)?,
                None => true,
            },
        }),
        _ => {
            let to = to.ok_or_else(|| name_err(at, op, "a comparison needs to"))?;
            match op {
                "$in" | "$nin" => Ok(Expr::In {
                    path,
                    negated: op == "$nin",
                    set: set_at(to, &to_at)?,
                }),
                _ => {
                    let op = Op::from_name(op)
                        .ok_or_else(|| name_err(&child(at, "op"), op, "unknown operator"))?;
                    Ok(Expr::Compare {
                        path,
                        op,
                        to: literal_at(to, &to_at)?,
                    })
                }
            }
        }
    }
}

/// singyeong's per-key form: the value under a key is an object of
/// operators, or a bare value meaning `$eq`.
fn parse_key_ops(
    path: &Path,
    value: &Value,
    at: &str,
    depth: usize,
) -> Result<Vec<Expr>, QueryError> {
    depth_check(at, depth)?;
    let ops = match value {
        Value::Object(ops) if ops.keys().any(|k| k.starts_with('$')) => ops,
        other => {
            return Ok(vec![Expr::Compare {
                path: path.clone(),
                op: Op::Eq,
                to: literal_at(other, at)?,
            }])
        }
    };
    let mut exprs = Vec::with_capacity(ops.len());
    for (name, arg) in ops {
        let at = child(at, name);
        let expr = match name.as_str() {
            "$and" | "$or" | "$nor" => {
                let Value::Array(items) = arg else {
                    return Err(json_err(&at, arg, "$and, $or and $nor take an array"));
                };
                let mut subs = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let sub = parse_key_ops(path, item, &format!("{at}/{i}"), depth + 1)?;
                    subs.push(all_of(sub));
                }
                logical(name, subs).ok_or_else(|| name_err(&at, name, "unknown operator"))?
            }
            "$exists" => Expr::Exists {
                path: path.clone(),
                exists: exists_at(arg, &at)?,
            },
            "$in" | "$nin" => Expr::In {
                path: path.clone(),
                negated: name == "$nin",
                set: set_at(arg, &at)?,
            },
            _ => Expr::Compare {
                path: path.clone(),
                op: Op::from_name(name).ok_or_else(|| name_err(&at, name, "unknown operator"))?,
                to: literal_at(arg, &at)?,
            },
        };
        exprs.push(expr);
    }
    Ok(exprs)
}

// ---------------------------------------------------------------------------
// The selector string

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SelOp {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok<'s> {
    Word(&'s str),
    Quoted(String),
    Op(SelOp),
    Comma,
    Open,
    Close,
    Bang,
    End,
}

#[derive(Debug, Clone)]
struct Token<'s> {
    tok: Tok<'s>,
    start: usize,
    end: usize,
}

fn is_word_char(c: char) -> bool {
    !c.is_whitespace() && !matches!(c, ',' | '(' | ')' | '"' | '!' | '=' | '<' | '>')
}

fn lex(src: &str) -> Result<Vec<Token<'_>>, QueryError> {
    let mut tokens = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &src[pos..];
        let trimmed = rest.trim_start();
        pos += rest.len() - trimmed.len();
        let start = pos;
        let Some(c) = trimmed.chars().next() else {
            tokens.push(Token {
                tok: Tok::End,
                start,
                end: start,
            });
            return Ok(tokens);
        };
        let two = |second: char| trimmed[c.len_utf8()..].starts_with(second);
        let (tok, len) = match c {
            ',' => (Tok::Comma, 1),
            '(' => (Tok::Open, 1),
            ')' => (Tok::Close, 1),
            '!' if two('=') => (Tok::Op(SelOp::Ne), 2),
            '!' => (Tok::Bang, 1),
            '=' if two('=') => (Tok::Op(SelOp::Eq), 2),
            '=' => (Tok::Op(SelOp::Eq), 1),
            '>' if two('=') => (Tok::Op(SelOp::Gte), 2),
            '>' => (Tok::Op(SelOp::Gt), 1),
            '<' if two('=') => (Tok::Op(SelOp::Lte), 2),
            '<' => (Tok::Op(SelOp::Lt), 1),
            '"' => {
                let (text, len) = lex_quoted(trimmed).ok_or_else(|| QueryError::Syntax {
                    pos: start,
                    found: trimmed.to_owned(),
                    expected: "a closing '\"'",
                })?;
                (Tok::Quoted(text), len)
            }
            _ => {
                let len = trimmed
                    .find(|c: char| !is_word_char(c))
                    .unwrap_or(trimmed.len());
                (Tok::Word(&trimmed[..len]), len)
            }
        };
        pos += len;
        tokens.push(Token {
            tok,
            start,
            end: pos,
        });
    }
}

/// A double-quoted string at the start of `s`: its text and its length in
/// bytes with the quotes, or `None` when it is not closed.
fn lex_quoted(s: &str) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, i + 1)),
            '\\' => out.push(chars.next()?.1),
            _ => out.push(c),
        }
    }
    None
}

struct SelectorParser<'s> {
    src: &'s str,
    tokens: Vec<Token<'s>>,
    i: usize,
}

impl<'s> SelectorParser<'s> {
    fn new(src: &'s str) -> Result<Self, QueryError> {
        Ok(SelectorParser {
            src,
            tokens: lex(src)?,
            i: 0,
        })
    }

    fn peek(&self) -> &Token<'s> {
        // `lex` always ends with `End`, and `i` never moves past it.
        &self.tokens[self.i.min(self.tokens.len() - 1)]
    }

    fn peek2(&self) -> &Token<'s> {
        &self.tokens[(self.i + 1).min(self.tokens.len() - 1)]
    }

    fn bump(&mut self) -> Token<'s> {
        let t = self.peek().clone();
        if t.tok != Tok::End {
            self.i += 1;
        }
        t
    }

    fn unexpected(&self, t: &Token<'s>, expected: &'static str) -> QueryError {
        let found = if t.tok == Tok::End {
            "end of input".to_owned()
        } else {
            self.src[t.start..t.end].to_owned()
        };
        QueryError::Syntax {
            pos: t.start,
            found,
            expected,
        }
    }

    fn parse(mut self) -> Result<Vec<Expr>, QueryError> {
        let mut ops = Vec::new();
        if self.peek().tok == Tok::End {
            return Ok(ops);
        }
        loop {
            ops.push(self.term()?);
            let t = self.bump();
            match t.tok {
                Tok::End => return Ok(ops),
                Tok::Comma => {}
                Tok::Word(w) if w.eq_ignore_ascii_case("and") => {}
                _ => return Err(self.unexpected(&t, "',' or 'and' between terms")),
            }
        }
    }

    fn key(&self, t: &Token<'s>) -> Result<Path, QueryError> {
        match t.tok {
            Tok::Word(w) => Path::parse(w).map_err(|e| match e {
                QueryError::BadPath { reason, .. } => QueryError::BadTerm {
                    pos: t.start,
                    term: w.to_owned(),
                    reason,
                },
                other => other,
            }),
            _ => Err(self.unexpected(t, "a key or '!key'")),
        }
    }

    fn value(&mut self) -> Result<String, QueryError> {
        let t = self.bump();
        match t.tok {
            Tok::Word(w) => Ok(w.to_owned()),
            Tok::Quoted(s) => Ok(s),
            _ => Err(self.unexpected(&t, "a value")),
        }
    }

    fn term(&mut self) -> Result<Expr, QueryError> {
        let first = self.bump();
        if first.tok == Tok::Bang {
            let key = self.bump();
            return Ok(Expr::Exists {
                path: self.key(&key)?,
                exists: false,
            });
        }
        let path = self.key(&first)?;
        match self.peek().tok.clone() {
            Tok::Op(op) => {
                self.bump();
                let value = self.value()?;
                let op = match op {
                    SelOp::Eq => Op::Eq,
                    SelOp::Ne => Op::Ne,
                    SelOp::Gt => Op::Gt,
                    SelOp::Gte => Op::Gte,
                    SelOp::Lt => Op::Lt,
                    SelOp::Lte => Op::Lte,
                };
                let ordering = !matches!(op, Op::Eq | Op::Ne);
                if ordering && Num::parse(&value).is_none() && !Ver::full(&value) {
                    let end = self.tokens[self.i - 1].end;
                    return Err(QueryError::BadTerm {
                        pos: first.start,
                        term: self.src[first.start..end].to_owned(),
                        reason: "'>', '>=', '<' and '<=' take a number or a version",
                    });
                }
                Ok(Expr::Compare {
                    path,
                    op,
                    to: Literal::new(Value::String(value)),
                })
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("in") || w.eq_ignore_ascii_case("notin") => {
                let negated = w.eq_ignore_ascii_case("notin");
                if self.peek2().tok != Tok::Open {
                    let t = self.peek2().clone();
                    return Err(self.unexpected(&t, "'(' after in or notin"));
                }
                self.bump();
                self.bump();
                let set = self.list(&first)?;
                Ok(Expr::In { path, negated, set })
            }
            _ => Ok(Expr::Exists { path, exists: true }),
        }
    }

    /// The values of `k in (a, b)` after the `(`, up to and with the `)`.
    fn list(&mut self, first: &Token<'s>) -> Result<Vec<Literal>, QueryError> {
        if self.peek().tok == Tok::Close {
            let close = self.bump();
            return Err(QueryError::BadTerm {
                pos: first.start,
                term: self.src[first.start..close.end].to_owned(),
                reason: "in and notin take at least one value",
            });
        }
        let mut set = Vec::new();
        loop {
            set.push(Literal::new(Value::String(self.value()?)));
            let t = self.bump();
            match t.tok {
                Tok::Comma => {}
                Tok::Close => return Ok(set),
                _ => return Err(self.unexpected(&t, "',' or ')' in a list of values")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn meta(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("metadata is an object"),
        }
    }

    fn sel(s: &str) -> Query {
        Query::parse_selector(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn js(v: Value) -> Query {
        Query::from_json(&v).unwrap_or_else(|e| panic!("{v}: {e}"))
    }

    /// Whether a one-op canonical JSON query matches `m`.
    fn op(path: &str, op: &str, to: Value, m: &Value) -> bool {
        js(json!({"ops": [{"path": path, "op": op, "to": to}]})).matches(&meta(m.clone()))
    }

    fn sm(s: &str, m: Value) -> bool {
        sel(s).matches(&meta(m))
    }

    // ---- paths

    #[test]
    fn paths_address_nested_maps_and_lists() {
        let m = meta(json!({
            "labels": {"tier": "gold", "a/b": 1, "t~": 2},
            "zones": ["a", "b", {"name": "c"}],
            "region": "eu",
            "gone": null,
        }));
        let get = |p: &str| Path::parse(p).unwrap().resolve(&m).cloned();
        assert_eq!(get("/labels/tier"), Some(json!("gold")));
        assert_eq!(get("/zones/0"), Some(json!("a")));
        assert_eq!(get("/zones/2/name"), Some(json!("c")));
        assert_eq!(get("/labels/a~1b"), Some(json!(1)));
        assert_eq!(get("/labels/t~0"), Some(json!(2)));
        assert_eq!(get("region"), Some(json!("eu")));
        assert_eq!(get("/region"), Some(json!("eu")));
        assert_eq!(get("/zones/3"), None);
        assert_eq!(get("/zones/01"), None);
        assert_eq!(get("/zones/-1"), None);
        assert_eq!(get("/zones/+1"), None);
        assert_eq!(get("/region/0"), None);
        assert_eq!(get("/labels/missing"), None);
        assert_eq!(get("/gone"), None, "null is missing");
    }

    #[test]
    fn a_key_without_a_leading_slash_is_taken_whole() {
        let m = meta(json!({"app.kubernetes.io/name": "web"}));
        assert!(sel("app.kubernetes.io/name=web").matches(&m));
        assert_eq!(Path::parse("a/b").unwrap().segments(), &["a/b".to_owned()]);
    }

    #[test]
    fn bad_paths_are_refused() {
        assert!(matches!(Path::parse(""), Err(QueryError::BadPath { .. })));
        assert!(matches!(
            Path::parse("/a~2"),
            Err(QueryError::BadPath { .. })
        ));
        assert!(matches!(
            Path::parse("/a~"),
            Err(QueryError::BadPath { .. })
        ));
    }

    #[test]
    fn paths_print_as_pointers_that_parse_back() {
        for p in ["/a/b", "/a~1b/~0", "plain", "/", "/a//b", "k8s.io/name"] {
            let path = Path::parse(p).unwrap();
            assert_eq!(Path::parse(&path.to_string()).unwrap(), path, "{p}");
        }
    }

    // ---- operators

    #[test]
    fn eq_and_ne_compare_strings_numbers_booleans_lists_and_maps() {
        let m = json!({"s": "eu", "i": 5, "f": 1.5, "b": true, "l": [1, "x"], "o": {"k": 1}});
        assert!(op("/s", "$eq", json!("eu"), &m));
        assert!(!op("/s", "$eq", json!("us"), &m));
        assert!(op("/i", "$eq", json!(5), &m));
        assert!(op("/i", "$eq", json!(5.0), &m));
        assert!(op("/i", "$eq", json!("5"), &m));
        assert!(op("/f", "$eq", json!(1.5), &m));
        assert!(op("/b", "$eq", json!(true), &m));
        assert!(op("/b", "$eq", json!("true"), &m));
        assert!(!op("/b", "$eq", json!("false"), &m));
        assert!(op("/l", "$eq", json!([1.0, "x"]), &m));
        assert!(!op("/l", "$eq", json!(["x", 1]), &m));
        assert!(op("/o", "$eq", json!({"k": 1}), &m));
        assert!(!op("/o", "$eq", json!({"k": 2}), &m));
        assert!(op("/s", "$ne", json!("us"), &m));
        assert!(!op("/s", "$ne", json!("eu"), &m));
        assert!(op("/i", "$ne", json!(6), &m));
    }

    #[test]
    fn ordering_operators_compare_numbers_numerically() {
        let m = json!({"load": 10, "ratio": 0.25, "text": "10"});
        assert!(op("/load", "$gt", json!(9), &m));
        assert!(op("/load", "$gte", json!(10), &m));
        assert!(!op("/load", "$gt", json!(10), &m));
        assert!(op("/load", "$lt", json!(10.5), &m));
        assert!(op("/load", "$lte", json!(10), &m));
        assert!(op("/ratio", "$lt", json!(0.5), &m));
        // "10" vs "9": numbers, not strings.
        assert!(op("/text", "$gt", json!("9"), &m));
        assert!(op("/text", "$gt", json!(9), &m));
        assert!(sm("load>9", m.clone()));
        assert!(sm("load<=10", m.clone()));
        assert!(sm("text>9", m));
    }

    #[test]
    fn plain_strings_order_by_bytes() {
        let m = json!({"name": "bob"});
        assert!(op("/name", "$gt", json!("alice"), &m));
        assert!(op("/name", "$lt", json!("carol"), &m));
        assert!(op("/name", "$gte", json!("bob"), &m));
    }

    #[test]
    fn in_and_nin_test_membership() {
        let m = json!({"tier": "gold", "n": 3});
        assert!(op("/tier", "$in", json!(["silver", "gold"]), &m));
        assert!(!op("/tier", "$in", json!(["silver"]), &m));
        assert!(op("/n", "$in", json!([1, 3]), &m));
        assert!(op("/n", "$in", json!(["3"]), &m));
        assert!(op("/tier", "$nin", json!(["silver"]), &m));
        assert!(!op("/tier", "$nin", json!(["gold"]), &m));
        assert!(!op("/tier", "$in", json!([]), &m));
        assert!(op("/tier", "$nin", json!([]), &m));
    }

    #[test]
    fn contains_works_on_lists_strings_and_maps() {
        let m = json!({"zones": ["a", "b", 3], "name": "backend-eu-1", "labels": {"gpu": true}});
        assert!(op("/zones", "$contains", json!("b"), &m));
        assert!(op("/zones", "$contains", json!(3), &m));
        assert!(op("/zones", "$contains", json!("3"), &m));
        assert!(!op("/zones", "$contains", json!("c"), &m));
        assert!(op("/name", "$contains", json!("-eu-"), &m));
        assert!(!op("/name", "$contains", json!("-us-"), &m));
        assert!(op("/labels", "$contains", json!("gpu"), &m));
        assert!(!op("/labels", "$contains", json!("tpu"), &m));
        assert!(op("/zones", "$ncontains", json!("c"), &m));
        assert!(!op("/zones", "$ncontains", json!("a"), &m));
        assert!(op("/name", "$ncontains", json!("-us-"), &m));
    }

    #[test]
    fn exists_and_not_exists() {
        let m = json!({"canary": false, "gone": null});
        assert!(op("/canary", "$exists", json!(true), &m));
        assert!(!op("/canary", "$exists", json!(false), &m));
        assert!(op("/gone", "$exists", json!(false), &m));
        assert!(sm("canary", m.clone()));
        assert!(!sm("!canary", m.clone()));
        assert!(sm("!gone", m.clone()));
        assert!(sm("!other", m));
    }

    #[test]
    fn logical_operators_combine_ops() {
        let m = json!({"a": 1, "b": 2});
        let q = |v: Value| js(json!({"ops": [v]})).matches(&meta(m.clone()));
        let t = json!({"path": "/a", "op": "$eq", "to": 1});
        let f = json!({"path": "/b", "op": "$eq", "to": 1});
        assert!(q(json!({"op": "$and", "with": [t, t]})));
        assert!(!q(json!({"op": "$and", "with": [t, f]})));
        assert!(q(json!({"op": "$or", "with": [f, t]})));
        assert!(!q(json!({"op": "$or", "with": [f, f]})));
        assert!(q(json!({"op": "$nor", "with": [f, f]})));
        assert!(!q(json!({"op": "$nor", "with": [f, t]})));
        assert!(q(json!({"$or": [f, t]})));
        assert!(!q(json!({"$nor": [t]})));
        // Empty: and/nor hold, or does not.
        assert!(q(json!({"$and": []})));
        assert!(!q(json!({"$or": []})));
        assert!(q(json!({"$nor": []})));
    }

    // ---- versions

    #[test]
    fn versions_compare_as_semver_not_as_strings() {
        let m = json!({"version": "2.10.0"});
        assert!(op("/version", "$gt", json!("2.9.0"), &m));
        assert!(!op("/version", "$lt", json!("2.9.0"), &m));
        assert!(sm("version>2.9.0", m.clone()));
        assert!(sm("version>=2.10.0", m.clone()));
        assert!(!sm("version<2.9.9", m.clone()));
        assert!(sm("version=2.10.0", m.clone()));
        assert!(sm("version>=v2.0.0", m.clone()));
        assert!(sm("version>=2", m.clone()));
        assert!(sm("version>=2.10", m.clone()));
        assert!(!sm("version>=2.11", m.clone()));
        assert!(sm("version<3", m.clone()));
        assert!(op("/version", "$gte", json!(2), &m));
        assert!(op("/version", "$lt", json!(3), &m));
    }

    #[test]
    fn prereleases_order_by_semver_precedence() {
        let chain = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "1.0.1",
            "1.1.0",
            "2.0.0",
        ];
        for (i, lo) in chain.iter().enumerate() {
            for hi in &chain[i + 1..] {
                let m = json!({ "v": hi });
                assert!(op("/v", "$gt", json!(lo), &m), "{hi} > {lo}");
                assert!(!op("/v", "$lte", json!(lo), &m), "not {hi} <= {lo}");
                let m = json!({ "v": lo });
                assert!(op("/v", "$lt", json!(hi), &m), "{lo} < {hi}");
            }
        }
        // A prerelease is below the release a partial version names.
        assert!(!sm("v>=2.0", json!({"v": "2.0.0-rc.1"})));
    }

    #[test]
    fn build_metadata_does_not_count() {
        let m = json!({"v": "1.2.3+build.7"});
        assert!(op("/v", "$eq", json!("1.2.3"), &m));
        assert!(op("/v", "$gte", json!("1.2.3+other"), &m));
        assert!(!op("/v", "$gt", json!("1.2.3"), &m));
    }

    #[test]
    fn a_version_does_not_order_against_a_plain_string() {
        let m = json!({"v": "2.0.0", "s": "abc"});
        assert!(!op("/v", "$gt", json!("abc"), &m));
        assert!(!op("/v", "$lt", json!("abc"), &m));
        assert!(!op("/s", "$gt", json!("1.0.0"), &m));
        assert!(!op("/s", "$lt", json!("1.0.0"), &m));
    }

    // ---- missing keys and type mismatches

    #[test]
    fn a_missing_key_matches_no_comparison_but_every_negation() {
        let m = json!({"other": 1});
        for o in ["$eq", "$gt", "$gte", "$lt", "$lte", "$contains"] {
            assert!(!op("/k", o, json!(1), &m), "{o}");
            assert!(!op("/a/b/0", o, json!(1), &m), "{o} deep");
        }
        assert!(!op("/k", "$in", json!([1]), &m));
        assert!(op("/k", "$ne", json!(1), &m));
        assert!(op("/k", "$nin", json!([1]), &m));
        assert!(op("/k", "$ncontains", json!(1), &m));
        assert!(!sm("k=1", m.clone()));
        assert!(!sm("k>1", m.clone()));
        assert!(!sm("k in (1)", m.clone()));
        assert!(sm("k!=1", m.clone()));
        assert!(sm("k notin (1)", m.clone()));
        assert!(!sm("k", m.clone()));
        assert!(sm("!k", m));
    }

    #[test]
    fn type_mismatches_do_not_match_and_do_not_panic() {
        let m = json!({"s": "eu", "n": 5, "b": true, "l": [1], "o": {"a": 1}});
        for path in ["/s", "/n", "/b", "/l", "/o"] {
            for to in [
                json!("x"),
                json!(99),
                json!(false),
                json!([2]),
                json!({"z": 0}),
            ] {
                for o in ["$gt", "$gte", "$lt", "$lte"] {
                    let _ = op(path, o, to.clone(), &m);
                }
                assert!(!op(path, "$eq", to.clone(), &m), "{path} $eq {to}");
                assert!(op(path, "$ne", to.clone(), &m), "{path} $ne {to}");
            }
        }
        assert!(!op("/s", "$gt", json!(1), &m));
        assert!(!op("/n", "$gt", json!("abc"), &m));
        assert!(!op("/b", "$gt", json!(false), &m));
        assert!(!op("/l", "$gt", json!([0]), &m));
        assert!(!op("/n", "$contains", json!(5), &m));
        assert!(!op("/b", "$contains", json!(true), &m));
        assert!(!op("/s", "$contains", json!(1), &m));
    }

    // ---- selector strings

    #[test]
    fn every_selector_form_parses() {
        let m = json!({
            "version": "2.3.0", "region": "eu", "tier": "gold", "load": 3,
            "labels": {"zone": "b"}, "name": "a b,c",
        });
        let yes = [
            "region=eu",
            "region==eu",
            "region!=us",
            "tier in (gold,silver)",
            "tier notin (bronze)",
            "tier",
            "!canary",
            "load>2",
            "load>=3",
            "load<4",
            "load<=3",
            "version>=2.0.0,region=eu,tier in (gold,silver),!canary",
            "version >= 2.0.0 and region = eu",
            "  version>=2.0.0  ,  region = eu  ",
            "version>=2.0.0 AND region=eu",
            "tier in ( gold , silver )",
            "tier in(gold)",
            "/labels/zone=b",
            "/labels/zone in (a,b)",
            "name=\"a b,c\"",
            "tier in (\"gold\", silver)",
            "! canary",
            "region=eu,and=1", /* `and` as a key */
        ];
        for s in yes {
            let expect = s != "region=eu,and=1";
            assert_eq!(sm(s, m.clone()), expect, "{s}");
        }
        let no = [
            "region=us",
            "region!=eu",
            "tier in (silver)",
            "tier notin (gold)",
            "canary",
            "!tier",
            "load>3",
            "version<2.0.0",
            "version>=2.0.0,region=us",
            "/labels/zone=a",
        ];
        for s in no {
            assert!(!sm(s, m.clone()), "{s}");
        }
    }

    #[test]
    fn an_empty_selector_matches_every_cell() {
        assert!(sm("", json!({})));
        assert!(sm("   ", json!({"a": 1})));
        assert_eq!(sel("").ops, vec![]);
    }

    #[test]
    fn selector_terms_parse_into_the_expected_ast() {
        let q = sel("version>=2.0.0,tier in (gold,silver),!canary,region");
        assert_eq!(
            q.ops,
            vec![
                Expr::Compare {
                    path: Path::key("version"),
                    op: Op::Gte,
                    to: Literal::new(json!("2.0.0")),
                },
                Expr::In {
                    path: Path::key("tier"),
                    negated: false,
                    set: vec![Literal::new(json!("gold")), Literal::new(json!("silver"))],
                },
                Expr::Exists {
                    path: Path::key("canary"),
                    exists: false,
                },
                Expr::Exists {
                    path: Path::key("region"),
                    exists: true,
                },
            ]
        );
        assert_eq!(sel("a=1"), "a==1".parse().unwrap());
        assert_eq!(sel("a=1, b=2"), sel("a = 1 and b = 2"));
    }

    #[test]
    fn selector_parse_errors_name_the_term_and_position() {
        let syntax = |s: &str| match Query::parse_selector(s) {
            Err(QueryError::Syntax { pos, found, .. }) => (pos, found),
            other => panic!("{s:?}: {other:?}"),
        };
        assert_eq!(syntax("region="), (7, "end of input".into()));
        assert_eq!(syntax("=eu"), (0, "=".into()));
        assert_eq!(syntax("region=eu,"), (10, "end of input".into()));
        assert_eq!(syntax("a b"), (2, "b".into()));
        assert_eq!(syntax("tier in (a,b"), (12, "end of input".into()));
        assert_eq!(syntax("tier in a"), (8, "a".into()));
        assert_eq!(syntax("tier in (a b)"), (11, "b".into()));
        assert_eq!(syntax("!"), (1, "end of input".into()));
        assert_eq!(syntax("a=<1"), (2, "<".into()));
        assert_eq!(syntax("a,,b"), (2, ",".into()));
        assert_eq!(syntax("a=\"open"), (2, "\"open".into()));
        assert_eq!(syntax("a and"), (5, "end of input".into()));

        let bad = |s: &str| match Query::parse_selector(s) {
            Err(QueryError::BadTerm { pos, term, .. }) => (pos, term),
            other => panic!("{s:?}: {other:?}"),
        };
        assert_eq!(bad("a=1, version > eu"), (5, "version > eu".into()));
        assert_eq!(bad("tier in ()"), (0, "tier in ()".into()));
        assert_eq!(bad("x=1,/a~2=1"), (4, "/a~2".into()));

        let long = "a".repeat(MAX_SELECTOR_LEN + 1);
        assert!(matches!(
            Query::parse_selector(&long),
            Err(QueryError::TooLong { .. })
        ));
        let e = Query::parse_selector("region=").unwrap_err().to_string();
        assert!(e.contains("byte 7"), "{e}");
    }

    // ---- the JSON form

    #[test]
    fn the_documented_json_example_parses() {
        let q = js(json!({
            "service": "backend",
            "ops": [
                {"path": "/version", "op": "$gte", "to": "2.0.0"},
                {"path": "/region", "op": "$in", "to": ["eu", "us"]},
                {"op": "$or", "with": [
                    {"path": "/labels/tier", "op": "$eq", "to": "gold"},
                    {"path": "/load", "op": "$lt", "to": 0.5}
                ]}
            ],
            "selector": {"$min": "/load"},
            "optional": false,
            "droppable": true,
            "key": "user-123"
        }));
        assert_eq!(q.service.as_deref(), Some("backend"));
        assert_eq!(q.ops.len(), 3);
        assert_eq!(q.selector, Some(Selector::Min(Path::key("load"))));
        assert!(!q.optional);
        assert!(q.droppable);
        assert_eq!(q.key.as_deref(), Some("user-123"));
        assert!(q.matches(&meta(
            json!({"version": "2.1.0", "region": "eu", "load": 0.1})
        )));
        assert!(!q.matches(&meta(
            json!({"version": "2.1.0", "region": "eu", "load": 0.9})
        )));
        assert!(q.matches(&meta(
            json!({"version": "2.1.0", "region": "us", "load": 0.9, "labels": {"tier": "gold"}})
        )));
    }

    #[test]
    fn singyeong_per_key_ops_parse_into_the_same_ast() {
        let a = js(json!({"application": "svc", "ops": [
            {"key": {"$eq": "value"}},
            {"key2": {"$lte": 1234}},
            {"key3": {"$and": [{"$gt": "10"}, {"$lt": 20}]}},
            {"key4": {"$in": ["123", "456"]}},
            {"/a/b": "bare"},
        ]}));
        let b = js(json!({"service": "svc", "ops": [
            {"path": "key", "op": "$eq", "to": "value"},
            {"path": "/key2", "op": "$lte", "to": 1234},
            {"op": "$and", "with": [
                {"path": "/key3", "op": "$gt", "to": "10"},
                {"path": "/key3", "op": "$lt", "to": 20},
            ]},
            {"path": "/key4", "op": "$in", "to": ["123", "456"]},
            {"path": "/a/b", "op": "$eq", "to": "bare"},
        ]}));
        assert_eq!(a, b);
        // Several operators or keys in one object: all must hold.
        let c = js(json!({"ops": [{"load": {"$gte": 1, "$lt": 5}, "region": "eu"}]}));
        assert!(c.matches(&meta(json!({"load": 3, "region": "eu"}))));
        assert!(!c.matches(&meta(json!({"load": 5, "region": "eu"}))));
        assert!(!c.matches(&meta(json!({"load": 3, "region": "us"}))));
        let d = js(json!({"ops": [{"/k": {"$exists": false}}, {"l": {"$nin": [1]}}]}));
        assert!(d.matches(&meta(json!({"l": 2}))));
        let e = js(json!({"ops": [{"load": {"$or": [{"$lt": 1}, {"$gt": 9}]}}]}));
        assert!(e.matches(&meta(json!({"load": 10}))));
        assert!(!e.matches(&meta(json!({"load": 5}))));
    }

    #[test]
    fn ops_and_whole_queries_may_be_selector_strings() {
        let a = js(json!({"ops": "version>=2.0.0,region=eu", "key": 42}));
        assert_eq!(a.ops, sel("version>=2.0.0,region=eu").ops);
        assert_eq!(a.key.as_deref(), Some("42"));
        assert_eq!(js(json!("region=eu")), sel("region=eu"));
        assert_eq!(js(json!({})), Query::default());
        assert_eq!(
            js(json!({"ops": null, "selector": null, "key": null})),
            Query::default()
        );
    }

    #[test]
    fn selector_objects_parse() {
        for (name, want) in [
            ("$min", Selector::Min(Path::key("load"))),
            ("$max", Selector::Max(Path::key("load"))),
            ("$avg", Selector::Avg(Path::key("load"))),
        ] {
            let q = js(json!({"selector": {name: "/load"}}));
            assert_eq!(q.selector, Some(want));
        }
    }

    #[test]
    fn json_errors_name_the_place_and_the_term() {
        let err = |v: Value| match Query::from_json(&v) {
            Err(QueryError::Json { at, term, .. }) => (at, term),
            other => panic!("{v}: {other:?}"),
        };
        assert_eq!(
            err(
                json!({"ops": [{"path": "/a", "op": "$eq", "to": 1}, {"path": "/a", "op": "$like", "to": 1}]})
            ),
            ("/ops/1/op".into(), "$like".into())
        );
        assert_eq!(
            err(json!({"ops": [{"a": {"$like": 1}}]})),
            ("/ops/0/a/$like".into(), "$like".into())
        );
        assert_eq!(
            err(json!({"sevrice": "x"})),
            ("/sevrice".into(), "sevrice".into())
        );
        assert_eq!(
            err(json!({"ops": [{"path": "/a", "op": "$eq", "to": null}]})).0,
            "/ops/0/to"
        );
        assert_eq!(err(json!({"ops": [{"a": null}]})).0, "/ops/0/a");
        assert_eq!(
            err(json!({"ops": [{"path": "/a", "op": "$in", "to": "x"}]})).0,
            "/ops/0/to"
        );
        assert_eq!(
            err(json!({"ops": [{"path": "/a", "op": "$in", "to": [1, null]}]})).0,
            "/ops/0/to/1"
        );
        assert_eq!(
            err(json!({"ops": [{"path": "/a", "op": "$eq"}]})).0,
            "/ops/0"
        );
        assert_eq!(err(json!({"ops": [{"op": "$eq", "to": 1}]})).0, "/ops/0");
        assert_eq!(
            err(json!({"ops": [{"path": "/a", "op": "$eq", "to": 1, "x": 1}]})).0,
            "/ops/0/x"
        );
        assert_eq!(
            err(json!({"ops": [{"op": "$and", "with": [], "path": "/a"}]})).0,
            "/ops/0/path"
        );
        assert_eq!(err(json!({"ops": [{"op": "$and"}]})).0, "/ops/0");
        assert_eq!(
            err(json!({"ops": [{"op": "$or", "with": 1}]})).0,
            "/ops/0/with"
        );
        assert_eq!(
            err(json!({"ops": [{"op": "$or", "with": [1]}]})).0,
            "/ops/0/with/0"
        );
        assert_eq!(
            err(json!({"ops": [{"path": "/a~9", "op": "$eq", "to": 1}]})).0,
            "/ops/0/path"
        );
        assert_eq!(err(json!({"ops": [{}]})).0, "/ops/0");
        assert_eq!(err(json!({"ops": [{"$and": [], "a": 1}]})).0, "/ops/0/$and");
        assert_eq!(
            err(json!({"ops": [{"/a": {"$exists": "yes"}}]})).0,
            "/ops/0/~1a/$exists"
        );
        assert_eq!(err(json!({"ops": 5})).0, "/ops");
        assert_eq!(err(json!({"optional": "yes"})).0, "/optional");
        assert_eq!(err(json!({"key": [1]})).0, "/key");
        assert_eq!(
            err(json!({"selector": {"$median": "/a"}})).0,
            "/selector/$median"
        );
        assert_eq!(
            err(json!({"selector": {"$min": "/a", "$max": "/b"}})).0,
            "/selector"
        );
        assert_eq!(err(json!({"selector": {"$min": 1}})).0, "/selector/$min");
        assert_eq!(
            err(json!({"service": "a", "application": "b"})).0,
            "/application"
        );
        assert_eq!(err(json!(3)).0, "");
        // A selector string inside JSON reports its own positions.
        assert!(matches!(
            Query::from_json(&json!({"ops": "a=1,"})),
            Err(QueryError::Syntax { pos: 4, .. })
        ));
        let long = "x".repeat(500);
        let (_, term) = err(json!({ long.clone(): 1 }));
        assert!(
            term.len() <= MAX_ERROR_TERM + 3,
            "errors quote a bounded excerpt"
        );
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut op = json!({"path": "/a", "op": "$eq", "to": 1});
        for _ in 0..MAX_QUERY_DEPTH {
            op = json!({"$and": [op]});
        }
        assert!(matches!(
            Query::from_json(&json!({ "ops": [op.clone()] })),
            Err(QueryError::TooDeep { .. })
        ));
        let mut ok = json!({"path": "/a", "op": "$eq", "to": 1});
        for _ in 0..MAX_QUERY_DEPTH - 1 {
            ok = json!({"op": "$or", "with": [ok]});
        }
        assert!(js(json!({ "ops": [ok] })).matches(&meta(json!({"a": 1}))));
    }

    #[test]
    fn queries_round_trip_through_json_and_serde() {
        let q = js(json!({
            "service": "backend",
            "ops": [
                {"path": "/v", "op": "$gte", "to": "2.0.0"},
                {"path": "/z", "op": "$nin", "to": [1, "a"]},
                {"path": "/e", "op": "$exists", "to": false},
                {"$nor": [{"path": "/l", "op": "$contains", "to": {"k": [1]}}]},
            ],
            "selector": {"$avg": "/a~1b"},
            "optional": true,
            "droppable": true,
            "key": "k"
        }));
        assert_eq!(js(q.to_json()), q);
        let text = serde_json::to_string(&q).unwrap();
        let back: Query = serde_json::from_str(&text).unwrap();
        assert_eq!(back, q);
        let bad = serde_json::from_str::<Query>(r#"{"ops": 1}"#);
        assert!(bad.is_err());
    }

    // ---- choosing a cell

    #[derive(Debug, PartialEq)]
    struct Cell {
        id: [u8; 20],
        meta: Map<String, Value>,
    }

    fn cell(n: u8, m: Value) -> Cell {
        Cell {
            id: [n; 20],
            meta: meta(m),
        }
    }

    fn choose<'a>(q: &Query, cells: &'a [Cell]) -> Choice<'a, Cell> {
        q.choose(cells, |c| &c.meta, |c| &c.id)
    }

    fn ids(cs: &[&Cell]) -> Vec<u8> {
        cs.iter().map(|c| c.id[0]).collect()
    }

    fn fleet() -> Vec<Cell> {
        vec![
            cell(1, json!({"region": "eu", "load": 5, "version": "2.9.0"})),
            cell(2, json!({"region": "eu", "load": 1, "version": "2.10.0"})),
            cell(
                3,
                json!({"region": "us", "load": 9, "version": "3.0.0-rc.1"}),
            ),
            cell(4, json!({"region": "eu", "load": 3})),
        ]
    }

    #[test]
    fn choose_returns_every_match_and_leaves_the_pick_to_the_caller() {
        let cells = fleet();
        let c = choose(&sel("region=eu"), &cells);
        assert_eq!(ids(&c.matched), vec![1, 2, 4]);
        assert!(!c.fallback);
        match c.outcome {
            Outcome::Any(any) => assert_eq!(ids(&any), vec![1, 2, 4]),
            other => panic!("{other:?}"),
        }
        let c = choose(&sel("region=us"), &cells);
        assert_eq!(c.outcome.one().map(|c| c.id[0]), Some(3));
    }

    #[test]
    fn no_match_is_an_error_unless_droppable() {
        let cells = fleet();
        let mut q = sel("region=ap");
        let c = choose(&q, &cells);
        assert!(c.matched.is_empty());
        assert!(matches!(c.outcome, Outcome::NoMatch));
        q.droppable = true;
        assert!(matches!(choose(&q, &cells).outcome, Outcome::Drop));
        assert!(matches!(choose(&q, &[]).outcome, Outcome::Drop));
    }

    #[test]
    fn optional_falls_back_to_every_cell() {
        let cells = fleet();
        let mut q = sel("region=ap");
        q.optional = true;
        let c = choose(&q, &cells);
        assert!(c.fallback);
        assert_eq!(ids(&c.matched), vec![1, 2, 3, 4]);
        assert!(matches!(c.outcome, Outcome::Any(_)));
        // The selector still applies to the fall-back.
        q.selector = Some(Selector::Max(Path::key("load")));
        assert_eq!(choose(&q, &cells).outcome.one().map(|c| c.id[0]), Some(3));
        // Nothing to fall back to.
        let c = choose(&q, &[]);
        assert!(!c.fallback);
        assert!(matches!(c.outcome, Outcome::NoMatch));
        // A match means no fall-back.
        let q = Query {
            optional: true,
            ..sel("region=us")
        };
        let c = choose(&q, &cells);
        assert!(!c.fallback);
        assert_eq!(ids(&c.matched), vec![3]);
    }

    #[test]
    fn selectors_pick_min_max_and_closest_to_average() {
        let cells = fleet();
        let pick = |s: Selector| {
            let q = Query {
                selector: Some(s),
                ..sel("region=eu")
            };
            choose(&q, &cells).outcome.one().map(|c| c.id[0])
        };
        assert_eq!(pick(Selector::Min(Path::key("load"))), Some(2));
        assert_eq!(pick(Selector::Max(Path::key("load"))), Some(1));
        // Loads 5, 1, 3: the average is 3.
        assert_eq!(pick(Selector::Avg(Path::key("load"))), Some(4));
        // Versions compare as SemVer; cell 4 has none and is skipped.
        assert_eq!(pick(Selector::Max(Path::key("version"))), Some(2));
        assert_eq!(pick(Selector::Min(Path::key("version"))), Some(1));
        let all = Query {
            selector: Some(Selector::Max(Path::key("version"))),
            ..Query::default()
        };
        assert_eq!(choose(&all, &cells).outcome.one().map(|c| c.id[0]), Some(3));
    }

    #[test]
    fn selector_ties_are_left_to_the_key_or_the_caller() {
        let cells = vec![
            cell(1, json!({"load": 1})),
            cell(2, json!({"load": 1})),
            cell(3, json!({"load": 2})),
        ];
        let mut q = Query {
            selector: Some(Selector::Min(Path::key("load"))),
            ..Query::default()
        };
        match choose(&q, &cells).outcome {
            Outcome::Any(tied) => assert_eq!(ids(&tied), vec![1, 2]),
            other => panic!("{other:?}"),
        }
        q.key = Some("user-1".into());
        let one = choose(&q, &cells).outcome.one().map(|c| c.id[0]);
        assert!(matches!(one, Some(1 | 2)));
    }

    #[test]
    fn a_selector_without_usable_values_keeps_every_match() {
        let cells = vec![cell(1, json!({"load": "high"})), cell(2, json!({}))];
        for s in [
            Selector::Min(Path::key("load")),
            Selector::Max(Path::key("load")),
            Selector::Avg(Path::key("load")),
        ] {
            let q = Query {
                selector: Some(s),
                ..Query::default()
            };
            assert!(matches!(choose(&q, &cells).outcome, Outcome::Any(ref v) if v.len() == 2));
        }
    }

    fn many_cells(n: u8) -> Vec<Cell> {
        (0..n).map(|i| cell(i, json!({"region": "eu"}))).collect()
    }

    #[test]
    fn the_same_key_goes_to_the_same_cell() {
        let cells = many_cells(8);
        let q = Query {
            key: Some("user-123".into()),
            ..sel("region=eu")
        };
        let first = choose(&q, &cells).outcome.one().unwrap().id;
        for _ in 0..10 {
            assert_eq!(choose(&q, &cells).outcome.one().unwrap().id, first);
        }
        // The order of the candidates does not matter.
        let reversed: Vec<Cell> = cells
            .iter()
            .rev()
            .map(|c| Cell {
                id: c.id,
                meta: c.meta.clone(),
            })
            .collect();
        assert_eq!(choose(&q, &reversed).outcome.one().unwrap().id, first);
    }

    #[test]
    fn removing_a_cell_that_was_not_chosen_does_not_move_the_key() {
        let cells = many_cells(8);
        for k in 0..200 {
            let q = Query {
                key: Some(format!("user-{k}")),
                ..Query::default()
            };
            let chosen = choose(&q, &cells).outcome.one().unwrap().id;
            for gone in cells.iter().filter(|c| c.id != chosen) {
                let rest: Vec<Cell> = cells
                    .iter()
                    .filter(|c| c.id != gone.id)
                    .map(|c| Cell {
                        id: c.id,
                        meta: c.meta.clone(),
                    })
                    .collect();
                assert_eq!(choose(&q, &rest).outcome.one().unwrap().id, chosen);
            }
        }
    }

    #[test]
    fn keys_spread_over_the_cells() {
        let cells = many_cells(4);
        let mut hits = [0usize; 4];
        for k in 0..4000 {
            let q = Query {
                key: Some(k.to_string()),
                ..Query::default()
            };
            hits[choose(&q, &cells).outcome.one().unwrap().id[0] as usize] += 1;
        }
        assert!(hits.iter().all(|&h| (700..1300).contains(&h)), "{hits:?}");
    }

    #[test]
    fn rendezvous_scores_are_fixed_by_the_formula() {
        // The mesh's transmitters must agree: pin the formula.
        let mut h = Sha1::new();
        h.update(3u64.to_be_bytes());
        h.update(b"abc");
        h.update([7u8; 20]);
        let d = h.finalize();
        let want = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
        assert_eq!(rendezvous_score(b"abc", &[7; 20]), want);
        assert_ne!(rendezvous_score(b"ab", b"c"), rendezvous_score(b"abc", b""));
    }

    // ---- properties

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            (-1e6f64..1e6).prop_map(|f| json!(f)),
            "[a-z$/~0-9.]{0,8}".prop_map(Value::String),
            prop::sample::select(vec!["$eq", "$in", "$and", "$or", "$exists", "/a", "2.0.0"])
                .prop_map(|s| json!(s)),
        ];
        leaf.prop_recursive(5, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "ops",
                        "path",
                        "op",
                        "to",
                        "with",
                        "$and",
                        "$or",
                        "$nor",
                        "$eq",
                        "$in",
                        "$gt",
                        "$exists",
                        "$contains",
                        "selector",
                        "$min",
                        "key",
                        "optional",
                        "a",
                        "/b/0",
                    ])
                    .prop_map(str::to_owned),
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn parse_selector_never_panics_on_arbitrary_strings(s in any::<String>()) {
            let _ = Query::parse_selector(&s);
        }

        #[test]
        fn parsed_selectors_round_trip_through_json(
            s in r#"[a-z/!=<>,() "0-9.~\-]{0,40}|(in|notin|and|,| |!|=|>=|<|\(|\)|a|/b/0|2\.0\.0|"x y")*"#
        ) {
            if let Ok(q) = Query::parse_selector(&s) {
                prop_assert_eq!(Query::from_json(&q.to_json()), Ok(q));
            }
        }

        #[test]
        fn from_json_never_panics_and_round_trips(v in arb_json(), m in arb_json()) {
            let wrapped = json!({"ops": [v.clone()]});
            for candidate in [v, wrapped] {
                if let Ok(q) = Query::from_json(&candidate) {
                    prop_assert_eq!(Query::from_json(&q.to_json()), Ok(q.clone()));
                    if let Value::Object(m) = &m {
                        let _ = q.matches(m);
                    }
                }
            }
        }

        #[test]
        fn every_comparison_is_total_and_consistent(a in arb_json(), b in arb_json()) {
            let m = meta(json!({ "k": a }));
            let lit = Literal::new(b.clone());
            let actual = Path::key("k").resolve(&m);
            let holds = |op: Op| op.holds(actual, &lit);
            prop_assert_eq!(holds(Op::Eq), !holds(Op::Ne));
            prop_assert_eq!(holds(Op::Contains), !holds(Op::Ncontains));
            if holds(Op::Gt) {
                prop_assert!(holds(Op::Gte) && !holds(Op::Lte) && !holds(Op::Lt));
            }
            if holds(Op::Gte) && holds(Op::Lte) {
                prop_assert!(!holds(Op::Gt) && !holds(Op::Lt));
            }
        }

        #[test]
        fn removing_any_other_cell_keeps_the_key_on_its_cell(
            key in "[a-z0-9]{1,12}",
            n in 2u8..12,
            gone in 0u8..12,
        ) {
            let cells = many_cells(n);
            let q = Query { key: Some(key), ..Query::default() };
            let chosen = choose(&q, &cells).outcome.one().unwrap().id;
            let gone = gone % n;
            prop_assume!(cells[gone as usize].id != chosen);
            let rest: Vec<Cell> = cells
                .iter()
                .filter(|c| c.id[0] != gone)
                .map(|c| Cell { id: c.id, meta: c.meta.clone() })
                .collect();
            prop_assert_eq!(choose(&q, &rest).outcome.one().unwrap().id, chosen);
        }
    }
}
