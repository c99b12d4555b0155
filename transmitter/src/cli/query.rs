//! The `where` of `DISC` and `SEND`, from the filter flags.
//!
//! `--version V`, `--region R` and `--host H` are selector terms
//! (`version=V`, ...) joined with `,` to `--where`, which is either a
//! selector string or a JSON query object; with a JSON query the terms go
//! into its `ops` (as a string appended to a string, as per-key ops
//! appended to an array). The transmitter parses and checks the result: a
//! bad query is its `bad_query`.

use serde_json::{json, Map, Value};

/// Flags that narrow which cells a command is about.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Filters {
    /// Only cells whose metadata `version` is VERSION (the term
    /// `version=VERSION`).
    #[arg(long)]
    pub version: Option<String>,
    /// Only cells whose metadata `region` is REGION.
    #[arg(long)]
    pub region: Option<String>,
    /// Only cells whose `host` (the address they connect from) is HOST.
    #[arg(long)]
    pub host: Option<String>,
    /// Only cells whose metadata matches QUERY: a selector such as
    /// 'version>=2.0.0,region in (eu,us),!canary', or a JSON query object
    /// such as '{"ops":[{"path":"/load","op":"$lt","to":0.5}]}'.
    #[arg(long = "where", value_name = "QUERY", value_parser = parse_where)]
    pub query: Option<Value>,
}

/// One condition on a cell's metadata.
#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    /// The value at the key equals the text.
    Is(&'static str, String),
    /// The key is absent.
    Absent(&'static str),
}

impl Term {
    /// The selector spelling: `key=value` (quoted when needed) or `!key`.
    fn selector(&self) -> String {
        match self {
            Term::Is(key, value) => format!("{key}={}", selector_value(value)),
            Term::Absent(key) => format!("!{key}"),
        }
    }

    /// The JSON per-key spelling: `{"key": value}` or `{"key": {"$exists":
    /// false}}`.
    fn op(&self) -> Value {
        match self {
            Term::Is(key, value) => json!({ *key: value }),
            Term::Absent(key) => json!({ *key: {"$exists": false} }),
        }
    }
}

impl Filters {
    /// The terms of the `--version`, `--region` and `--host` flags.
    pub fn terms(&self) -> Vec<Term> {
        [
            ("version", &self.version),
            ("region", &self.region),
            ("host", &self.host),
        ]
        .into_iter()
        .filter_map(|(key, value)| Some(Term::Is(key, value.clone()?)))
        .collect()
    }

    /// The `where` field: `--where` with the flags' terms and `extra`
    /// added; `None` when there is nothing to ask.
    pub fn query(&self, extra: &[Term]) -> Option<Value> {
        let mut terms = self.terms();
        terms.extend_from_slice(extra);
        with_terms(self.query.clone(), &terms)
    }
}

/// `query` with every term of `terms` added (all must hold).
fn with_terms(query: Option<Value>, terms: &[Term]) -> Option<Value> {
    if terms.is_empty() {
        return query;
    }
    let selector = || {
        terms
            .iter()
            .map(Term::selector)
            .collect::<Vec<_>>()
            .join(",")
    };
    let append = |s: &str| {
        if s.trim().is_empty() {
            selector()
        } else {
            format!("{s},{}", selector())
        }
    };
    Some(match query {
        None => Value::String(selector()),
        Some(Value::String(s)) => Value::String(append(&s)),
        Some(Value::Object(mut q)) => {
            let ops = match q.remove("ops") {
                None => Value::String(selector()),
                Some(Value::String(s)) => Value::String(append(&s)),
                Some(Value::Array(mut ops)) => {
                    ops.extend(terms.iter().map(Term::op));
                    Value::Array(ops)
                }
                // Not ops at all: left for the transmitter to refuse.
                Some(other) => other,
            };
            q.insert("ops".to_owned(), ops);
            Value::Object(q)
        }
        // `parse_where` makes only strings and objects.
        Some(other) => other,
    })
}

/// A selector value as is when it is a plain word, else double-quoted with
/// `\` escaping `\` and `"`.
fn selector_value(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || ",()\"!=<>\\".contains(c));
    if plain {
        return value.to_owned();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// Reads `--where`: text starting with `{` must be a JSON object; anything
/// else is a selector string.
fn parse_where(text: &str) -> Result<Value, String> {
    if !text.trim_start().starts_with('{') {
        return Ok(Value::String(text.to_owned()));
    }
    serde_json::from_str::<Map<String, Value>>(text)
        .map(Value::Object)
        .map_err(|e| format!("a --where starting with '{{' is a JSON query object: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use thynapse_protocol::query::Query;

    fn filters(query: Option<&str>) -> Filters {
        Filters {
            version: Some("2.0.0".to_owned()),
            region: Some("eu west".to_owned()),
            query: query.map(|q| parse_where(q).unwrap()),
            ..Filters::default()
        }
    }

    /// Whether the query `q` (as the transmitter reads it) matches `meta`.
    fn matches(q: &Value, meta: Value) -> bool {
        Query::from_json(q)
            .unwrap()
            .matches(meta.as_object().unwrap())
    }

    #[test]
    fn flags_become_selector_terms_joined_to_the_where() {
        let f = filters(Some("tier=gold"));
        let q = f.query(&[Term::Absent("a.b")]).unwrap();
        assert_eq!(q, json!(r#"tier=gold,version=2.0.0,region="eu west",!a.b"#));
        assert!(matches(
            &q,
            json!({"tier": "gold", "version": "2.0.0", "region": "eu west"})
        ));
        assert!(!matches(
            &q,
            json!({"tier": "gold", "version": "2.0.0", "region": "eu west", "a.b": true})
        ));
    }

    #[test]
    fn no_flags_and_no_where_ask_nothing() {
        assert_eq!(Filters::default().query(&[]), None);
        let only_where = Filters {
            query: Some(json!("x>1")),
            ..Filters::default()
        };
        assert_eq!(only_where.query(&[]), Some(json!("x>1")));
    }

    #[test]
    fn terms_join_json_queries_as_ops() {
        let f = filters(Some(
            r#"{"ops":[{"path":"/load","op":"$lt","to":0.5}],"key":"k"}"#,
        ));
        let q = f.query(&[Term::Absent("a.b")]).unwrap();
        assert_eq!(q["key"], "k");
        assert_eq!(q["ops"].as_array().unwrap().len(), 4);
        let meta = json!({"load": 0.1, "version": "2.0.0", "region": "eu west"});
        assert!(matches(&q, meta));
        assert!(!matches(&q, json!({"load": 0.1, "version": "2.0.0"})));

        let q = filters(Some(r#"{"ops":"load<1"}"#)).query(&[]).unwrap();
        assert_eq!(q["ops"], json!(r#"load<1,version=2.0.0,region="eu west""#));
        let q = filters(Some("{}")).query(&[]).unwrap();
        assert!(matches(
            &q,
            json!({"version": "2.0.0", "region": "eu west"})
        ));
    }

    #[test]
    fn odd_values_are_quoted() {
        assert_eq!(selector_value("1.2.3-rc.1"), "1.2.3-rc.1");
        assert_eq!(selector_value(""), r#""""#);
        assert_eq!(selector_value(r#"a"b\c,d"#), r#""a\"b\\c,d""#);
        let q = Value::String(format!("k={}", selector_value(r#"a"b\c,d"#)));
        assert!(matches(&q, json!({"k": r#"a"b\c,d"#})));
    }

    #[test]
    fn a_where_in_braces_must_be_a_json_object() {
        assert_eq!(parse_where("version>=2").unwrap(), json!("version>=2"));
        assert!(parse_where(r#"{"ops":[]}"#).unwrap().is_object());
        let e = parse_where("{ops").unwrap_err();
        assert!(e.contains("JSON query object"), "{e}");
    }
}
