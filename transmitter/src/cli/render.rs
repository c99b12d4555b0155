//! Turning answers into text: aligned tables with a header, the topology
//! as an indented tree, or pretty-printed JSON.

use std::io::{self, Write};

use serde_json::Value;

use super::exit::Failure;

/// How a command prints its answer.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Text for people: aligned columns with a header, a tree for
    /// `topology`, one line per event for `tail`.
    #[default]
    Table,
    /// JSON for programs.
    Json,
}

/// One column of a table: a header, where its value is in each row, and
/// how that value reads.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// The header text.
    header: &'static str,
    /// JSON pointer to the value within a row.
    pointer: &'static str,
    /// Turns the value (`Null` when absent) into the cell's text.
    text: fn(&Value) -> String,
}

/// A column showing the value at `pointer` with [`text`].
pub const fn column(header: &'static str, pointer: &'static str) -> Column {
    Column {
        header,
        pointer,
        text,
    }
}

/// The columns of `DISC instances`.
pub const INSTANCES: &[Column] = &[
    column("ID", "/id"),
    column("SERVICE", "/service"),
    column("VERSION", "/metadata/version"),
    column("REGION", "/metadata/region"),
    column("HOST", "/metadata/host"),
    column("TRANSMITTER", "/transmitter"),
    Column {
        text: listens,
        ..column("LISTENS", "/listens")
    },
];
/// The columns of `DISC services`.
pub const SERVICES: &[Column] = &[
    column("SERVICE", "/service"),
    column("INSTANCES", "/instances"),
    column("VERSIONS", "/versions"),
];
/// The columns of `DISC hosts`.
pub const HOSTS: &[Column] = &[
    column("HOST", "/host"),
    column("INSTANCES", "/instances"),
    column("SERVICES", "/services"),
];
/// The columns of `DISC regions`.
pub const REGIONS: &[Column] = &[
    column("REGION", "/region"),
    column("INSTANCES", "/instances"),
    column("SERVICES", "/services"),
];
/// The columns of `DISC versions`.
pub const VERSIONS: &[Column] = &[
    column("SERVICE", "/service"),
    column("VERSION", "/version"),
    column("INSTANCES", "/instances"),
];
/// The columns of `DISC metrics`, one row per counter.
pub const COUNTERS: &[Column] = &[column("COUNTER", "/counter"), column("VALUE", "/value")];
/// The columns of the answer to a confirmed `EVNT` or a `SEND`.
pub const ROUTED: &[Column] = &[column("ID", "/id"), column("ROUTED", "/routed")];

/// What each level of the topology tree is.
const TOPOLOGY_LEVELS: &[&str] = &["region", "host", "service", "version", "cell"];

/// What to print, and in which shape.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// A table with these columns, one row per element of the answer (or
    /// one row for an answer that is a single object).
    Table(&'static [Column]),
    /// The topology tree.
    Tree,
}

/// Writes `value` to stdout in `format`, as `shape` says for tables.
///
/// # Errors
/// [`Failure::Local`] when stdout cannot be written, except a closed pipe
/// (`| head`), which ends the output quietly.
pub fn print(value: &Value, format: Format, shape: Shape) -> Result<(), Failure> {
    let text = match (format, shape) {
        (Format::Json, _) => pretty(value),
        (Format::Table, Shape::Table(columns)) => table(value, columns),
        (Format::Table, Shape::Tree) => tree(value),
    };
    write_stdout(&text)
}

/// Writes `text` to stdout and flushes it.
///
/// # Errors
/// As [`print()`].
pub fn write_stdout(text: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(Failure::local("writing the output", e))
        }
        _ => Ok(()),
    }
}

/// `value` as indented JSON, with a final newline.
fn pretty(value: &Value) -> String {
    // Serializing a `Value` to a string cannot fail.
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// Rows of `value` under a header, columns aligned; an array gives one row
/// per element, anything else one row.
pub fn table(value: &Value, columns: &[Column]) -> String {
    let rows: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let mut lines: Vec<Vec<String>> = vec![columns.iter().map(|c| c.header.to_owned()).collect()];
    lines.extend(rows.iter().map(|row| {
        columns
            .iter()
            .map(|c| (c.text)(row.pointer(c.pointer).unwrap_or(&Value::Null)))
            .collect()
    }));
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in lines {
        let mut text = String::new();
        for (cell, width) in line.iter().zip(&widths) {
            text.push_str(&format!("{cell:<width$}  "));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

/// The topology (region → host → service → version → cells) as an
/// indented tree, each line naming its level: `region eu`, `  host
/// 10.0.0.7`, ...
pub fn tree(value: &Value) -> String {
    let mut out = String::new();
    branch(value, 0, &mut out);
    out
}

fn branch(value: &Value, depth: usize, out: &mut String) {
    let level = TOPOLOGY_LEVELS
        .get(depth)
        .or(TOPOLOGY_LEVELS.last())
        .copied()
        .unwrap_or_default();
    let indent = "  ".repeat(depth);
    match value {
        Value::Object(children) => {
            for (name, child) in children {
                out.push_str(&format!("{indent}{level} {name}\n"));
                branch(child, depth + 1, out);
            }
        }
        Value::Array(leaves) => {
            for leaf in leaves {
                out.push_str(&format!("{indent}{level} {}\n", text(leaf)));
            }
        }
        other => out.push_str(&format!("{indent}{}\n", text(other))),
    }
}

/// A JSON value as one table cell: strings bare, lists joined with `,`,
/// absent as `-`, anything else as compact JSON.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".to_owned(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// An instance's listens as `pattern(mode)` joined with `,`.
fn listens(value: &Value) -> String {
    let Some(items) = value.as_array().filter(|l| !l.is_empty()) else {
        return "-".to_owned();
    };
    items
        .iter()
        .map(|l| format!("{}({})", text(&l["pattern"]), text(&l["mode"])))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_columns_under_a_header() {
        let v = json!([
            {"service": "backend", "instances": 2, "versions": ["1.0.0", "2.1.0"]},
            {"service": "gw", "instances": 10, "versions": []},
        ]);
        assert_eq!(
            table(&v, SERVICES),
            "SERVICE  INSTANCES  VERSIONS\n\
             backend  2          1.0.0,2.1.0\n\
             gw       10         -\n"
        );
        assert_eq!(table(&json!([]), VERSIONS), "SERVICE  VERSION  INSTANCES\n");
    }

    #[test]
    fn a_single_object_is_one_row() {
        let v = json!({"id": "ab", "routed": 1});
        assert_eq!(table(&v, ROUTED), "ID  ROUTED\nab  1\n");
    }

    #[test]
    fn instances_show_metadata_and_listens() {
        let v = json!([{
            "id": "c1", "service": "s", "transmitter": "t",
            "metadata": {"version": "1", "host": "h"},
            "listens": [{"pattern": "a::*", "mode": "any"}, {"pattern": "b", "mode": "multi"}],
        }]);
        let t = table(&v, INSTANCES);
        let row = t.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["c1", "s", "1", "-", "h", "t", "a::*(any),b(multi)"]);
    }

    #[test]
    fn the_topology_is_an_indented_tree() {
        let v = json!({"eu": {"h1": {"backend": {"1.0.0": ["c1", "c2"]}}}});
        assert_eq!(
            tree(&v),
            "region eu\n  host h1\n    service backend\n      version 1.0.0\n        cell c1\n        cell c2\n"
        );
    }
}
