//! Topology documents: the module's example parses, and every mistake is
//! named in the error.

use std::net::Ipv4Addr;

use score_core::topology::{PAPER_WEIGHTS, Topology, TopologyError};

const EXAMPLE: &str = r#"
# two pods of two racks; depth 3 (rack, pod, core), so three weights
weights = [1.0, 2.718281828459045, 20.085536923187668]

[[children]]            # a pod
name = "pod-a"
[[children.children]]   # a rack in pod-a
hosts = ["10.0.0.1", "10.0.0.2"]
[[children.children]]
hosts = ["10.0.0.3", "10.0.0.4"]

[[children]]
name = "pod-b"
[[children.children]]
hosts = ["10.0.1.1", "10.0.1.2"]
[[children.children]]
hosts = ["10.0.1.3"]
"#;

fn host(t: &Topology, a: &str) -> u32 {
    t.host_by_addr(a.parse::<Ipv4Addr>().unwrap()).unwrap()
}

#[test]
fn documented_example_parses() {
    let t = Topology::from_toml_str(EXAMPLE).unwrap();
    assert_eq!(t.host_count(), 7);
    assert_eq!(t.depth(), 3);
    assert_eq!(t.group_count(1), 4);
    assert_eq!(t.group_count(2), 2);
    assert_eq!(t.level(host(&t, "10.0.0.1"), host(&t, "10.0.0.2")), 1);
    assert_eq!(t.level(host(&t, "10.0.0.1"), host(&t, "10.0.0.4")), 2);
    assert_eq!(t.level(host(&t, "10.0.0.4"), host(&t, "10.0.1.3")), 3);
    assert_eq!(t.level(host(&t, "10.0.1.3"), host(&t, "10.0.1.3")), 0);
    // Hosts are numbered in file order; the last rack has one host.
    assert_eq!(t.host_addr(6), Ipv4Addr::new(10, 0, 1, 3));
    assert_eq!(t.group_hosts(1, 3), 6..7);
    assert_eq!(t.group_of(6, 2), 1);
    assert_eq!(t.weight(0, 6), 1.0 + PAPER_WEIGHTS[1] + PAPER_WEIGHTS[2]);
}

#[test]
fn json_and_default_weights() {
    let json = r#"{"children": [
        {"hosts": ["192.168.0.1", "192.168.0.2"]},
        {"hosts": ["192.168.0.3"]}
    ]}"#;
    let t = Topology::from_json_str(json).unwrap();
    assert_eq!(t.depth(), 2);
    // No weights: the paper's first two.
    assert_eq!(t.weights().weights(), &PAPER_WEIGHTS[..2]);
    assert_eq!(t.level(0, 2), 2);
}

#[test]
fn regular_shorthand() {
    let t = Topology::from_toml_str(
        "regular = { fanout = [20, 8, 4, 4], first_host = \"10.0.0.1\" }\n",
    )
    .unwrap();
    assert_eq!(t.host_count(), 2560);
    assert_eq!(t.weights().weights(), &PAPER_WEIGHTS);
    assert_eq!(t.host_addr(2559), Ipv4Addr::new(10, 0, 10, 0));
}

fn err(text: &str) -> TopologyError {
    Topology::from_toml_str(text).unwrap_err()
}

#[test]
fn duplicate_host_is_named() {
    let e = err(r#"
[[children]]
hosts = ["10.0.0.1", "10.0.0.2"]
[[children]]
name = "r2"
hosts = ["10.0.0.2"]
"#);
    assert!(
        matches!(&e, TopologyError::DuplicateHost { addr, .. } if *addr == Ipv4Addr::new(10, 0, 0, 2))
    );
    let msg = e.to_string();
    assert!(msg.contains("duplicate host 10.0.0.2"), "{msg}");
    assert!(msg.contains("children[1] (\"r2\")"), "{msg}");
}

#[test]
fn uneven_depth_is_named() {
    let e = err(r#"
[[children]]
name = "pod-a"
[[children.children]]
hosts = ["10.0.0.1"]
[[children]]
name = "lonely-rack"
hosts = ["10.0.0.2"]
"#);
    assert_eq!(
        e,
        TopologyError::UnevenDepth {
            path: "root.children[1] (\"lonely-rack\")".into(),
            expected: 2,
            found: 1,
        }
    );
    assert!(e.to_string().starts_with("uneven depth"));
}

#[test]
fn weight_mistakes_are_named() {
    let e = err("weights = [1.0, 2.0]\nhosts = [\"10.0.0.1\"]\n");
    assert_eq!(
        e,
        TopologyError::WeightsCount {
            weights: 2,
            depth: 1
        }
    );
    assert_eq!(
        e.to_string(),
        "2 link weights given but the tree has depth 1"
    );
    let e = err("weights = [-1.0]\nhosts = [\"10.0.0.1\"]\n");
    assert!(matches!(e, TopologyError::BadWeight { level: 1, value } if value == -1.0));
    let e = err("weights = []\nhosts = [\"10.0.0.1\"]\n");
    assert_eq!(e, TopologyError::NoWeights);
    // Five levels and no weights: the paper only has four.
    let deep = r#"
[[children]]
[[children.children]]
[[children.children.children]]
[[children.children.children.children]]
hosts = ["10.0.0.1"]
"#;
    assert_eq!(err(deep), TopologyError::WeightsRequired { depth: 5 });
}

#[test]
fn malformed_nodes_are_named() {
    let e = err(
        "[[children]]\nhosts = [\"10.0.0.1\"]\n[[children.children]]\nhosts = [\"10.0.0.2\"]\n",
    );
    assert_eq!(
        e,
        TopologyError::MixedNode {
            path: "root.children[0]".into()
        }
    );
    let e = err("[[children]]\nhosts = [\"10.0.0.1\"]\n[[children]]\nname = \"x\"\n");
    assert_eq!(
        e,
        TopologyError::EmptyNode {
            path: "root.children[1] (\"x\")".into()
        }
    );
    assert_eq!(
        err(""),
        TopologyError::EmptyNode {
            path: "root".into()
        }
    );
    let e = err("regular = { fanout = [2], first_host = \"10.0.0.1\" }\nhosts = [\"10.0.0.9\"]\n");
    assert_eq!(e, TopologyError::RegularAndTree);
    let e = err("regular = { fanout = [2, 0], first_host = \"10.0.0.1\" }\n");
    assert!(matches!(e, TopologyError::BadFanout { .. }));
}

#[test]
fn syntax_errors_say_what_is_wrong() {
    let e = err("hosts = [\"10.0.0.300\"]\n");
    assert!(
        matches!(&e, TopologyError::Parse(m) if m.contains("invalid IPv4 address syntax")),
        "{e}"
    );
    let e = err("hosts = [\"10.0.0.1\"]\nrack = 3\n");
    assert!(
        matches!(&e, TopologyError::Parse(m) if m.contains("unknown field `rack`")),
        "{e}"
    );
    let e = Topology::from_json_str("{\"children\": [}").unwrap_err();
    assert!(matches!(e, TopologyError::Parse(_)));
}
