//! Answers to `DISC`: what the mesh holds, aggregated from the cells of the
//! replicated view. Pure functions over [`Instance`]s.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Map, Value};
use thynapse_protocol::{Mode, Thid};

/// What `DISC` can ask for.
pub const WHATS: &[&str] = &[
    "services",
    "instances",
    "hosts",
    "regions",
    "versions",
    "topology",
    "metrics",
];

/// The label used where a cell has no value for a grouping key.
pub const NONE: &str = "(none)";

/// One listen of an instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceListen {
    /// The pattern.
    pub pattern: String,
    /// anycatch or multicatch.
    pub mode: Mode,
}

/// A cell anywhere in the mesh.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    /// The cell's THID.
    pub id: Thid,
    /// Its service.
    pub service: String,
    /// Its metadata, reserved keys included.
    pub metadata: Map<String, Value>,
    /// The transmitter it is connected to.
    pub transmitter: Thid,
    /// What it listens to.
    pub listens: Vec<InstanceListen>,
}

impl Instance {
    /// The text of metadata `key`, or [`NONE`].
    pub fn label(&self, key: &str) -> String {
        match self.metadata.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => NONE.to_owned(),
            Some(v) => v.to_string(),
        }
    }
}

/// The answer to `what` over `instances`, or `None` when `what` is not
/// one of [`WHATS`] or is `metrics`, which the router answers itself
/// from the transmitter's counters.
pub fn answer(what: &str, instances: &[Instance]) -> Option<Value> {
    let count_by = |key: &str, name: &str| {
        let mut counts: BTreeMap<String, (usize, BTreeMap<String, ()>)> = BTreeMap::new();
        for i in instances {
            let e = counts.entry(i.label(key)).or_default();
            e.0 += 1;
            e.1.insert(i.service.clone(), ());
        }
        Value::Array(
            counts
                .into_iter()
                .map(|(k, (n, services))| {
                    json!({name: k, "instances": n, "services": services.into_keys().collect::<Vec<_>>()})
                })
                .collect(),
        )
    };
    Some(match what {
        "instances" => serde_json::to_value(instances).expect("instances serialize"),
        "services" => {
            let mut services: BTreeMap<&str, (usize, BTreeMap<String, ()>)> = BTreeMap::new();
            for i in instances {
                let e = services.entry(&i.service).or_default();
                e.0 += 1;
                e.1.insert(i.label("version"), ());
            }
            Value::Array(
                services
                    .into_iter()
                    .map(|(s, (n, versions))| {
                        json!({"service": s, "instances": n, "versions": versions.into_keys().collect::<Vec<_>>()})
                    })
                    .collect(),
            )
        }
        "hosts" => count_by("host", "host"),
        "regions" => count_by("region", "region"),
        "versions" => {
            let mut versions: BTreeMap<(&str, String), usize> = BTreeMap::new();
            for i in instances {
                *versions
                    .entry((&i.service, i.label("version")))
                    .or_default() += 1;
            }
            Value::Array(
                versions
                    .into_iter()
                    .map(|((s, v), n)| json!({"service": s, "version": v, "instances": n}))
                    .collect(),
            )
        }
        "topology" => {
            type Tree =
                BTreeMap<String, BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<String>>>>>;
            let mut tree: Tree = BTreeMap::new();
            for i in instances {
                tree.entry(i.label("region"))
                    .or_default()
                    .entry(i.label("host"))
                    .or_default()
                    .entry(i.service.clone())
                    .or_default()
                    .entry(i.label("version"))
                    .or_default()
                    .push(i.id.to_hex());
            }
            serde_json::to_value(tree).expect("topology serializes")
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(service: &str, meta: Value) -> Instance {
        Instance {
            id: Thid::random(),
            service: service.to_owned(),
            metadata: meta.as_object().unwrap().clone(),
            transmitter: Thid::from_bytes([1; 20]),
            listens: Vec::new(),
        }
    }

    fn sample() -> Vec<Instance> {
        vec![
            instance(
                "backend",
                json!({"version": "2.0.0", "region": "eu", "host": "h1"}),
            ),
            instance(
                "backend",
                json!({"version": "1.0.0", "region": "eu", "host": "h2"}),
            ),
            instance("gateway", json!({"region": "us", "host": "h1"})),
        ]
    }

    #[test]
    fn services_count_instances_and_list_versions() {
        let v = answer("services", &sample()).unwrap();
        assert_eq!(
            v[0],
            json!({"service": "backend", "instances": 2, "versions": ["1.0.0", "2.0.0"]})
        );
        assert_eq!(
            v[1],
            json!({"service": "gateway", "instances": 1, "versions": [NONE]})
        );
    }

    #[test]
    fn hosts_regions_and_versions_group_cells() {
        let hosts = answer("hosts", &sample()).unwrap();
        assert_eq!(
            hosts[0],
            json!({"host": "h1", "instances": 2, "services": ["backend", "gateway"]})
        );
        let regions = answer("regions", &sample()).unwrap();
        assert_eq!(regions.as_array().unwrap().len(), 2);
        let versions = answer("versions", &sample()).unwrap();
        assert_eq!(
            versions[1],
            json!({"service": "backend", "version": "2.0.0", "instances": 1})
        );
    }

    #[test]
    fn topology_is_a_tree_from_region_to_cells() {
        let s = sample();
        let t = answer("topology", &s).unwrap();
        assert_eq!(t["eu"]["h1"]["backend"]["2.0.0"], json!([s[0].id.to_hex()]));
        assert_eq!(t["us"]["h1"]["gateway"][NONE], json!([s[2].id.to_hex()]));
    }

    #[test]
    fn unknown_questions_have_no_answer() {
        assert!(answer("moons", &sample()).is_none());
        assert_eq!(answer("instances", &[]).unwrap(), json!([]));
    }
}
