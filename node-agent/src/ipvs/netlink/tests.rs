use super::*;
use crate::ipvs::Scheduler;

const FAMILY: u16 = 0x22;

fn key(s: &str) -> VsKey {
    VsKey {
        protocol: Protocol::Tcp,
        addr: s.parse().unwrap(),
    }
}

/// The generic netlink payload (after both headers) of the first message.
fn payload(buf: &[u8]) -> (u16, u16, u8, &[u8]) {
    let msg = Messages::new(buf).next().unwrap().unwrap();
    (msg.kind, msg.flags, msg.payload[0], &msg.payload[4..])
}

#[test]
fn a_new_service_carries_flags_with_their_mask() {
    let mut buf = Vec::new();
    let attrs = VsAttrs {
        scheduler: Scheduler::Sh,
        flags: crate::ipvs::plan::FLAG_PERSISTENT,
        timeout: 10800,
    };
    encode_op(
        &mut buf,
        FAMILY,
        7,
        &Op::AddService {
            key: key("198.19.0.1:80"),
            attrs,
        },
        true,
    )
    .unwrap();
    assert_eq!(buf.len() % 4, 0);
    assert_eq!(
        u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize,
        buf.len()
    );
    let (kind, flags, cmd, p) = payload(&buf);
    assert_eq!((kind, cmd), (FAMILY, IPVS_CMD_NEW_SERVICE));
    assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK);
    let (nk, nested) = attrs_of(p).into_iter().next().unwrap();
    assert_eq!(nk, IPVS_CMD_ATTR_SERVICE);
    let a: BTreeMap<u16, Vec<u8>> = attrs_of(nested)
        .into_iter()
        .map(|(k, v)| (k, v.to_vec()))
        .collect();
    assert_eq!(a[&svc_attr::IPVS_SVC_ATTR_AF], 2u16.to_ne_bytes());
    assert_eq!(a[&svc_attr::IPVS_SVC_ATTR_PROTOCOL], 6u16.to_ne_bytes());
    assert_eq!(&a[&svc_attr::IPVS_SVC_ATTR_ADDR][..4], [198, 19, 0, 1]);
    assert_eq!(a[&svc_attr::IPVS_SVC_ATTR_ADDR].len(), 16);
    assert_eq!(a[&svc_attr::IPVS_SVC_ATTR_PORT], 80u16.to_be_bytes());
    assert_eq!(a[&svc_attr::IPVS_SVC_ATTR_SCHED_NAME], b"sh\0");
    // struct ip_vs_flags { flags, mask }: without the mask the kernel ignores them.
    let mut want = 1u32.to_ne_bytes().to_vec();
    want.extend(u32::MAX.to_ne_bytes());
    assert_eq!(a[&svc_attr::IPVS_SVC_ATTR_FLAGS], want);
    assert_eq!(a[&svc_attr::IPVS_SVC_ATTR_TIMEOUT], 10800u32.to_ne_bytes());
    assert_eq!(a[&svc_attr::IPVS_SVC_ATTR_NETMASK], u32::MAX.to_ne_bytes());

    // A service message in a dump has the same nested layout: it parses back.
    let (k, vs) = parse_service_msg(p).unwrap().unwrap();
    assert_eq!(k, key("198.19.0.1:80"));
    assert_eq!(
        (vs.scheduler.as_str(), vs.flags, vs.timeout),
        ("sh", 1, 10800)
    );
}

fn attrs_of(buf: &[u8]) -> Vec<(u16, &[u8])> {
    attrs(buf).collect()
}

#[test]
fn destinations_round_trip_for_both_families_and_sctp() {
    for (vs, dest) in [
        ("198.19.0.1:80", "198.18.1.1:8080"),
        ("[2001:db8:19::1]:80", "[2001:db8:18::1]:8080"),
    ] {
        let k = VsKey {
            protocol: Protocol::Sctp,
            addr: vs.parse().unwrap(),
        };
        let mut buf = Vec::new();
        let op = Op::AddDest {
            key: k,
            dest: dest.parse().unwrap(),
            weight: 3,
        };
        encode_op(&mut buf, FAMILY, 1, &op, false).unwrap();
        let (_, flags, cmd, p) = payload(&buf);
        assert_eq!((flags, cmd), (NLM_F_REQUEST, IPVS_CMD_NEW_DEST));
        let (sk, _) = parse_service_msg(p).unwrap().unwrap();
        assert_eq!(sk, k);
        let (addr, d) = parse_dest_msg(p).unwrap().unwrap();
        assert_eq!(addr, dest.parse::<SocketAddr>().unwrap());
        assert_eq!(d.weight, 3);
        let svc = attrs_of(p)
            .into_iter()
            .find(|(t, _)| *t == IPVS_CMD_ATTR_SERVICE)
            .unwrap()
            .1;
        let proto = attrs_of(svc)
            .into_iter()
            .find(|(t, _)| *t == svc_attr::IPVS_SVC_ATTR_PROTOCOL)
            .unwrap()
            .1;
        assert_eq!(proto, 132u16.to_ne_bytes());
    }
}

#[test]
fn deletions_carry_only_identities() {
    let mut buf = Vec::new();
    let k = key("198.19.0.1:80");
    encode_op(&mut buf, FAMILY, 1, &Op::DelService { key: k }, false).unwrap();
    let start = buf.len();
    encode_op(
        &mut buf,
        FAMILY,
        2,
        &Op::DelDest {
            key: k,
            dest: "198.18.1.1:80".parse().unwrap(),
        },
        true,
    )
    .unwrap();
    let msgs: Vec<_> = Messages::new(&buf).map(|m| m.unwrap()).collect();
    assert_eq!(msgs.len(), 2);
    assert_eq!((msgs[0].seq, msgs[1].seq), (1, 2));
    assert_eq!(msgs[1].payload[0], IPVS_CMD_DEL_DEST);
    // nlmsghdr 16 + genl 4 + service nest (4 + 8 + 8 + 20 + 8) + dest nest (4 + 20 + 8 + 8).
    assert_eq!(buf.len() - start, 16 + 4 + 48 + 40);
    let p = &msgs[0].payload[4..];
    let svc = attrs_of(p)[0].1;
    assert_eq!(attrs_of(svc).len(), 4, "identity only");
}

#[test]
fn replies_are_split_into_messages_and_errors() {
    // Two NLMSG_ERROR messages: an ACK (0) and -EEXIST, each echoing a header.
    let mut buf = Vec::new();
    for (seq, err) in [(5u32, 0i32), (6, -17)] {
        buf.extend(36u32.to_ne_bytes());
        buf.extend(NLMSG_ERROR.to_ne_bytes());
        buf.extend(0u16.to_ne_bytes());
        buf.extend(seq.to_ne_bytes());
        buf.extend(0u32.to_ne_bytes());
        buf.extend(err.to_ne_bytes());
        buf.extend([0u8; 16]);
    }
    let msgs: Vec<_> = Messages::new(&buf).map(|m| m.unwrap()).collect();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].error().unwrap(), 0);
    assert_eq!((msgs[1].seq, msgs[1].error().unwrap()), (6, 17));
    // A truncated datagram is an error, not a panic.
    assert!(Messages::new(&buf[..30]).next().unwrap().is_err() || buf[..30].len() < 36);
}

#[test]
fn firewall_mark_services_and_other_protocols_are_not_ours() {
    let mut p = Vec::new();
    let nest = nest_begin(&mut p, IPVS_CMD_ATTR_SERVICE).unwrap();
    write_u16_attr(&mut p, svc_attr::IPVS_SVC_ATTR_AF, AF_INET).unwrap();
    write_u32_attr(&mut p, svc_attr::IPVS_SVC_ATTR_FWMARK, 7).unwrap();
    nest_end(&mut p, nest);
    assert!(parse_service_msg(&p).unwrap().is_none());
    assert!(parse_service_msg(&[]).is_err());
}
