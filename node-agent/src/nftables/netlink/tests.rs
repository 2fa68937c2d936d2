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
fn a_batch_is_framed_by_begin_and_end_and_acks_its_last_message() {
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
    let messages = messages(bytes);
    let types: Vec<u16> = messages.iter().map(|(ty, _, _)| *ty).collect();
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
    let acks: Vec<bool> = messages
        .iter()
        .map(|(_, flags, _)| flags & NLM_F_ACK != 0)
        .collect();
    assert_eq!(
        acks,
        [false, false, false, false, false, false, true, false]
    );
    assert_eq!(b.acked, [messages[6].2]);
}

/// (type, flags, sequence number) of each message in a batch.
fn messages(bytes: &[u8]) -> Vec<(u16, u16, u32)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < bytes.len() {
        let len = u32_at(bytes, off) as usize;
        assert!(len >= 20 && len.is_multiple_of(4));
        out.push((
            u16::from_ne_bytes([bytes[off + 4], bytes[off + 5]]),
            u16::from_ne_bytes([bytes[off + 6], bytes[off + 7]]),
            u32_at(bytes, off + 8),
        ));
        off += len;
    }
    assert_eq!(off, bytes.len());
    out
}

#[test]
fn elements_of_one_set_share_messages_and_a_flushed_set_names_no_element() {
    let m = |t: u16| (NFNL_SUBSYS_NFTABLES << 8) | t;
    let c = Changes {
        flush_sets: vec!["cluster-ips"],
        add_elements: (0..3000u32)
            .map(|i| {
                let ip = std::net::Ipv4Addr::from(0xc613_0000 + i);
                ("cluster-ips", ip.to_string(), String::new())
            })
            .chain([("nodeport-ips", "198.18.0.1".to_string(), String::new())])
            .collect(),
        ..Changes::default()
    };
    let b = encode(IpFamily::V4, "kube-proxy", &c).unwrap();
    let types: Vec<u16> = messages(b.bytes()).iter().map(|(ty, _, _)| *ty).collect();
    // One emptying message, then 3000 elements of 20 bytes in two messages
    // (32 KiB each at most), then the other set's own message.
    assert_eq!(
        types,
        [
            NFNL_MSG_BATCH_BEGIN,
            m(NFT_MSG_DELSETELEM),
            m(NFT_MSG_NEWSETELEM),
            m(NFT_MSG_NEWSETELEM),
            m(NFT_MSG_NEWSETELEM),
            NFNL_MSG_BATCH_END,
        ]
    );
    // The emptying message has no element list.
    let flush_len = u32_at(b.bytes(), 20) as usize;
    assert!(flush_len < 64, "{flush_len}");
}
