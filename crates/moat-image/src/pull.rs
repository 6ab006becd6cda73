//! `oci:REF`: pull an image from a registry with the `oci-client` crate, then import it like an
//! OCI layout. Blobs are downloaded into a staging folder (layers already in the store, by diff id,
//! are not downloaded). Loopback registries (`localhost`, `127.0.0.1`, `[::1]`) and those listed
//! in `MOAT_INSECURE_REGISTRIES` (comma-separated `host:port`) are spoken to over plain HTTP.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::error::{ImageError, IoContext, Result};
use crate::oci::{blob_path, import_manifest, Descriptor};
use crate::progress::Progress;
use crate::sources::Built;
use crate::store::ImageStore;

fn is_loopback(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            registry
        }
    });
    matches!(host, "localhost" | "127.0.0.1" | "[::1]") || host.starts_with("127.")
}

fn protocol_for(registry: &str) -> ClientProtocol {
    let mut insecure: Vec<String> = std::env::var("MOAT_INSECURE_REGISTRIES")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if is_loopback(registry) {
        insecure.push(registry.to_string());
    }
    if insecure.is_empty() {
        ClientProtocol::Https
    } else {
        ClientProtocol::HttpsExcept(insecure)
    }
}

/// Stream one blob to `path`, verifying its sha256 digest and reporting bytes every 8 MiB.
async fn download(
    client: &Client,
    r: &Reference,
    layer: &oci_client::manifest::OciDescriptor,
    path: &std::path::Path,
    total: Option<u64>,
    p: &dyn Progress,
) -> std::result::Result<(), String> {
    use futures_util::StreamExt;
    use sha2::{Digest, Sha256};
    use std::io::Write;
    let want = layer
        .digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("unsupported digest algorithm in {}", layer.digest))?
        .to_string();
    let mut s = client
        .pull_blob_stream(r, layer)
        .await
        .map_err(|e| e.to_string())?;
    let mut f = fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let (mut done, mut shown) = (0u64, 0u64);
    while let Some(chunk) = s.stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        h.update(&chunk);
        f.write_all(&chunk)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        done += chunk.len() as u64;
        if done - shown >= 8 << 20 {
            p.bytes(&layer.digest, done, total.or(s.content_length));
            shown = done;
        }
    }
    p.bytes(&layer.digest, done, total.or(s.content_length));
    let got = hex::encode(h.finalize());
    if got != want {
        return Err(format!(
            "content has digest sha256:{got}, expected {}",
            layer.digest
        ));
    }
    Ok(())
}

/// Pull `reference` (`host[:port]/repo[:tag|@digest]`; no host means Docker Hub).
pub(crate) fn pull(
    store: &ImageStore,
    reference: &str,
    desc: &str,
    p: &dyn Progress,
) -> Result<Built> {
    let err = |reason: String| ImageError::Pull {
        reference: reference.to_string(),
        reason,
    };
    let r: Reference = reference
        .parse()
        .map_err(|e| err(format!("not a valid image reference: {e}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| err(format!("cannot start the async runtime: {e}")))?;
    let client = Client::new(ClientConfig {
        protocol: protocol_for(r.resolve_registry()),
        ..Default::default()
    });
    let auth = RegistryAuth::Anonymous;
    p.step(&format!("pulling manifest of {reference}"));
    let (manifest, digest, config) = rt
        .block_on(client.pull_manifest_and_config(&r, &auth))
        .map_err(|e| err(e.to_string()))?;
    p.step(&format!(
        "manifest {digest}, {} layer(s)",
        manifest.layers.len()
    ));
    let known: Vec<String> = serde_json::from_str::<serde_json::Value>(&config)
        .ok()
        .and_then(|v| {
            v.pointer("/rootfs/diff_ids").and_then(|d| {
                d.as_array().map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
            })
        })
        .unwrap_or_default();
    let st = store.staging()?;
    let dir = st.path().to_path_buf();
    let cfg_path = dir.join("config.json");
    fs::write(&cfg_path, &config).ctx("write", &cfg_path)?;
    let mut layers = Vec::new();
    for (i, l) in manifest.layers.iter().enumerate() {
        let d = Descriptor {
            media_type: l.media_type.clone(),
            digest: l.digest.clone(),
            size: u64::try_from(l.size).ok(),
            platform: None,
            annotations: BTreeMap::new(),
        };
        layers.push(d);
        if known.get(i).is_some_and(|id| store.has_layer(id)) {
            continue;
        }
        let bp = blob_path(&dir, &l.digest, desc)?;
        if let Some(parent) = bp.parent() {
            fs::create_dir_all(parent).ctx("create directory", parent)?;
        }
        p.step(&format!(
            "layer {}/{} {}: downloading",
            i + 1,
            manifest.layers.len(),
            l.digest
        ));
        let total = u64::try_from(l.size).ok();
        rt.block_on(download(&client, &r, l, &bp, total, p))
            .map_err(|e| err(format!("download of layer {}: {e}", l.digest)))?;
    }
    let open = |d: &Descriptor| -> Result<Box<dyn Read>> {
        let bp = blob_path(&dir, &d.digest, desc)?;
        Ok(Box::new(
            fs::File::open(&bp).ctx("open downloaded layer", &bp)?,
        ))
    };
    let mut built = import_manifest(store, &layers, config.as_bytes(), &cfg_path, &open, desc, p)?;
    built.source = format!("{desc} ({digest})");
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_use_http() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost"));
        assert!(!is_loopback("registry.example:443"));
        assert!(
            matches!(protocol_for("localhost:5000"), ClientProtocol::HttpsExcept(v) if v == vec!["localhost:5000".to_string()])
        );
    }
}
