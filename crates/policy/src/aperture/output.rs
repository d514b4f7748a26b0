//! The Sluice policy being written: an ordered YAML tree, so that the file
//! reads in the order of docs/policy.md (name first, selectors before
//! parameters) rather than in the alphabetical order of a JSON map.

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_saphyr::{Commented, FlowMap, FlowSeq};

/// A YAML value of the policy written.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Node {
    /// A block mapping, keys in the order given.
    Map(Vec<(String, Node)>),
    /// A mapping written on one line (`{a: 1, b: 2}`): selectors, small
    /// parameter sets.
    FlowMap(Vec<(String, Node)>),
    /// A block sequence.
    List(Vec<Node>),
    /// A sequence written on one line (`[a, b]`).
    FlowList(Vec<Node>),
    /// Text (quoted by the serializer wherever YAML would read it as
    /// something else).
    Str(String),
    /// A whole number, written without a fraction.
    Int(i64),
    /// Any other number.
    Float(f64),
    /// `true` or `false`.
    Bool(bool),
    /// A value with a comment after it on its line.
    Commented(Box<Node>, String),
}

impl Node {
    /// Text.
    pub(super) fn str(s: impl Into<String>) -> Node {
        Node::Str(s.into())
    }

    /// A number, whole numbers written as such (`40`, not `40.0`).
    pub(super) fn num(v: f64) -> Node {
        if v.fract() == 0.0 && v.abs() < 9.0e15 {
            Node::Int(v as i64)
        } else {
            Node::Float(v)
        }
    }
}

/// Builds a block mapping from `(key, value)` pairs, leaving out `None`s.
pub(super) fn map<const N: usize>(entries: [(&str, Option<Node>); N]) -> Node {
    Node::Map(entries_of(entries))
}

/// Builds a one-line mapping from `(key, value)` pairs, leaving out `None`s.
pub(super) fn flow_map<const N: usize>(entries: [(&str, Option<Node>); N]) -> Node {
    Node::FlowMap(entries_of(entries))
}

fn entries_of<const N: usize>(entries: [(&str, Option<Node>); N]) -> Vec<(String, Node)> {
    entries
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
        .collect()
}

/// A node and whether it sits inside a flow collection: serde-saphyr's
/// flow wrappers nest badly (a flow mapping in a flow mapping leaves the
/// serializer in flow style for the siblings that follow), and inside a
/// flow collection everything is written in flow style anyway, so only the
/// outermost one is wrapped.
struct Styled<'a> {
    /// What is written.
    node: &'a Node,
    /// Whether a flow collection holds it (so it is not wrapped again).
    in_flow: bool,
}

/// A mapping's entries, for `serialize_map`.
struct Entries<'a> {
    /// The entries, in order.
    entries: &'a [(String, Node)],
    /// Whether the mapping is (inside) a flow collection.
    in_flow: bool,
}

impl Serialize for Entries<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.entries.len()))?;
        for (k, node) in self.entries {
            m.serialize_entry(
                k,
                &Styled {
                    node,
                    in_flow: self.in_flow,
                },
            )?;
        }
        m.end()
    }
}

/// A sequence's items, for `serialize_seq`.
struct Items<'a> {
    /// The items, in order.
    items: &'a [Node],
    /// Whether the sequence is (inside) a flow collection.
    in_flow: bool,
}

impl Serialize for Items<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut l = s.serialize_seq(Some(self.items.len()))?;
        for node in self.items {
            l.serialize_element(&Styled {
                node,
                in_flow: self.in_flow,
            })?;
        }
        l.end()
    }
}

impl Serialize for Styled<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let in_flow = self.in_flow;
        match self.node {
            Node::Map(entries) => Entries { entries, in_flow }.serialize(s),
            Node::FlowMap(entries) if in_flow => Entries { entries, in_flow }.serialize(s),
            Node::FlowMap(entries) => FlowMap(Entries {
                entries,
                in_flow: true,
            })
            .serialize(s),
            Node::List(items) => Items { items, in_flow }.serialize(s),
            Node::FlowList(items) if in_flow => Items { items, in_flow }.serialize(s),
            Node::FlowList(items) => FlowSeq(Items {
                items,
                in_flow: true,
            })
            .serialize(s),
            Node::Str(v) => s.serialize_str(v),
            Node::Int(v) => s.serialize_i64(*v),
            Node::Float(v) => s.serialize_f64(*v),
            Node::Bool(v) => s.serialize_bool(*v),
            Node::Commented(node, c) if !in_flow => Commented(
                Styled {
                    node: node.as_ref(),
                    in_flow,
                },
                c.clone(),
            )
            .serialize(s),
            Node::Commented(node, _) => Styled {
                node: node.as_ref(),
                in_flow,
            }
            .serialize(s),
        }
    }
}

/// The YAML text of `node`.
pub(super) fn to_yaml(node: &Node) -> Result<String, String> {
    let styled = Styled {
        node,
        in_flow: false,
    };
    serde_saphyr::to_string(&styled).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_flow_collections_leave_the_next_siblings_in_block_style() {
        let item = |n: &str| {
            Node::Map(vec![
                (
                    "name".into(),
                    Node::Commented(Box::new(Node::str(n)), "from here".into()),
                ),
                (
                    "selectors".into(),
                    Node::List(vec![flow_map([
                        ("control_point", Some(Node::str("egress"))),
                        (
                            "m",
                            Some(flow_map([(
                                "a",
                                Some(Node::FlowList(vec![flow_map([("c", Some(Node::Int(1)))])])),
                            )])),
                        ),
                    ])]),
                ),
                ("x".into(), Node::num(0.5)),
            ])
        };
        let doc = map([("items", Some(Node::List(vec![item("a"), item("b")])))]);
        assert_eq!(
            to_yaml(&doc).expect("serializes"),
            "items:\n\
             - name: a # from here\n  selectors:\n  - {control_point: egress, m: {a: [{c: 1}]}}\n  x: 0.5\n\
             - name: b # from here\n  selectors:\n  - {control_point: egress, m: {a: [{c: 1}]}}\n  x: 0.5\n"
        );
    }
}
