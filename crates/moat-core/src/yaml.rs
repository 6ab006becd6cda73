//! YAML with positions: the event stream of `yaml-rust2` folded into a small
//! spanned tree ([`Node`]) that keeps every key's and value's file:line:col,
//! the order of map keys, and how each scalar was written (plain or quoted).
//!
//! The loader converts this tree into the model; keeping our own tree (instead
//! of deserializing with serde) is what lets every diagnostic point at the
//! exact place. Parsing never panics and is bounded: nesting deeper than
//! [`MAX_DEPTH`] and alias expansion beyond [`MAX_NODES`] are errors, so a
//! hostile file can neither overflow the stack nor blow up memory.

use crate::diag::{Diagnostic, Loc};
use std::collections::HashMap;
use std::sync::Arc;
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Deepest nesting of maps and lists accepted.
pub const MAX_DEPTH: usize = 64;
/// Most nodes one file may hold, aliases expanded (stops "billion laughs").
pub const MAX_NODES: usize = 100_000;

/// A YAML value and where it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub loc: Loc,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Keys in file order; duplicates were reported and dropped.
    Map(Vec<Entry>),
    Seq(Vec<Node>),
    Scalar(Scalar),
}

/// One `key: value` pair of a map.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: String,
    pub key_loc: Loc,
    pub value: Node,
}

/// A scalar as written: its text, whether it was quoted or a block (and so is
/// always a string), and its tag if any.
#[derive(Clone, Debug, PartialEq)]
pub struct Scalar {
    pub text: String,
    pub plain: bool,
    pub tag: Option<String>,
}

/// A scalar's meaning under YAML 1.2's core schema.
#[derive(Clone, Debug, PartialEq)]
pub enum Typed<'a> {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a str),
}

impl Scalar {
    pub fn typed(&self) -> Typed<'_> {
        let t = self.text.as_str();
        match self.tag.as_deref() {
            Some("str") => return Typed::Str(t),
            Some("int") => return parse_int(t).map_or(Typed::Str(t), Typed::Int),
            _ => {}
        }
        if !self.plain {
            return Typed::Str(t);
        }
        match t {
            "" | "~" | "null" | "Null" | "NULL" => return Typed::Null,
            "true" | "True" | "TRUE" => return Typed::Bool(true),
            "false" | "False" | "FALSE" => return Typed::Bool(false),
            ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
                return Typed::Float(f64::INFINITY)
            }
            "-.inf" | "-.Inf" | "-.INF" => return Typed::Float(f64::NEG_INFINITY),
            ".nan" | ".NaN" | ".NAN" => return Typed::Float(f64::NAN),
            _ => {}
        }
        if let Some(i) = parse_int(t) {
            return Typed::Int(i);
        }
        let floaty = t.bytes().any(|b| b.is_ascii_digit())
            && t.bytes()
                .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
        if floaty {
            if let Ok(f) = t.parse::<f64>() {
                return Typed::Float(f);
            }
        }
        Typed::Str(t)
    }
}

fn parse_int(t: &str) -> Option<i128> {
    let (neg, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = digits.strip_prefix("0x") {
        (16, h)
    } else if let Some(o) = digits.strip_prefix("0o") {
        (8, o)
    } else {
        (10, digits)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = i128::from_str_radix(digits, radix).ok()?;
    Some(if neg { -v } else { v })
}

impl Node {
    pub fn as_map(&self) -> Option<&[Entry]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }
    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Seq(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_scalar(&self) -> Option<&Scalar> {
        match &self.value {
            Value::Scalar(s) => Some(s),
            _ => None,
        }
    }
    /// A null scalar (`~`, `null`, or nothing after `key:`).
    pub fn is_null(&self) -> bool {
        matches!(self.as_scalar().map(Scalar::typed), Some(Typed::Null))
    }
    /// "a map", "the string 'x'", ...: for "expected ..., found ..." messages.
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Map(_) => "a map".into(),
            Value::Seq(_) => "a list".into(),
            Value::Scalar(s) => match s.typed() {
                Typed::Null => "nothing (null)".into(),
                Typed::Bool(b) => format!("{b}"),
                Typed::Int(i) => format!("the number {i}"),
                Typed::Float(_) => format!("the number {}", s.text),
                Typed::Str(t) => format!("the string '{}'", shorten(t)),
            },
        }
    }
    fn size(&self) -> usize {
        match &self.value {
            Value::Map(m) => 1 + m.iter().map(|e| e.value.size()).sum::<usize>(),
            Value::Seq(s) => 1 + s.iter().map(Node::size).sum::<usize>(),
            Value::Scalar(_) => 1,
        }
    }
}

/// Cut long user text in messages.
pub fn shorten(t: &str) -> String {
    const MAX: usize = 40;
    if t.chars().count() <= MAX {
        t.to_string()
    } else {
        let s: String = t.chars().take(MAX).collect();
        format!("{s}...")
    }
}

enum Frame {
    Map {
        entries: Vec<Entry>,
        loc: Loc,
        anchor: usize,
        key: Option<(String, Loc)>,
        /// key → line of its first occurrence.
        seen: HashMap<String, u32>,
    },
    Seq {
        items: Vec<Node>,
        loc: Loc,
        anchor: usize,
    },
}

struct Builder<'a> {
    file: Arc<str>,
    prefix: &'a str,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    docs: usize,
    nodes: usize,
    diags: Vec<Diagnostic>,
}

/// Parse one file. Returns its root node (`None` for an empty file or a fatal
/// syntax error) and every problem found. `prefix` is the dotted field path of
/// the file's root (e.g. `domains.pro` for `domains/pro.yml`), used in messages.
pub fn parse(file: &Arc<str>, prefix: &str, text: &str) -> (Option<Node>, Vec<Diagnostic>) {
    let mut b = Builder {
        file: file.clone(),
        prefix,
        stack: Vec::new(),
        anchors: HashMap::new(),
        root: None,
        docs: 0,
        nodes: 0,
        diags: Vec::new(),
    };
    let mut parser = Parser::new_from_str(text);
    loop {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => break,
            Ok((ev, mark)) => {
                if let Err(d) = b.event(ev, mark) {
                    b.diags.push(d);
                    return (None, b.diags);
                }
            }
            Err(e) => {
                let loc = b.loc(e.marker());
                let mut d =
                    Diagnostic::error(Some(loc), "", format!("YAML syntax error: {}", e.info()));
                let line = text.lines().nth(e.marker().line().saturating_sub(1));
                d = if line.is_some_and(|l| l.contains('\t')) {
                    d.with_hint("YAML does not allow tabs for indentation: use spaces")
                } else {
                    d.with_hint("check the indentation and quoting around this place")
                };
                b.diags.push(d);
                return (None, b.diags);
            }
        }
    }
    (b.root, b.diags)
}

impl Builder<'_> {
    fn loc(&self, m: &Marker) -> Loc {
        let line = u32::try_from(m.line()).unwrap_or(u32::MAX).max(1);
        let col = u32::try_from(m.col()).unwrap_or(u32::MAX - 1) + 1;
        Loc {
            file: self.file.clone(),
            line,
            col,
        }
    }

    /// Dotted path of the value being built now (inside the innermost frame).
    fn path(&self) -> String {
        let mut p = self.prefix.to_string();
        for f in &self.stack {
            let part = match f {
                Frame::Map {
                    key: Some((k, _)), ..
                } => {
                    if !p.is_empty() {
                        p.push('.');
                    }
                    shorten(k)
                }
                Frame::Map { key: None, .. } => continue,
                Frame::Seq { items, .. } => format!("[{}]", items.len()),
            };
            p.push_str(&part);
        }
        p
    }

    fn count(&mut self, n: usize, loc: &Loc) -> Result<(), Diagnostic> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            return Err(Diagnostic::error(
                Some(loc.clone()),
                self.path(),
                format!("file too large: more than {MAX_NODES} YAML nodes (aliases expanded)"),
            )
            .with_hint("split the project into smaller files, or use fewer aliases"));
        }
        Ok(())
    }

    fn open(&mut self, loc: &Loc) -> Result<(), Diagnostic> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(Diagnostic::error(
                Some(loc.clone()),
                self.path(),
                format!("nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        self.count(1, loc)
    }

    fn event(&mut self, ev: Event, mark: Marker) -> Result<(), Diagnostic> {
        let loc = self.loc(&mark);
        match ev {
            Event::DocumentStart => {
                self.docs += 1;
                if self.docs > 1 {
                    return Err(Diagnostic::error(
                        Some(loc),
                        "",
                        "a second YAML document ('---'): a project file holds one document",
                    )
                    .with_hint("remove the '---' line or move the rest into its own file"));
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                self.count(1, &loc)?;
                let node = Node {
                    value: Value::Scalar(Scalar {
                        text,
                        plain: style == TScalarStyle::Plain,
                        tag: tag.map(tag_name),
                    }),
                    loc,
                };
                self.finish(node, anchor)?;
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                Some(n) => {
                    let mut n = n.clone();
                    self.count(n.size(), &loc)?;
                    n.loc = loc;
                    self.finish(n, 0)?;
                }
                None => {
                    return Err(Diagnostic::error(
                        Some(loc),
                        self.path(),
                        "alias to an unknown anchor",
                    ))
                }
            },
            Event::SequenceStart(anchor, _) => {
                self.open(&loc)?;
                self.stack.push(Frame::Seq {
                    items: Vec::new(),
                    loc,
                    anchor,
                });
            }
            Event::MappingStart(anchor, _) => {
                self.open(&loc)?;
                self.stack.push(Frame::Map {
                    entries: Vec::new(),
                    loc,
                    anchor,
                    key: None,
                    seen: HashMap::new(),
                });
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq { items, loc, anchor }) = self.stack.pop() {
                    self.finish(
                        Node {
                            value: Value::Seq(items),
                            loc,
                        },
                        anchor,
                    )?;
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map {
                    mut entries,
                    loc,
                    anchor,
                    ..
                }) = self.stack.pop()
                {
                    merge_keys(&mut entries);
                    self.finish(
                        Node {
                            value: Value::Map(entries),
                            loc,
                        },
                        anchor,
                    )?;
                }
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
        Ok(())
    }

    /// A complete node: place it in its parent (or make it the root).
    fn finish(&mut self, node: Node, anchor: usize) -> Result<(), Diagnostic> {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        // Only problems need the field path: build it (before borrowing the
        // frame) just then, so big documents cost no path copies.
        let needs_path = match self.stack.last() {
            Some(Frame::Map { key: None, .. }) => node.as_scalar().is_none(),
            Some(Frame::Map {
                key: Some((k, _)),
                seen,
                ..
            }) => seen.contains_key(k),
            _ => false,
        };
        let path = if needs_path {
            self.path()
        } else {
            String::new()
        };
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries, key, seen, ..
            }) => match key.take() {
                None => {
                    let text = match &node.value {
                        Value::Scalar(s) => s.text.clone(),
                        _ => {
                            self.diags.push(Diagnostic::error(
                                Some(node.loc.clone()),
                                path,
                                format!(
                                    "a map key must be a plain string, found {}",
                                    node.describe()
                                ),
                            ));
                            String::new()
                        }
                    };
                    *key = Some((text, node.loc));
                }
                Some((k, key_loc)) => {
                    if let Some(first) = seen.get(&k) {
                        self.diags.push(
                            Diagnostic::error(
                                Some(key_loc),
                                path,
                                format!(
                                    "duplicate key '{}' (first defined at line {first})",
                                    shorten(&k)
                                ),
                            )
                            .with_hint(
                                "remove one of the two; YAML keys must be unique within a map",
                            ),
                        );
                    } else {
                        seen.insert(k.clone(), key_loc.line);
                        entries.push(Entry {
                            key: k,
                            key_loc,
                            value: node,
                        });
                    }
                }
            },
        }
        Ok(())
    }
}

/// `yaml-rust2` keeps the tag handle (`!!`) apart; we only care about the name.
fn tag_name(t: Tag) -> String {
    let s = t.suffix;
    s.strip_prefix("tag:yaml.org,2002:")
        .map(str::to_string)
        .unwrap_or(s)
}

/// YAML 1.1 merge keys (`<<: *base`), which PyYAML (and so AnKLuMe) supports:
/// the merged map's keys are added unless the map sets them itself.
fn merge_keys(entries: &mut Vec<Entry>) {
    if !entries.iter().any(|e| e.key == "<<") {
        return;
    }
    let (merges, mut rest): (Vec<Entry>, Vec<Entry>) =
        entries.drain(..).partition(|e| e.key == "<<");
    for m in merges {
        let sources: Vec<Node> = match m.value.value {
            Value::Map(_) => vec![m.value],
            Value::Seq(s) => s,
            Value::Scalar(_) => {
                // Not mergeable: keep it, the loader reports it as an unknown key.
                rest.push(m);
                continue;
            }
        };
        for src in sources {
            if let Value::Map(es) = src.value {
                for e in es {
                    if !rest.iter().any(|r| r.key == e.key) {
                        rest.push(e);
                    }
                }
            }
        }
    }
    *entries = rest;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> (Option<Node>, Vec<Diagnostic>) {
        parse(&Arc::from("t.yml"), "", text)
    }

    #[test]
    fn positions_and_order() {
        let (n, d) = p("b: 1\na:\n  - x\n  - 'y'\n");
        assert!(d.is_empty(), "{d:?}");
        let n = n.expect("root");
        let m = n.as_map().expect("map");
        assert_eq!(m[0].key, "b");
        assert_eq!((m[1].key_loc.line, m[1].key_loc.col), (2, 1));
        let s = m[1].value.as_seq().expect("seq");
        assert_eq!((s[1].loc.line, s[1].loc.col), (4, 5));
        assert!(!s[1].as_scalar().expect("scalar").plain);
    }

    #[test]
    fn duplicate_keys() {
        let (_, d) = p("a:\n  x: 1\n  x: 2\n");
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].to_string().lines().next(),
            Some("error: t.yml:3:3: a.x: duplicate key 'x' (first defined at line 2)")
        );
    }

    #[test]
    fn syntax_error_has_position() {
        let (n, d) = p("a: [1, 2\nb: 3\n");
        assert!(n.is_none());
        assert!(d[0].loc.is_some());
        assert!(d[0].message.starts_with("YAML syntax error"));
    }

    #[test]
    fn typing() {
        let s = |t: &str, plain| Scalar {
            text: t.into(),
            plain,
            tag: None,
        };
        assert_eq!(s("12", true).typed(), Typed::Int(12));
        assert_eq!(s("12", false).typed(), Typed::Str("12"));
        assert_eq!(s("0x1f", true).typed(), Typed::Int(31));
        assert_eq!(s("", true).typed(), Typed::Null);
        assert_eq!(s("no", true).typed(), Typed::Str("no"));
        assert_eq!(s("10.100", true).typed(), Typed::Float(10.1));
        assert_eq!(s("1e3", true).typed(), Typed::Float(1000.0));
        assert_eq!(s("inf", true).typed(), Typed::Str("inf"));
    }

    #[test]
    fn billion_laughs_is_bounded() {
        let mut t = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..9 {
            let prev = if i == 0 {
                "a".to_string()
            } else {
                format!("l{}", i - 1)
            };
            t.push_str(&format!("l{i}: &l{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        let (n, d) = p(&t);
        assert!(n.is_none());
        assert!(d[0].message.contains("file too large"), "{d:?}");
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let t = "[".repeat(10_000);
        let (n, d) = p(&t);
        assert!(n.is_none());
        assert!(!d.is_empty());
    }

    #[test]
    fn merge_keys_apply() {
        let (n, d) = p("base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  y: 3\n");
        assert!(d.is_empty(), "{d:?}");
        let n = n.expect("root");
        let m = n.as_map().expect("map")[1]
            .value
            .as_map()
            .expect("map")
            .to_vec();
        let keys: Vec<_> = m.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["y", "x"]);
    }

    #[test]
    fn second_document_is_an_error() {
        let (_, d) = p("a: 1\n---\nb: 2\n");
        assert!(d[0].message.contains("second YAML document"));
    }
}
