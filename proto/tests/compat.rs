//! The compatibility rules of the contract, checked on the wire: an older peer's
//! message (without a field added since) decodes with the default, and a newer
//! peer's message (with a field this build does not know) decodes with the field
//! ignored and everything else intact.

use hitless_proto::v1::{Instance, InstanceState, Snapshot};
use prost::Message;

/// `Instance` as a release before `node` and `ttl_ms` existed would send it.
#[derive(Clone, PartialEq, Message)]
struct InstanceV0 {
    #[prost(string, tag = "1")]
    service: String,
    #[prost(string, tag = "2")]
    address: String,
    #[prost(int32, tag = "3")]
    state: i32,
    #[prost(uint32, tag = "4")]
    weight: u32,
    #[prost(string, tag = "5")]
    version: String,
}

/// `Instance` as a later release might send it, with a field added at tag 42.
#[derive(Clone, PartialEq, Message)]
struct InstanceNext {
    #[prost(string, tag = "1")]
    service: String,
    #[prost(string, tag = "2")]
    address: String,
    #[prost(int32, tag = "3")]
    state: i32,
    #[prost(uint32, tag = "4")]
    weight: u32,
    #[prost(string, tag = "5")]
    version: String,
    #[prost(string, tag = "6")]
    node: String,
    #[prost(uint64, tag = "7")]
    ttl_ms: u64,
    #[prost(string, tag = "42")]
    zone: String,
}

#[test]
fn an_older_message_decodes_with_defaults_for_newer_fields() {
    let old = InstanceV0 {
        service: "cart".into(),
        address: "127.0.1.1:8080".into(),
        state: InstanceState::Draining as i32,
        weight: 100,
        version: "v1".into(),
    };
    let now = Instance::decode(old.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(now.service, "cart");
    assert_eq!(now.state(), InstanceState::Draining);
    assert_eq!((now.node.as_str(), now.ttl_ms), ("", 0), "missing fields mean their default");
}

#[test]
fn a_newer_message_decodes_with_unknown_fields_ignored() {
    let next = InstanceNext {
        service: "cart".into(),
        address: "127.0.1.1:8080".into(),
        state: InstanceState::Serving as i32,
        weight: 5,
        version: "v2".into(),
        node: "node-a".into(),
        ttl_ms: 3_000,
        zone: "eu-1".into(),
    };
    let now = Instance::decode(next.encode_to_vec().as_slice()).expect("unknown field 42 is skipped");
    assert_eq!((now.weight, now.node.as_str(), now.ttl_ms), (5, "node-a", 3_000));
    // And an old peer reading what we send ignores our newer fields the same way.
    let back = InstanceV0::decode(now.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!((back.version.as_str(), back.weight), ("v2", 5));
}

#[test]
fn an_unknown_enum_value_is_kept_as_a_number_not_an_error() {
    let mut old = InstanceV0 { service: "cart".into(), ..Default::default() };
    old.state = 7; // a state added by a later release
    let now = Instance::decode(old.encode_to_vec().as_slice()).expect("decodes");
    assert_eq!(now.state, 7);
    assert_eq!(now.state(), InstanceState::Serving, "the accessor falls back to the default");
}

#[test]
fn the_descriptor_set_lists_every_service() {
    let fds = prost_types_free_names(hitless_proto::FILE_DESCRIPTOR_SET);
    for s in ["Registry", "AgentLink", "Coordinator"] {
        assert!(fds.contains(s), "descriptor set lacks service {s}");
    }
    let _ = Snapshot::default();
}

/// The service names in an encoded descriptor set, without pulling in prost-types.
fn prost_types_free_names(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
