//! Arbitrary bytes as project files: the loader must never panic.
//!
//! The first byte picks the layout; the rest is split on NUL bytes into the
//! top file, one domain file and policies.yml.
#![no_main]

use libfuzzer_sys::fuzz_target;
use moat_core::load::load_files;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((sel, rest)) = data.split_first() else { return };
    let top = if sel & 1 == 0 { "moat.yml" } else { "anklume.yml" };
    let mut parts = rest.splitn(3, |b| *b == 0);
    let mut files: Vec<(&str, &[u8])> = vec![(top, parts.next().unwrap_or_default())];
    if sel & 2 != 0 {
        if let Some(d) = parts.next() {
            files.push(("domains/pro.yml", d));
        }
        if let Some(p) = parts.next() {
            files.push(("policies.yml", p));
        }
    }
    let _ = load_files(Path::new("/fuzz/project"), top, &files);
});
