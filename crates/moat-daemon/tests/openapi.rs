//! openapi.yaml and the route table cannot drift: every route is documented
//! with the same method, path, summary and access, and nothing else is.

use moat_daemon::api::ROUTES;
use moat_daemon::Need;
use yaml_rust2::{Yaml, YamlLoader};

#[test]
fn openapi_matches_the_route_table() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("read openapi.yaml");
    let docs = YamlLoader::load_from_str(&text).expect("openapi.yaml is YAML");
    let paths = docs[0]["paths"].as_hash().expect("paths");
    let mut documented = Vec::new();
    for (p, ops) in paths {
        let p = p.as_str().expect("path key");
        for (m, op) in ops.as_hash().expect("operations") {
            let m = m.as_str().expect("method").to_ascii_uppercase();
            documented.push((m, p.to_string(), op.clone()));
        }
    }
    for r in ROUTES {
        let op = documented
            .iter()
            .find(|(m, p, _)| m == r.method && p == r.path)
            .map(|(_, _, op)| op)
            .unwrap_or_else(|| panic!("{} {} is missing from openapi.yaml", r.method, r.path));
        assert_eq!(
            op["summary"].as_str(),
            Some(r.summary),
            "summary of {} {}",
            r.method,
            r.path
        );
        let access = match r.need {
            Need::Read => "read",
            Need::Write => "write",
        };
        assert_eq!(
            op["x-moat-access"].as_str(),
            Some(access),
            "x-moat-access of {} {}",
            r.method,
            r.path
        );
        assert!(
            !matches!(op["responses"], Yaml::BadValue),
            "{} {} has no responses",
            r.method,
            r.path
        );
    }
    for (m, p, _) in &documented {
        assert!(
            ROUTES.iter().any(|r| r.method == m && r.path == p),
            "openapi.yaml documents {m} {p}, which the daemon does not serve"
        );
    }
}
