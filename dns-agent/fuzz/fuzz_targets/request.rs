//! libFuzzer target: arbitrary bytes as a DNS request over UDP and TCP, against the
//! `fixtures::rules()` zone. Must never panic; every response must be well formed.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use meshlite_dns_agent::dns::{DnsHandler, Transport, answer_bytes, check_response};
use meshlite_dns_agent::fixtures;
use meshlite_dns_agent::metrics::Metrics;
use meshlite_dns_agent::zone::{PodRecords, Zone, ZoneCell, ZoneConfig};

fn state() -> &'static (tokio::runtime::Runtime, DnsHandler) {
    static STATE: OnceLock<(tokio::runtime::Runtime, DnsHandler)> = OnceLock::new();
    STATE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let zone = Zone::build(
            ZoneConfig {
                domain: "cluster.local".into(),
                ttl: 30,
                pod_records: PodRecords::Verified,
                reverse_cidrs: vec!["198.18.0.0/15".parse().expect("cidr")],
            },
            &fixtures::rules(),
        );
        let h = DnsHandler::new(
            Arc::new(ZoneCell::new(zone)),
            None,
            Arc::new(Metrics::unregistered()),
            1232,
        );
        (rt, h)
    })
}

fuzz_target!(|data: &[u8]| {
    let (rt, h) = state();
    for t in [Transport::Udp, Transport::Tcp] {
        if let Some(out) = rt.block_on(answer_bytes(h, data, t)) {
            if let Err(e) = check_response(data, &out, t) {
                panic!("{e}");
            }
        }
    }
});
