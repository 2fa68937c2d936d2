//! The generated code in `src/gen/` is checked in so that users build without protoc.
//! This test regenerates it with a pure-Rust compiler (protox) and fails when the
//! checked-in copy is stale. Run with `MESHLITE_REGENERATE=1` to rewrite it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

fn generate(out: &Path) -> anyhow_free::Result {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(
        [root.join("proto/meshlite/v1/mesh.proto")],
        [root.join("proto")],
    )?;

    // Messages and the client.
    let messages = out.join("messages");
    std::fs::create_dir_all(&messages)?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .btree_map(".")
        .bytes(".meshlite.v1.UpdateFrame.upserts")
        .out_dir(&messages)
        .compile_fds(fds.clone())?;

    // The server only: every message comes from the module above, and the server
    // writes `UpdateFrame` (pre-encoded resources) where the client reads `Update`.
    let server = out.join("server");
    std::fs::create_dir_all(&server)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .extern_path(".meshlite.v1", "crate::v1")
        .extern_path(".meshlite.v1.Update", "crate::v1::UpdateFrame")
        .codec_path("crate::codec::LeanCodec")
        .out_dir(&server)
        .compile_fds(fds)?;
    Ok(())
}

mod anyhow_free {
    pub type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;
}

fn files(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for sub in ["messages", "server"] {
        let d = dir.join(sub);
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .unwrap_or_else(|e| panic!("read {}: {e}", d.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(dir).expect("under dir").to_path_buf();
            out.push((
                rel,
                std::fs::read_to_string(&p).expect("read generated file"),
            ));
        }
    }
    out
}

#[test]
fn generated_code_is_up_to_date() {
    let tmp = tempfile::tempdir().expect("tempdir");
    generate(tmp.path()).expect("generate");
    let fresh = files(tmp.path());
    let checked_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gen");
    if std::env::var_os("MESHLITE_REGENERATE").is_some() {
        let _ = std::fs::remove_dir_all(&checked_in);
        for (rel, text) in &fresh {
            let p = checked_in.join(rel);
            std::fs::create_dir_all(p.parent().expect("has parent")).expect("mkdir");
            std::fs::write(&p, text).expect("write");
        }
        return;
    }
    assert!(
        checked_in.exists(),
        "src/gen missing: run MESHLITE_REGENERATE=1 cargo test -p meshlite-proto --test generated"
    );
    let current = files(&checked_in);
    assert_eq!(
        current.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
        fresh.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
        "generated file set changed: run MESHLITE_REGENERATE=1 cargo test -p meshlite-proto --test generated"
    );
    for ((path, old), (_, new)) in current.iter().zip(&fresh) {
        assert!(
            old == new,
            "{} is stale: run MESHLITE_REGENERATE=1 cargo test -p meshlite-proto --test generated",
            path.display()
        );
    }
}

/// The EndpointSlice, EndpointPort and Endpoint messages as last released with
/// `PATCH_SCHEMA`, fingerprinted without comments and spacing.
const SLICE_MESSAGES: (u32, &str) = (2, "7d6152fc20116876");

/// A change to the messages patches are made of must bump `PATCH_SCHEMA`, or
/// agents and control planes of different builds would apply each other's patches
/// to slices they decode differently.
#[test]
fn patch_schema_is_bumped_with_the_slice_messages() {
    use sha2::{Digest, Sha256};
    let proto = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/meshlite/v1/mesh.proto"),
    )
    .expect("read mesh.proto");
    let mut text = String::new();
    for name in ["EndpointSlice", "EndpointPort", "Endpoint"] {
        let start = proto
            .find(&format!("\nmessage {name} {{"))
            .unwrap_or_else(|| panic!("message {name} not found"));
        let end = start + proto[start..].find("\n}").expect("message end");
        for line in proto[start..end].lines() {
            let code = line.split("//").next().unwrap_or("");
            text.push_str(&code.split_whitespace().collect::<Vec<_>>().join(" "));
            text.push('\n');
        }
    }
    let digest = Sha256::digest(text.as_bytes());
    let fingerprint: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        (meshlite_proto::PATCH_SCHEMA, fingerprint.as_str()),
        SLICE_MESSAGES,
        "EndpointSlice/EndpointPort/Endpoint changed: bump meshlite_proto::PATCH_SCHEMA and \
         record ({}, \"{fingerprint}\") in SLICE_MESSAGES",
        meshlite_proto::PATCH_SCHEMA + 1
    );
}
