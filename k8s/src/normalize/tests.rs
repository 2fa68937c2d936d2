use super::*;

fn svc(yaml: &str) -> core::Service {
    serde_saphyr::from_str(yaml).unwrap()
}

fn slice(yaml: &str) -> discovery::EndpointSlice {
    serde_saphyr::from_str(yaml).unwrap()
}

// Most cases normalize as a control plane without --service-proxy-name does.
fn service(s: &core::Service) -> Result<Normalized<Service>, Invalid> {
    super::service(s, &Options::default())
}

fn endpoint_slice(s: &discovery::EndpointSlice) -> Result<Normalized<EndpointSlice>, Invalid> {
    super::endpoint_slice(s, &Options::default())
}

#[test]
fn service_every_field() {
    let s = svc(r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations:
    meshlite.io/ipvs-scheduler: sh
    kubectl.kubernetes.io/last-applied-configuration: "{}"
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.10
  clusterIPs: [198.19.0.10, "2001:db8::10"]
  ports:
  - {name: http, port: 80, targetPort: web, nodePort: 30080, appProtocol: http}
  - {name: dns, protocol: UDP, port: 53, targetPort: 5353}
  - {name: sctp, protocol: SCTP, port: 9999}
  externalIPs: [198.19.1.1]
  loadBalancerSourceRanges: [198.18.0.0/16]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  healthCheckNodePort: 31000
  publishNotReadyAddresses: true
status:
  loadBalancer:
    ingress: [{ip: 198.19.2.1}, {hostname: lb.example}]
"#);
    let n = service(&s).unwrap();
    assert!(n.warnings.is_empty(), "{:?}", n.warnings);
    let v = n.value;
    assert_eq!(v.namespace, "shop");
    assert_eq!(v.kind, ServiceType::LoadBalancer);
    assert_eq!(
        v.cluster_ips,
        vec![
            "198.19.0.10".parse::<IpAddr>().unwrap(),
            "2001:db8::10".parse().unwrap()
        ]
    );
    assert!(!v.headless);
    assert_eq!(v.ports.len(), 3);
    assert_eq!(v.ports[0].target_port, TargetPort::Name("web".into()));
    assert_eq!(v.ports[0].node_port, Some(30080));
    assert_eq!(v.ports[0].app_protocol.as_deref(), Some("http"));
    assert_eq!(v.ports[1].protocol, Protocol::Udp);
    assert_eq!(v.ports[1].target_port, TargetPort::Number(5353));
    assert_eq!(v.ports[2].protocol, Protocol::Sctp);
    assert_eq!(
        v.ports[2].target_port,
        TargetPort::Number(9999),
        "targetPort defaults to port"
    );
    assert_eq!(
        v.external_ips,
        vec!["198.19.1.1".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        v.load_balancer_ips,
        vec!["198.19.2.1".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        v.load_balancer_source_ranges,
        vec!["198.18.0.0/16".parse::<IpNet>().unwrap()]
    );
    assert_eq!(v.session_affinity_timeout, Some(600));
    assert_eq!(v.external_traffic_policy, TrafficPolicy::Local);
    assert_eq!(v.internal_traffic_policy, TrafficPolicy::Local);
    assert_eq!(v.health_check_node_port, Some(31000));
    assert!(v.publish_not_ready_addresses);
    assert_eq!(
        v.annotations.len(),
        1,
        "only meshlite.io/ annotations are carried"
    );
}

#[test]
fn headless_and_external_name() {
    let h = service(&svc(
        "metadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}",
    ))
    .unwrap();
    assert!(h.value.headless);
    assert!(h.value.cluster_ips.is_empty());
    assert_eq!(h.value.namespace, "default");
    let e = service(&svc(
        "metadata: {name: e}\nspec: {type: ExternalName, externalName: db.example.org.}",
    ))
    .unwrap();
    assert_eq!(e.value.external_name.as_deref(), Some("db.example.org"));
    assert!(service(&svc("metadata: {name: e}\nspec: {type: ExternalName}")).is_err());
}

#[test]
fn session_affinity_defaults_to_three_hours() {
    let s = service(&svc(
        "metadata: {name: a}\nspec: {clusterIP: 198.19.0.1, sessionAffinity: ClientIP}",
    ))
    .unwrap();
    assert_eq!(s.value.session_affinity_timeout, Some(10_800));
}

#[test]
fn bad_service_parts_are_dropped_with_reasons() {
    let n = service(&svc(r#"
metadata: {name: web}
spec:
  clusterIPs: [198.19.0.10, 198.19.0.11, "zz"]
  ports:
  - {name: a, port: 80}
  - {name: b, port: 80}
  - {name: c, port: 0}
  - {name: d, port: 81, protocol: ICMP}
  - {name: e, port: 82, targetPort: 70000}
  externalIPs: [198.19.1.1, not-an-ip]
  loadBalancerSourceRanges: [bogus]
"#))
    .unwrap();
    let w = n.warnings.join("\n");
    assert_eq!(n.value.ports.len(), 1, "{w}");
    assert_eq!(n.value.cluster_ips.len(), 1);
    assert_eq!(n.value.external_ips.len(), 1);
    for needle in [
        "second \"198.19.0.11\" of the same family",
        "spec.clusterIPs[2]: invalid IP \"zz\"",
        "duplicate 80/TCP",
        "port 0 out of range",
        "unknown protocol \"ICMP\"",
        "targetPort: 70000 out of range",
        "spec.externalIPs[1]: invalid IP \"not-an-ip\"",
        "invalid CIDR \"bogus\"",
    ] {
        assert!(w.contains(needle), "missing {needle:?} in\n{w}");
    }
}

#[test]
fn invalid_primary_cluster_ip_rejects_the_service() {
    let e = service(&svc(
        "metadata: {name: web, namespace: ns}\nspec: {clusterIP: 198.19.0.999}",
    ))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Service ns/web: spec.clusterIP: invalid IP \"198.19.0.999\""
    );
    assert!(service(&svc("metadata: {name: web}\nspec: {type: Weird}")).is_err());
}

#[test]
fn endpoint_slice_every_field() {
    let s = slice(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
  annotations: {endpoints.kubernetes.io/last-change-trigger-time: "2026-11-26T10:00:00Z"}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP, appProtocol: http}
endpoints:
- addresses: [198.18.0.1]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: node1
  zone: z1
  hints: {forZones: [{name: z1}], forNodes: [{name: node1}]}
  hostname: web-0
  targetRef: {kind: Pod, name: web-0, namespace: shop}
- addresses: [198.18.0.2]
"#,
    );
    let n = endpoint_slice(&s).unwrap();
    assert!(n.warnings.is_empty(), "{:?}", n.warnings);
    let v = n.value;
    assert_eq!(v.service_name, "web");
    assert_eq!(v.address_family, AddressFamily::Ipv4);
    assert_eq!(v.ports[0].port, 8080);
    assert_eq!(v.ports[0].app_protocol.as_deref(), Some("http"));
    let e = &v.endpoints[0];
    assert!(!e.ready && e.serving && e.terminating);
    assert_eq!(e.node_name.as_deref(), Some("node1"));
    assert_eq!(e.zone.as_deref(), Some("z1"));
    assert_eq!(e.zone_hints, vec!["z1"]);
    assert_eq!(e.node_hints, vec!["node1"]);
    assert_eq!(e.hostname.as_deref(), Some("web-0"));
    assert_eq!(e.target_pod.as_deref(), Some("web-0"));
    let e = &v.endpoints[1];
    assert!(
        e.ready && e.serving && !e.terminating,
        "unset conditions mean ready and serving"
    );
    let t = trigger_time(&s.metadata).unwrap();
    assert_eq!(
        t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
        1_795_687_200
    );
}

#[test]
fn bad_slice_parts_are_dropped_with_reasons() {
    let n = endpoint_slice(&slice(
        r#"
metadata: {name: s, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: a, port: 80}, {name: a, port: 81}, {name: b}]
endpoints:
- addresses: ["2001:db8::1"]
- addresses: [bad]
- addresses: [198.18.0.1, "2001:db8::2"]
"#,
    ))
    .unwrap();
    assert_eq!(n.value.ports.len(), 1);
    assert_eq!(n.value.endpoints.len(), 1);
    assert_eq!(n.value.endpoints[0].addresses.len(), 1);
    let w = n.warnings.join("\n");
    assert!(w.contains("is not Ipv4"), "{w}");
    assert!(w.contains("invalid IP \"bad\""), "{w}");
    assert!(w.contains("duplicate name \"a\""), "{w}");
    assert!(w.contains("missing or out-of-range port"), "{w}");
}

#[test]
fn unusable_slices_are_rejected() {
    let no_label = slice("metadata: {name: s}\naddressType: IPv4\nendpoints: []");
    assert!(
        endpoint_slice(&no_label)
            .unwrap_err()
            .reason
            .contains("kubernetes.io/service-name")
    );
    let fqdn = slice(
        "metadata: {name: s, labels: {kubernetes.io/service-name: w}}\naddressType: FQDN\nendpoints: []",
    );
    assert!(endpoint_slice(&fqdn).is_err());
}

#[test]
fn huge_slices_are_capped() {
    let mut s = slice(
        "metadata: {name: s, labels: {kubernetes.io/service-name: w}}\naddressType: IPv4\nendpoints: []",
    );
    for i in 0..1500u32 {
        s.endpoints
            .get_or_insert_default()
            .push(discovery::Endpoint {
                addresses: vec![format!("198.18.{}.{}", i / 250, i % 250 + 1)],
                ..Default::default()
            });
    }
    let n = endpoint_slice(&s).unwrap();
    assert_eq!(n.value.endpoints.len(), MAX_ENDPOINTS_PER_SLICE);
    assert_eq!(n.warnings.len(), 1);
}

#[test]
fn node_fields() {
    let n: core::Node = serde_saphyr::from_str(
        r#"
metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}
spec: {podCIDR: 198.18.1.0/24}
status:
  addresses:
  - {type: InternalIP, address: 198.18.0.1}
  - {type: Hostname, address: n1}
  - {type: ExternalIP, address: bad}
"#,
    )
    .unwrap();
    let v = node(&n).unwrap();
    assert_eq!(v.value.zone.as_deref(), Some("z1"));
    assert_eq!(
        v.value.addresses,
        vec!["198.18.0.1".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        v.value.pod_cidrs,
        vec!["198.18.1.0/24".parse::<IpNet>().unwrap()]
    );
    assert_eq!(v.warnings.len(), 1);
}

#[test]
fn names_must_be_dns_names() {
    assert!(service(&svc("metadata: {name: Web}\nspec: {clusterIP: 198.19.0.1}")).is_err());
    assert!(
        service(&svc(
            "metadata: {name: web, namespace: a/b}\nspec: {clusterIP: 198.19.0.1}"
        ))
        .is_err()
    );
    assert!(
        service(&svc(
            "metadata: {name: web.x}\nspec: {clusterIP: 198.19.0.1}"
        ))
        .is_err(),
        "a Service name is a label"
    );
    let s = slice(
        "metadata: {name: web.abc-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: []",
    );
    assert!(endpoint_slice(&s).is_ok(), "a slice name is a subdomain");
    let s = slice(
        "metadata: {name: x, labels: {kubernetes.io/service-name: \"a/b\"}}\naddressType: IPv4\nendpoints: []",
    );
    assert!(endpoint_slice(&s).is_err());
}

#[test]
fn objects_labelled_for_another_proxy_or_headless_are_ignored_by_the_proxy() {
    let labelled = |labels: &str| {
        svc(&format!(
            "metadata: {{name: web, labels: {{{labels}}}}}\nspec: {{clusterIP: 198.19.0.1}}"
        ))
    };
    let ours = Options {
        service_proxy_name: Some("meshlite".into()),
    };
    let none = Options::default();
    let other = labelled("service.kubernetes.io/service-proxy-name: cilium");
    let mine = labelled("service.kubernetes.io/service-proxy-name: meshlite");
    let plain = labelled("app: web");
    // Without a claimed name, as kube-proxy: only unlabelled objects.
    assert!(
        !super::service(&plain, &none)
            .unwrap()
            .value
            .ignored_by_proxy
    );
    assert!(
        super::service(&other, &none)
            .unwrap()
            .value
            .ignored_by_proxy
    );
    assert!(super::service(&mine, &none).unwrap().value.ignored_by_proxy);
    // Claiming a name: only objects labelled with it.
    assert!(
        super::service(&plain, &ours)
            .unwrap()
            .value
            .ignored_by_proxy
    );
    assert!(
        super::service(&other, &ours)
            .unwrap()
            .value
            .ignored_by_proxy
    );
    assert!(!super::service(&mine, &ours).unwrap().value.ignored_by_proxy);

    let s = |labels: &str| {
        slice(&format!(
            "metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web, {labels}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [198.18.0.1]}}]"
        ))
    };
    assert!(
        !endpoint_slice(&s("app: web"))
            .unwrap()
            .value
            .ignored_by_proxy
    );
    let headless = endpoint_slice(&s("service.kubernetes.io/headless: ''")).unwrap();
    assert!(
        headless.value.ignored_by_proxy,
        "kube-proxy never sees headless slices"
    );
    assert!(
        headless.warnings.is_empty(),
        "an ordinary object, not a bad one"
    );
    assert!(
        endpoint_slice(&s("service.kubernetes.io/service-proxy-name: cilium"))
            .unwrap()
            .value
            .ignored_by_proxy
    );
}

#[test]
fn load_balancer_ips_in_proxy_mode_are_not_captured() {
    let n = service(&svc(r#"
metadata: {name: lb}
spec: {type: LoadBalancer, clusterIP: 198.19.0.1, ports: [{port: 80, nodePort: 30080}]}
status:
  loadBalancer:
    ingress:
    - {ip: 198.19.9.1, ipMode: Proxy}
    - {ip: 198.19.9.2, ipMode: VIP}
    - {ip: 198.19.9.3}
    - {hostname: lb.example}
"#))
    .unwrap();
    assert_eq!(
        n.value.load_balancer_ips,
        vec![
            "198.19.9.2".parse::<IpAddr>().unwrap(),
            "198.19.9.3".parse().unwrap()
        ]
    );
    assert!(n.warnings.is_empty(), "{:?}", n.warnings);
}
