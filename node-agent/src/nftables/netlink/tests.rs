use super::*;

#[test]
fn concatenated_keys_pad_each_part_to_four_bytes() {
    assert_eq!(
        element_key(IpFamily::V4, "service-ips", "198.19.0.1 . tcp . 80").unwrap(),
        [198, 19, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]
    );
    assert_eq!(
        element_key(IpFamily::V4, "service-nodeports", "udp . 30053").unwrap(),
        [17, 0, 0, 0, 0x75, 0x65, 0, 0]
    );
    assert_eq!(
        element_key(IpFamily::V6, "cluster-ips", "2001:db8::1")
            .unwrap()
            .len(),
        16
    );
    assert!(element_key(IpFamily::V4, "cluster-ips", "2001:db8::1").is_err());
}

#[test]
fn shapes_not_compiled_fall_back_to_nft() {
    for rule in [
        "ip saddr @affinity-X goto endpoint-X",
        "update @affinity-X { ip saddr }",
        "ip saddr != { 203.0.113.0/24 } drop",
        "iifname != \"veth*\" jump mark-for-masquerade",
        "meta l4proto tcp dnat to [2001:db8::1]:80",
    ] {
        let c = Changes {
            chains: vec![("c".into(), vec![rule.into()])],
            ..Changes::default()
        };
        assert!(encode(IpFamily::V4, "kube-proxy", &c).is_err(), "{rule}");
    }
    let c = Changes {
        affinity_sets: vec![("affinity-X".into(), 10800)],
        ..Changes::default()
    };
    assert!(encode(IpFamily::V4, "kube-proxy", &c).is_err());
}

#[test]
fn a_batch_is_framed_by_begin_and_end_and_acks_every_message() {
    let c = Changes {
        delete_elements: vec![("cluster-ips", "198.19.0.1".into())],
        chains: vec![(
            "service-X".into(),
            vec!["meta l4proto tcp dnat to 198.18.1.2:80".into()],
        )],
        add_elements: vec![("cluster-ips", "198.19.0.2".into(), String::new())],
        flush: vec!["service-Y".into()],
        ..Changes::default()
    };
    let b = encode(IpFamily::V4, "kube-proxy", &c).unwrap();
    let bytes = b.bytes();
    let mut types = Vec::new();
    let mut off = 0;
    while off < bytes.len() {
        let len = u32_at(bytes, off) as usize;
        assert!(len >= 20 && len.is_multiple_of(4));
        types.push(u16::from_ne_bytes([bytes[off + 4], bytes[off + 5]]));
        off += len;
    }
    assert_eq!(off, bytes.len());
    let m = |t: u16| (NFNL_SUBSYS_NFTABLES << 8) | t;
    assert_eq!(
        types,
        [
            NFNL_MSG_BATCH_BEGIN,
            m(NFT_MSG_DELSETELEM),
            m(NFT_MSG_NEWCHAIN),
            m(NFT_MSG_DELRULE),
            m(NFT_MSG_NEWRULE),
            m(NFT_MSG_NEWSETELEM),
            m(NFT_MSG_DELRULE),
            NFNL_MSG_BATCH_END,
        ]
    );
    assert_eq!(b.acked.len(), 6);
}
