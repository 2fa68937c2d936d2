//! A light decoding of `meshlite.v1.Update` for the simulated agents.
//!
//! Five thousand agents cannot each hold a decoded snapshot of 100k endpoints, so
//! they decode updates into these messages: the same field numbers as `Update` and
//! `Resource`, keeping the header, each resource's key and hash, removals and
//! causes. prost skips the fields not declared here (the resource bodies) without
//! decoding them. The bytes on the wire, and everything the control plane does,
//! are unchanged.

use meshlite_proto::v1;

/// `Update` without resource bodies.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LightUpdate {
    #[prost(uint64, tag = "1")]
    pub epoch: u64,
    #[prost(uint64, tag = "2")]
    pub version: u64,
    #[prost(uint64, tag = "3")]
    pub base_version: u64,
    #[prost(string, tag = "4")]
    pub nonce: String,
    #[prost(message, repeated, tag = "5")]
    pub upserts: Vec<LightResource>,
    #[prost(string, repeated, tag = "6")]
    pub removals: Vec<String>,
    #[prost(bool, tag = "7")]
    pub last_chunk: bool,
    #[prost(message, repeated, tag = "8")]
    pub causes: Vec<v1::ChangeCause>,
    #[prost(int64, tag = "9")]
    pub sent_unix_nanos: i64,
    #[prost(bool, tag = "10")]
    pub inventory_request: bool,
}

/// `Resource`: key and hash only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LightResource {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(fixed64, tag = "2")]
    pub hash: u64,
}

/// The gRPC method the agents call.
pub const STREAM_PATH: &str = "/meshlite.v1.Mesh/Stream";

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn decodes_a_full_update_keeping_keys_and_hashes() {
        let update = v1::Update {
            epoch: 3,
            version: 9,
            base_version: 4,
            nonce: "7".into(),
            upserts: vec![v1::Resource {
                key: "endpointslice/a/b".into(),
                hash: 0xdead_beef,
                kind: Some(v1::resource::Kind::EndpointSlice(v1::EndpointSlice {
                    namespace: "a".into(),
                    name: "b".into(),
                    endpoints: vec![v1::Endpoint {
                        addresses: vec!["198.18.0.1".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
            }],
            removals: vec!["service/a/c".into()],
            last_chunk: true,
            causes: vec![v1::ChangeCause {
                key: "endpointslice/a/b".into(),
                ..Default::default()
            }],
            sent_unix_nanos: 5,
            inventory_request: false,
        };
        let light = LightUpdate::decode(update.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            (
                light.epoch,
                light.version,
                light.base_version,
                light.nonce.as_str()
            ),
            (3, 9, 4, "7")
        );
        assert_eq!(
            light.upserts,
            vec![LightResource {
                key: "endpointslice/a/b".into(),
                hash: 0xdead_beef
            }]
        );
        assert_eq!(light.removals, vec!["service/a/c"]);
        assert!(light.last_chunk);
        assert_eq!(light.causes.len(), 1);
    }
}
