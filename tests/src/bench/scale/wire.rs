//! Encoded size of protobuf messages, computed field by field (this crate does not
//! link prost itself): what a session receives, framing aside.

use hitless_proto::v1 as pb;

fn varint(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}
fn num(v: u64) -> usize {
    if v == 0 {
        0
    } else {
        1 + varint(v)
    }
}
fn text(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        nested(s.len())
    }
}
/// A length-delimited field of `len` bytes (tag below 16).
fn nested(len: usize) -> usize {
    1 + varint(len as u64) + len
}
fn instance(i: &pb::Instance) -> usize {
    text(&i.service)
        + text(&i.address)
        + num(i.state as u64)
        + num(u64::from(i.weight))
        + text(&i.version)
        + text(&i.node)
        + num(i.ttl_ms)
}
fn service(s: &pb::Service) -> usize {
    text(&s.name)
        + s.vips.iter().map(|v| nested(v.len())).sum::<usize>()
        + num(s.protocol as u64)
        + num(s.policy as u64)
}
/// A snapshot's encoding.
pub fn snapshot(s: &pb::Snapshot) -> usize {
    num(s.revision)
        + s.services.iter().map(|x| nested(service(x))).sum::<usize>()
        + s.instances.iter().map(|x| nested(instance(x))).sum::<usize>()
}
/// A coordinator message holding a snapshot, or a part of one.
pub fn message(m: &pb::CoordinatorMessage) -> usize {
    use pb::coordinator_message::Msg;
    match &m.msg {
        Some(Msg::Snapshot(s)) => nested(snapshot(s)),
        Some(Msg::SnapshotPart(p)) => {
            nested(p.part.as_ref().map_or(0, |s| nested(snapshot(s))) + num(u64::from(p.last)))
        }
        _ => 0,
    }
}
