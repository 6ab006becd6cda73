//! Remote mode: the same driver through incusd's HTTPS listener on 127.0.0.1
//! with a client certificate added to the server's trust store (root and a
//! local incusd; skipped without). The listener and the certificate are
//! removed again on drop.

mod common;

use common::*;
use moat_incus::client::{enc, Client};
use serde_json::json;
use std::process::Command;

/// Opens the HTTPS listener and trusts a fresh client certificate; undone on drop.
struct Remote {
    local: Client,
    had_address: String,
    cert_name: String,
    port: u16,
}

impl Drop for Remote {
    fn drop(&mut self) {
        let certs = self
            .local
            .get("/1.0/certificates?recursion=1")
            .unwrap_or_default();
        for c in certs.as_array().into_iter().flatten() {
            if c["name"].as_str() == Some(self.cert_name.as_str()) {
                if let Some(fp) = c["fingerprint"].as_str() {
                    let _ =
                        self.local
                            .call("DELETE", &format!("/1.0/certificates/{}", enc(fp)), None);
                }
            }
        }
        let _ = self.local.call(
            "PATCH",
            "/1.0",
            Some(&json!({"config": {"core.https_address": self.had_address}})),
        );
    }
}

#[test]
fn remote_https_with_client_certificate() {
    let Some(local) = incus() else { return };
    let t = TestRoot::new(local.clone());
    let dir = t.project();

    let had_address = local.get("/1.0").expect("server")["config"]["core.https_address"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let remote = Remote {
        local: local.clone(),
        had_address,
        cert_name: format!("moat-test-{}", t.tag),
        port,
    };
    local
        .call(
            "PATCH",
            "/1.0",
            Some(&json!({"config": {"core.https_address": format!("127.0.0.1:{port}")}})),
        )
        .expect("open the HTTPS listener");

    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=moat-test",
        ])
        .arg("-keyout")
        .arg(dir.join("client.key"))
        .arg("-out")
        .arg(dir.join("client.crt"))
        .stderr(std::process::Stdio::null())
        .status();
    if !st.is_ok_and(|s| s.success()) {
        eprintln!("SKIP: openssl could not make a client certificate");
        return;
    }
    let pem = std::fs::read_to_string(dir.join("client.crt")).expect("cert");
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    local
        .call(
            "POST",
            "/1.0/certificates",
            Some(&json!({"name": remote.cert_name, "type": "client", "certificate": b64})),
        )
        .expect("trust the client certificate");
    let server_pem = local.get("/1.0").expect("server")["environment"]["certificate"]
        .as_str()
        .expect("server certificate")
        .to_string();
    std::fs::write(dir.join("server.crt"), server_pem).expect("write server.crt");

    // The client alone: trusted over HTTPS.
    let url = format!("https://127.0.0.1:{}", remote.port);
    let https = Client::https(
        &url,
        &dir.join("client.crt"),
        &dir.join("client.key"),
        &dir.join("server.crt"),
    )
    .expect("https client");
    assert_eq!(
        https.get("/1.0").expect("GET /1.0 over HTTPS")["auth"],
        "trusted"
    );

    // A project applied through the remote connection.
    t.write(&format!(
        r#"
schema_version: 1
project: incusremote
addressing: {{ base: "10.186", zone_step: 1 }}
incus:
  url: {url}
  client_cert: client.crt
  client_key: client.key
  server_cert: server.crt
defaults:
  driver: {{ container: incus }}
domains:
  far:
    trust_level: trusted
    egress: none
    machines:
      box: {{ pids: 100 }}
"#
    ));
    let proj = t.project();
    let mut e = t.engine();
    apply(&mut e, &proj);
    let checked = e.check(&proj).expect("check");
    let want = format!("{}/24", checked.resolved.nics["far-box"].ip);
    assert!(
        wait_until(20, || exec(&e, "far-box", "ip -4 -o addr show eth0")
            .1
            .contains(&want)),
        "far-box should get {want}"
    );
    assert!(
        plan_lines(&e, &proj).is_empty(),
        "plan after apply is empty"
    );
    let remembered = std::fs::read_to_string(t.root().join("incus.json")).expect("incus.json");
    assert!(remembered.contains(&url), "{remembered}");

    // `moat import incus --url ...` reads the same state over HTTPS.
    let pname = t.project_name("far");
    let states =
        moat_incus::import::read(&https, std::slice::from_ref(&pname)).expect("import read");
    let d = moat_incus::import::describe(&states, "far", "");
    let bridge = &checked.resolved.networks["far"].bridge;
    assert!(
        d.moat_yml.contains(&format!("network: \"{bridge}\"")),
        "{}",
        d.moat_yml
    );
    assert!(
        d.moat_yml.contains("incus: { instance: \"far-box\" }"),
        "{}",
        d.moat_yml
    );
    assert!(d.moat_yml.contains("pids: 100"), "{}", d.moat_yml);
}
