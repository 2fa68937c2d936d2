//! libFuzzer target: arbitrary text as a manifest file. Must never panic; every
//! object it accepts must convert to the wire form and back unchanged.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use meshlite_k8s::manifests;
use meshlite_proto::model::Resource;
use meshlite_proto::v1;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(m) = manifests::parse(Path::new("fuzz.yaml"), text, &Default::default()) else { return };
    for o in &m.objects {
        let wire = v1::Resource {
            key: o.resource.key().to_string(),
            hash: 0,
            kind: Some((&o.resource).into()),
        };
        assert_eq!(Resource::try_from(&wire).as_ref(), Ok(&o.resource));
    }
});
