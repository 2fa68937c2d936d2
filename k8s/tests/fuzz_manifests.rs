//! Bounded-time fuzzing of manifest parsing, run by `cargo test`.
//!
//! The checked-in corpus (`fuzz/corpus/manifests`: the seed and edge cases) is
//! mutated with a deterministic PRNG: byte flips, deleted and duplicated lines,
//! changed indentation, splices between files, and YAML tokens (anchors, aliases,
//! merge keys, tags, flow brackets, document markers). `manifests::parse` must never
//! panic; what it accepts must be valid: every object converts to the wire form and
//! back unchanged, and its key parses.
//!
//! `MESHLITE_FUZZ_ITERATIONS` (default 20000), `MESHLITE_FUZZ_SECONDS` (default 15),
//! `MESHLITE_FUZZ_SEED`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshlite_k8s::manifests;
use meshlite_proto::model::{Resource, ResourceKey};
use meshlite_proto::v1;
use meshlite_runtime::testing::{Rng, env_or};

const TOKENS: &[&str] = &[
    "&a ",
    "*a",
    "<<: *a\n",
    "!!binary ",
    "!!str ",
    "---\n",
    "...\n",
    "- ",
    ": ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "\t",
    "\"",
    "'",
    "#",
    "|\n",
    ">\n",
    "null",
    "~",
    "0x1F",
    "1e9",
    "-1",
    "65536",
    "300.1.1.1",
    "::",
    "2001:db8::/129",
    "\u{feff}",
    "\u{0}",
    "kind: Service\n",
    "apiVersion: discovery.k8s.io/v1\n",
];

fn corpus() -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/manifests");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .expect("corpus directory")
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    out.sort();
    assert!(out.len() >= 4);
    out
}

fn mutate(rng: &mut Rng, corpus: &[String]) -> String {
    let mut lines: Vec<String> = corpus[rng.below(corpus.len())]
        .lines()
        .map(String::from)
        .collect();
    for _ in 0..=rng.below(5) {
        let n = lines.len().max(1);
        match rng.below(7) {
            0 if !lines.is_empty() => {
                lines.remove(rng.below(n));
            }
            1 if !lines.is_empty() => {
                let l = lines[rng.below(n)].clone();
                lines.insert(rng.below(n), l);
            }
            2 if !lines.is_empty() => {
                let i = rng.below(n);
                let indent = " ".repeat(rng.below(6));
                lines[i] = format!("{indent}{}", lines[i].trim_start());
            }
            3 => {
                let other: Vec<&str> = corpus[rng.below(corpus.len())].lines().collect();
                let from = rng.below(other.len());
                let take = rng.below(8);
                let at = rng.below(lines.len() + 1);
                for (j, l) in other.iter().skip(from).take(take).enumerate() {
                    lines.insert(at + j, (*l).to_string());
                }
            }
            4 if !lines.is_empty() => {
                let i = rng.below(n);
                let pos = rng.below(lines[i].len() + 1);
                let pos = (0..=pos)
                    .rev()
                    .find(|p| lines[i].is_char_boundary(*p))
                    .unwrap_or(0);
                lines[i].insert_str(pos, TOKENS[rng.below(TOKENS.len())]);
            }
            5 if !lines.is_empty() => {
                let i = rng.below(n);
                let mut b = lines[i].clone().into_bytes();
                if !b.is_empty() {
                    let j = rng.below(b.len());
                    b[j] ^= 1 << rng.below(7);
                }
                lines[i] = String::from_utf8_lossy(&b).into_owned();
            }
            _ => lines.truncate(rng.below(n + 1)),
        }
    }
    lines.join("\n")
}

fn check(m: &manifests::Manifests) {
    for o in &m.objects {
        let r = &o.resource;
        let key = r.key();
        assert_eq!(key.to_string().parse::<ResourceKey>().unwrap(), key);
        let wire = v1::Resource {
            key: key.to_string(),
            hash: 0,
            kind: Some(r.into()),
        };
        let back = Resource::try_from(&wire)
            .unwrap_or_else(|e| panic!("accepted {key} does not convert back: {e}"));
        assert_eq!(&back, r);
    }
}

#[test]
fn mutated_manifests_never_panic_and_accepted_objects_are_valid() {
    let corpus = corpus();
    let iterations: u64 = env_or("MESHLITE_FUZZ_ITERATIONS", 20_000);
    let budget = Duration::from_secs(env_or("MESHLITE_FUZZ_SECONDS", 15));
    let mut rng = Rng(env_or("MESHLITE_FUZZ_SEED", 0x2545_f491_4f6c_dd1d));
    let started = Instant::now();
    let (mut n, mut ok) = (0u64, 0u64);
    while n < iterations && started.elapsed() < budget {
        let text = mutate(&mut rng, &corpus);
        if let Ok(m) = manifests::parse(Path::new("fuzz.yaml"), &text, &Default::default()) {
            check(&m);
            ok += 1;
        }
        n += 1;
    }
    eprintln!(
        "fuzzed {n} manifests ({ok} parsed) in {:?}",
        started.elapsed()
    );
    assert!(
        ok > 0,
        "no mutated manifest parsed: the mutations are too destructive to test acceptance"
    );
}
