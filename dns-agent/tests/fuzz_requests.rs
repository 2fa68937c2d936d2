//! Bounded-time fuzzing of request handling, run by `cargo test`: the checked-in
//! corpus (`fuzz/corpus/request`, shared with the cargo-fuzz target) mutated with a
//! deterministic PRNG. Every input must produce either no response (too short, or a
//! response message) or a well-formed response with the request's id, within the
//! UDP size limit; nothing may panic.
//!
//! `MESHLITE_FUZZ_ITERATIONS` (default 100000) and `MESHLITE_FUZZ_SECONDS` (default
//! 20) bound the run; `MESHLITE_FUZZ_SEED` changes the sequence.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlite_dns_agent::dns::{DnsHandler, Transport, answer_bytes, check_response};
use meshlite_dns_agent::fixtures;
use meshlite_dns_agent::metrics::Metrics;
use meshlite_dns_agent::zone::{PodRecords, Zone, ZoneCell, ZoneConfig};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/request");
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("corpus directory")
        .map(|e| std::fs::read(e.expect("entry").path()).expect("read seed"))
        .collect();
    out.sort();
    assert!(out.len() >= 10, "corpus at {} is too small", dir.display());
    out
}

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut b = corpus[rng.below(corpus.len())].clone();
    for _ in 0..=rng.below(4) {
        match rng.below(7) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            2 => b.truncate(rng.below(b.len() + 1)),
            3 => {
                for _ in 0..rng.below(32) {
                    b.push(rng.next() as u8);
                }
            }
            4 => {
                // Splice another seed's tail.
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(other.len() + 1);
                let at = rng.below(b.len() + 1);
                b.truncate(at);
                b.extend_from_slice(&other[cut..]);
            }
            5 if b.len() > 12 => {
                // Corrupt a header count or a label length.
                let i = if rng.below(2) == 0 {
                    4 + rng.below(8)
                } else {
                    12 + rng.below(b.len() - 12)
                };
                b[i] = [0u8, 1, 2, 63, 64, 0xc0, 0xff][rng.below(7)];
            }
            _ => {
                let n = rng.below(64);
                b = (0..n).map(|_| rng.next() as u8).collect();
            }
        }
    }
    b
}

fn handler() -> DnsHandler {
    let zone = Zone::build(
        ZoneConfig {
            domain: "cluster.local".into(),
            ttl: 30,
            pod_records: PodRecords::Verified,
            reverse_cidrs: vec![
                "198.18.0.0/15".parse().expect("cidr"),
                "2001:db8::/32".parse().expect("cidr"),
            ],
        },
        &fixtures::rules(),
    );
    DnsHandler::new(
        Arc::new(ZoneCell::new(zone)),
        None,
        Arc::new(Metrics::unregistered()),
        1232,
    )
}

#[tokio::test]
async fn mutated_requests_never_panic_and_get_well_formed_answers() {
    let iterations: usize = std::env::var("MESHLITE_FUZZ_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let seconds: u64 = std::env::var("MESHLITE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("MESHLITE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_D15C_0FFE_E123);
    let corpus = corpus();
    let h = handler();
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut answered, mut dropped, mut ran) = (0usize, 0usize, 0usize);
    for i in 0..iterations {
        if Instant::now() >= deadline {
            break;
        }
        ran += 1;
        let input = if i < corpus.len() {
            corpus[i].clone()
        } else {
            mutate(&mut rng, &corpus)
        };
        let transport = if rng.below(2) == 0 {
            Transport::Udp
        } else {
            Transport::Tcp
        };
        match answer_bytes(&h, &input, transport).await {
            None => {
                dropped += 1;
                // Only runts and response messages are dropped silently.
                assert!(
                    input.len() < 12 || input[2] & 0x80 != 0,
                    "dropped a request: {input:02x?}"
                );
            }
            Some(out) => {
                answered += 1;
                if let Err(e) = check_response(&input, &out, transport) {
                    panic!("{e}: request {input:02x?}");
                }
                if transport == Transport::Udp {
                    assert!(out.len() <= 1232, "{} bytes over UDP", out.len());
                }
            }
        }
    }
    eprintln!("fuzz: {ran} inputs, {answered} answered, {dropped} dropped");
    assert!(answered > ran / 4, "most inputs should be answered");
}
