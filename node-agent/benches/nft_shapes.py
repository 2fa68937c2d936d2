#!/usr/bin/env python3
"""Load-balancing shapes for the nftables mode, to compare what the kernel pays to load each.

    python3 node-agent/benches/nft_shapes.py SHAPE SERVICES ENDPOINTS > shape.nft
    ip netns add shapes && time ip netns exec shapes nft -f shape.nft; ip netns del shapes

SHAPE: rules (one `numgen random mod k == 0` rule per endpoint, each DNATing),
named (a named map per service), anon (an anonymous map per service),
global (one map keyed by daddr . dport . numgen), kp (kube-proxy's numgen vmap to
endpoint chains). Figures: node-agent/README.md, "How a service picks its endpoint".
"""
import sys
shape, n, eps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
o = []
w = o.append
w("add table ip kube-proxy")
w("add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }")
w("add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }")
w("add chain ip kube-proxy services")
w("add rule ip kube-proxy nat-prerouting jump services")
w("add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips")
if shape == "global":
    w("add map ip kube-proxy endpoints { typeof ip daddr . tcp dport . numgen random mod 2 : ip daddr . tcp dport ; }")
def vip(i): return f"198.19.{i//250}.{i%250+1}" if i < 62500 else f"198.20.{(i-62500)//250}.{(i-62500)%250+1}"
def ep(i, j):
    k = i*eps + j
    return f"10.{k//65536}.{(k//256)%256}.{k%256}"
for i in range(n):
    v = vip(i)
    s = f"service-{i:08X}-ns/svc{i}/tcp/p80"
    w(f"add chain ip kube-proxy {s}")
    if shape == "kp":  # anonymous vmap to endpoint chains
        ents = []
        for j in range(eps):
            e = f"endpoint-{i:08X}-{j}"
            w(f"add chain ip kube-proxy {e}")
            w(f"add rule ip kube-proxy {e} meta l4proto tcp dnat to {ep(i,j)}:80")
            ents.append(f"{j} : goto {e}")
        w(f"add rule ip kube-proxy {s} numgen random mod {eps} vmap {{ {', '.join(ents)} }}")
    elif shape == "anon":  # anonymous dnat map in service chain
        ents = ", ".join(f"{j} : {ep(i,j)} . 80" for j in range(eps))
        w(f"add rule ip kube-proxy {s} meta l4proto tcp dnat to numgen random mod {eps} map {{ {ents} }}")
    elif shape == "named":  # named map per service
        m = f"endpoints-{i:08X}"
        w(f"add map ip kube-proxy {m} {{ typeof numgen random mod 2 : ip daddr . tcp dport ; }}")
        ents = ", ".join(f"{j} : {ep(i,j)} . 80" for j in range(eps))
        w(f"add element ip kube-proxy {m} {{ {ents} }}")
        w(f"add rule ip kube-proxy {s} meta l4proto tcp dnat to numgen random mod {eps} map @{m}")
    elif shape == "rules":  # iptables-like probabilities, no sets
        for j in range(eps):
            left = eps - j
            cond = f"numgen random mod {left} 0 " if left > 1 else ""
            w(f"add rule ip kube-proxy {s} {cond}meta l4proto tcp dnat to {ep(i,j)}:80")
    elif shape == "global":  # one shared map keyed by vip . port . index
        ents = ", ".join(f"{v} . 80 . {j} : {ep(i,j)} . 80" for j in range(eps))
        w(f"add element ip kube-proxy endpoints {{ {ents} }}")
        w(f"add rule ip kube-proxy {s} meta l4proto tcp dnat to ip daddr . th dport . numgen random mod {eps} map @endpoints")
    w(f"add element ip kube-proxy service-ips {{ {v} . tcp . 80 : goto {s} }}")
print("\n".join(x for x in o if x))
