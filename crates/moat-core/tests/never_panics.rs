//! Property tests: the loader returns (Ok or diagnostics) and never panics,
//! on arbitrary text and on valid documents with random edits.

use moat_core::load::{load_files, load_str};
use proptest::prelude::*;
use std::path::Path;

const MOAT: &str = include_str!("data/moat-full.yml");
const ANKLUME_DOMAIN: &str = "description: x\ntrust_level: trusted\nprofiles:\n  p: {devices: {d: {type: proxy}}}\nmachines:\n  a:\n    type: lxc\n    ip: \"10.100.1.5\"\n    config: {limits.cpu: \"2\", limits.memory: 1GB}\n    profiles: [default, p]\n    roles: [base]\n    vars: {k: [1, 2]}\n";
const POLICIES: &str = "policies:\n  - {from: pro, to: host, ports: [22], protocol: udp}\n  - {from: pro-a, to: pro, ports: all, bidirectional: true}\n";

/// One edit of a document.
#[derive(Clone, Debug)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, String),
    DupLine(usize),
    SwapLines(usize, usize),
    Indent(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let token = prop_oneof![
        Just(":".to_string()),
        Just("- ".to_string()),
        Just("\n".to_string()),
        Just("  ".to_string()),
        Just("\t".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("{".to_string()),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        Just("<<: *a\n".to_string()),
        Just("'".to_string()),
        Just("\"".to_string()),
        Just("0".to_string()),
        Just("---\n".to_string()),
        Just("!!str ".to_string()),
        "[a-z_.-]{1,12}",
        "\\PC{0,8}",
    ];
    prop_oneof![
        (any::<usize>(), 0usize..40).prop_map(|(a, n)| Edit::Delete(a, n)),
        (any::<usize>(), token).prop_map(|(a, t)| Edit::Insert(a, t)),
        any::<usize>().prop_map(Edit::DupLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        (any::<usize>(), 0usize..6).prop_map(|(a, n)| Edit::Indent(a, n)),
    ]
}

fn apply(doc: &str, edits: &[Edit]) -> String {
    let mut s = doc.to_string();
    for e in edits {
        let boundary = |s: &str, i: usize| {
            let mut i = if s.is_empty() { 0 } else { i % (s.len() + 1) };
            while !s.is_char_boundary(i) {
                i -= 1;
            }
            i
        };
        match e {
            Edit::Delete(a, n) => {
                let a = boundary(&s, *a);
                let b = boundary(&s, a.saturating_add(*n).min(s.len()));
                s.replace_range(a..b.max(a), "");
            }
            Edit::Insert(a, t) => {
                let a = boundary(&s, *a);
                s.insert_str(a, t);
            }
            Edit::DupLine(i) | Edit::Indent(i, _) | Edit::SwapLines(i, _) => {
                let mut lines: Vec<String> = s.lines().map(str::to_string).collect();
                if lines.is_empty() {
                    continue;
                }
                let i = i % lines.len();
                match e {
                    Edit::DupLine(_) => lines.insert(i, lines[i].clone()),
                    Edit::Indent(_, n) => {
                        lines[i] = format!("{}{}", " ".repeat(*n), lines[i].trim_start())
                    }
                    Edit::SwapLines(_, j) => {
                        let j = j % lines.len();
                        lines.swap(i, j);
                    }
                    _ => {}
                }
                s = lines.join("\n");
            }
        }
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,400}") {
        let _ = load_str("moat.yml", &s);
        let _ = load_str("anklume.yml", &s);
    }

    #[test]
    fn yamlish_text_never_panics(s in "[a-z:\\-\\[\\]{}, \n&*!'\"#|>0-9.]{0,300}") {
        let _ = load_str("moat.yml", &s);
        let files: &[(&str, &[u8])] = &[("anklume.yml", b"schema_version: 1\n"), ("domains/pro.yml", s.as_bytes())];
        let _ = load_files(Path::new("/p/x"), "anklume.yml", files);
    }

    #[test]
    fn mutated_moat_never_panics(edits in prop::collection::vec(edit(), 1..8)) {
        let doc = apply(MOAT, &edits);
        // Errors always say where: every problem here is inside the file.
        if let Err(d) = load_str("moat.yml", &doc) {
            prop_assert!(d.0.iter().all(|x| x.loc.is_some()), "{}", d);
        }
    }

    #[test]
    fn mutated_anklume_never_panics(
        dom in prop::collection::vec(edit(), 0..6),
        pol in prop::collection::vec(edit(), 0..4),
    ) {
        let d = apply(ANKLUME_DOMAIN, &dom);
        let p = apply(POLICIES, &pol);
        let files: &[(&str, &[u8])] = &[
            ("anklume.yml", b"schema_version: 1\ndefaults: {os_image: 'images:debian/13'}\n"),
            ("domains/pro.yml", d.as_bytes()),
            ("policies.yml", p.as_bytes()),
        ];
        let _ = load_files(Path::new("/p/x"), "anklume.yml", files);
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..300)) {
        let files: &[(&str, &[u8])] = &[("moat.yml", &b)];
        let _ = load_files(Path::new("."), "moat.yml", files);
    }
}

/// Regression inputs (from fuzzing and property testing) that once went wrong.
#[test]
fn regressions() {
    for input in [
        "",
        "~",
        "a",
        "[",
        "{a: *b}",
        "? [a]\n: 1\n",
        "domains: {a: {machines: {b: ~}}}\n",
        "<<: 1\n",
        "domains:\n  a:\n    <<: {machines: {x: {}}}\n",
    ] {
        let _ = load_str("moat.yml", input);
        let _ = load_str("anklume.yml", input);
    }
}
