//! The invalid-project corpus: every folder under `tests/invalid/` is one
//! project whose `expected` file lists the exact diagnostics (first line of
//! each, i.e. without `hint:` lines) that `moat_core::check` reports for it.
//! See tests/invalid/README.md. `UPDATE_EXPECT=1 cargo test -p moat-core --test
//! corpus` rewrites the expected files from the current output.

use moat_core::model::Allocations;
use std::path::{Path, PathBuf};

fn actual(dir: &Path) -> String {
    // Load first: projects that fail there never reach allocation.
    let diags = match moat_core::load::load(dir) {
        Err(d) => d,
        Ok(_) => match moat_core::check(dir, &Allocations::default(), "/var/lib/moat") {
            Ok((_, warnings)) => warnings,
            Err(d) => d,
        },
    };
    let mut out = String::new();
    for d in &diags.0 {
        let s = d.to_string();
        out.push_str(s.lines().next().unwrap_or_default());
        out.push('\n');
    }
    out
}

fn view(expected: &str, actual: &str) -> String {
    let mut s = String::from("--- expected\n+++ actual\n");
    let (e, a): (Vec<&str>, Vec<&str>) = (expected.lines().collect(), actual.lines().collect());
    // Longest common subsequence, for a readable unified view.
    let mut l = vec![vec![0usize; a.len() + 1]; e.len() + 1];
    for i in (0..e.len()).rev() {
        for j in (0..a.len()).rev() {
            l[i][j] = if e[i] == a[j] {
                l[i + 1][j + 1] + 1
            } else {
                l[i + 1][j].max(l[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    while i < e.len() || j < a.len() {
        if i < e.len() && j < a.len() && e[i] == a[j] {
            s += &format!(" {}\n", e[i]);
            i += 1;
            j += 1;
        } else if j < a.len() && (i == e.len() || l[i][j + 1] >= l[i + 1][j]) {
            s += &format!("+{}\n", a[j]);
            j += 1;
        } else {
            s += &format!("-{}\n", e[i]);
            i += 1;
        }
    }
    s
}

#[test]
fn invalid_corpus() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/invalid"));
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/invalid exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 32, "only {} cases", cases.len());
    let update = std::env::var_os("UPDATE_EXPECT").is_some_and(|v| v == "1");
    let mut failed = Vec::new();
    for case in &cases {
        let name = case
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let got = actual(case);
        let exp_path = case.join("expected");
        if update {
            std::fs::write(&exp_path, &got).expect("write expected");
            continue;
        }
        let want = std::fs::read_to_string(&exp_path).unwrap_or_default();
        if got.trim().is_empty() {
            eprintln!("case {name}: no diagnostics at all (a corpus case must produce some)");
            failed.push(name);
        } else if want != got {
            eprintln!("case {name}:\n{}", view(&want, &got));
            failed.push(name);
        }
    }
    assert!(
        failed.is_empty(),
        "{} case(s) differ: {failed:?} (UPDATE_EXPECT=1 rewrites them)",
        failed.len()
    );
}
