//! Channels and the patterns cells listen to.
//!
//! Channels are `::`-separated names (`billing::invoice::paid`). A pattern
//! is exact (`billing::invoice::paid`), a prefix (`billing::*`: a single
//! trailing star and no other wildcard) or an anchored glob (`*::paid`,
//! `billing::?nvoice::*`), where every `*` matches any run of characters,
//! `::` included, and `?` exactly one character.

use std::fmt;

use crate::limits::MAX_CHANNEL_LEN;

/// Why a channel or pattern is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Empty.
    #[error("empty channel or pattern")]
    Empty,
    /// Longer than [`MAX_CHANNEL_LEN`] bytes.
    #[error("channel or pattern of {0} bytes exceeds {MAX_CHANNEL_LEN}")]
    TooLong(usize),
    /// A character that is not allowed (space, control character).
    #[error("character {0:?} is not allowed in a channel or pattern")]
    BadChar(char),
    /// A wildcard in a channel (only patterns have wildcards).
    #[error("a channel has no wildcards ('*' or '?')")]
    Wildcard,
}

fn check_chars(s: &str) -> Result<(), PatternError> {
    if s.is_empty() {
        return Err(PatternError::Empty);
    }
    if s.len() > MAX_CHANNEL_LEN {
        return Err(PatternError::TooLong(s.len()));
    }
    match s.chars().find(|c| c.is_whitespace() || c.is_control()) {
        Some(c) => Err(PatternError::BadChar(c)),
        None => Ok(()),
    }
}

/// Checks that `s` is a valid channel name to publish on.
///
/// # Errors
/// [`PatternError`] when it is empty, too long, has whitespace, control
/// characters or wildcards.
pub fn validate_channel(s: &str) -> Result<(), PatternError> {
    check_chars(s)?;
    if s.contains(['*', '?']) {
        return Err(PatternError::Wildcard);
    }
    Ok(())
}

/// A parsed channel pattern.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    text: String,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Exact,
    /// Matches channels starting with `text` minus its trailing star.
    Prefix,
    Glob,
}

impl Pattern {
    /// Parses a pattern.
    ///
    /// # Errors
    /// [`PatternError`] when it is empty, too long or has whitespace or
    /// control characters.
    pub fn parse(s: &str) -> Result<Pattern, PatternError> {
        check_chars(s)?;
        let wild = s.bytes().filter(|&b| b == b'*' || b == b'?').count();
        let kind = match wild {
            0 => Kind::Exact,
            1 if s.ends_with('*') => Kind::Prefix,
            _ => Kind::Glob,
        };
        Ok(Pattern {
            text: s.to_owned(),
            kind,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The literal text before the first wildcard: every matching channel
    /// starts with it, so it is a safe ZeroMQ SUB prefix.
    pub fn literal_prefix(&self) -> &str {
        match self.text.find(['*', '?']) {
            Some(i) => &self.text[..i],
            None => &self.text,
        }
    }

    /// Whether `channel` matches.
    pub fn matches(&self, channel: &str) -> bool {
        match self.kind {
            Kind::Exact => self.text == channel,
            Kind::Prefix => channel.starts_with(&self.text[..self.text.len() - 1]),
            Kind::Glob => glob_match(self.text.as_bytes(), channel.as_bytes()),
        }
    }
}

/// Anchored glob match with `*` (any run) and `?` (one byte), linear in
/// practice: on a mismatch it backtracks only to the last star.
fn glob_match(pat: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pat.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?}, {:?})", self.text, self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(p: &str, c: &str) -> bool {
        Pattern::parse(p).unwrap().matches(c)
    }

    #[test]
    fn exact_patterns_match_only_themselves() {
        assert!(m("billing::invoice::paid", "billing::invoice::paid"));
        assert!(!m("billing::invoice::paid", "billing::invoice::paid2"));
        assert!(!m("billing::invoice", "billing::invoice::paid"));
    }

    #[test]
    fn trailing_star_is_a_prefix() {
        assert!(m("billing::*", "billing::invoice::paid"));
        assert!(m("billing::*", "billing::"));
        assert!(!m("billing::*", "shipping::x"));
        assert!(m("*", "anything::at::all"));
    }

    #[test]
    fn globs_are_anchored_and_convert_every_star() {
        assert!(m("*::paid", "billing::invoice::paid"));
        assert!(!m("*::paid", "billing::paid::late"));
        assert!(m("*::invoice::*", "billing::invoice::paid"));
        assert!(!m("*::invoice::*", "billing::receipt::paid"));
        assert!(m("billing::?nvoice::*", "billing::invoice::x"));
        assert!(!m("billing::?nvoice::*", "billing::nvoice::x"));
        assert!(m("a*b*c", "aXXbYYc"));
        assert!(!m("a*b*c", "aXXbYY"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
    }

    #[test]
    fn literal_prefix_stops_at_the_first_wildcard() {
        assert_eq!(
            Pattern::parse("a::b::*").unwrap().literal_prefix(),
            "a::b::"
        );
        assert_eq!(Pattern::parse("*::x").unwrap().literal_prefix(), "");
        assert_eq!(Pattern::parse("a?b").unwrap().literal_prefix(), "a");
        assert_eq!(Pattern::parse("a::b").unwrap().literal_prefix(), "a::b");
    }

    #[test]
    fn bad_patterns_and_channels_are_refused() {
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        assert_eq!(Pattern::parse("a b"), Err(PatternError::BadChar(' ')));
        assert_eq!(
            Pattern::parse(&"a".repeat(MAX_CHANNEL_LEN + 1)),
            Err(PatternError::TooLong(MAX_CHANNEL_LEN + 1))
        );
        assert_eq!(validate_channel("a::*"), Err(PatternError::Wildcard));
        assert_eq!(validate_channel("a::b"), Ok(()));
    }

    proptest! {
        #[test]
        fn every_channel_matches_itself_and_star(c in "[a-z:]{1,30}") {
            prop_assert!(m(&c, &c));
            prop_assert!(m("*", &c));
            let prefixed = format!("{}*", c);
            prop_assert!(m(&prefixed, &c));
        }

        #[test]
        fn glob_agrees_with_a_regex_model(p in "[ab*?]{1,8}", c in "[ab]{0,10}") {
            let re = format!("^{}$", p.replace('?', ".").replace('*', ".*"));
            let model = regex_lite_match(&re, &c);
            prop_assert_eq!(glob_match(p.as_bytes(), c.as_bytes()), model);
        }
    }

    /// A tiny backtracking matcher for `^...$` with `.` and `.*` only: the
    /// reference the glob matcher is checked against.
    fn regex_lite_match(re: &str, text: &str) -> bool {
        fn go(p: &[u8], t: &[u8]) -> bool {
            match p {
                [b'$'] => t.is_empty(),
                [b'.', b'*', rest @ ..] => (0..=t.len()).any(|i| go(rest, &t[i..])),
                [b'.', rest @ ..] => !t.is_empty() && go(rest, &t[1..]),
                [c, rest @ ..] => t.first() == Some(c) && go(rest, &t[1..]),
                [] => true,
            }
        }
        go(&re.as_bytes()[1..], text.as_bytes())
    }
}
