// Shared by the build scripts of the crates that make moat's binaries
// (moat-cli: `moat`, moat-runtime: `moat-supervisor`), through include!.
//
// Links the binaries with packed relative relocations (`-z
// pack-relative-relocs`, DT_RELR) when this machine's C toolchain and C
// library can: the dynamic loader then applies the ~30000 relative
// relocations of a Rust binary from an 8 KiB bitmap instead of a 500 KiB
// table, which takes ~0.4 ms of CPU off every start of `moat` and of each
// machine's supervisor. It needs glibc 2.36+ where the binary runs, so the
// probe builds and runs a C program here: a binary built on this machine
// gets it only if it would start on this machine. MOAT_RELR=0 turns it off
// (binaries built for an older system), MOAT_RELR=1 forces it.

fn relr() {
    println!("cargo:rerun-if-env-changed=MOAT_RELR");
    let want = std::env::var("MOAT_RELR").ok();
    let linux_gnu = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu");
    let native = std::env::var("HOST").ok() == std::env::var("TARGET").ok();
    let on = match want.as_deref() {
        Some("0") => false,
        Some("1") => true,
        _ => linux_gnu && native && relr_probe(),
    };
    if on {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// Can `cc` link with DT_RELR, and does the result run here?
fn relr_probe() -> bool {
    let Ok(out) = std::env::var("OUT_DIR") else {
        return false;
    };
    let dir = std::path::Path::new(&out);
    let src = dir.join("relr-probe.c");
    let exe = dir.join("relr-probe");
    // A pointer in initialized data: one relative relocation to pack.
    let code = "static const char *p = \"x\";\nint main(void) { return p[0] == 'x' ? 0 : 1; }\n";
    if std::fs::write(&src, code).is_err() {
        return false;
    }
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let built = std::process::Command::new(cc)
        .args(["-pie", "-fPIE", "-Wl,-z,pack-relative-relocs", "-o"])
        .arg(&exe)
        .arg(&src)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    built
        && std::process::Command::new(&exe)
            .status()
            .is_ok_and(|s| s.success())
}
