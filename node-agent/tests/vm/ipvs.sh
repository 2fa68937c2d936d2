# IPVS mode end to end, run by dash as PID 1's scenario inside the QEMU VM of
# tools/ipvs-vm.sh (see node-agent/tests/ipvs_vm.rs). Exits 0 only if every check
# passed; prints "@@IPVSVM CHECK OK|FAIL <name> ..." per check.
#
# The VM has no NIC. Inside it: the root namespace is the node (node1, 198.18.200.1),
# namespace "backends" holds four real servers (busybox httpd, 198.18.1.1-4, whose
# CGI answers "rsN client=<peer>"), namespace "client" an off-cluster client
# (198.18.200.2). The control plane (file source, /manifests) and the node agent
# (--mode ipvs) run on the node; at the end it is stopped, cleaned up and started
# in each other mode in turn (iptables, nftables, ipvs).
set -u
PATH=/usr/local/bin:/usr/sbin:/usr/bin
FAILS=
ok() { echo "@@IPVSVM CHECK OK $*"; }
fail() { echo "@@IPVSVM CHECK FAIL $*"; FAILS="$FAILS|$1"; }
sec() { echo; echo "===== $* ===== (uptime $(cut -d' ' -f1 /proc/uptime)s)"; }
get() { ip netns exec client timeout 5 wget -q -O - "$1" 2>&1; }
who() { r=$(get "http://$1/cgi-bin/who"); echo "${r%% *}"; }
# who N times: the answering servers, space separated.
whos() { out=; n=0; while [ $n -lt "$2" ]; do out="$out $(who "$1")"; n=$((n + 1)); sleep 0.1; done; echo "$out"; }
count() { echo "$1" | tr ' ' '\n' | grep -c "^$2\$"; }
distinct() { echo "$1" | tr ' ' '\n' | grep -v '^$' | sort -u | wc -l; }
json() { sed -n "s/.*\"$2\":\"\\([^\"]*\\)\".*/\\1/p" "$1"; }
wait_for() { # seconds, command...: poll every 0.2 s
    t=$(($1 * 5)); shift
    while [ $t -gt 0 ]; do "$@" >/dev/null 2>&1 && return 0; t=$((t - 1)); sleep 0.2; done
    return 1
}
RULE_ARGS="--cluster-cidr 198.18.0.0/17,2001:db8:18::/64 --node-ip 198.18.200.1,2001:db8:200::1
  --nodeport-addresses 198.18.200.1/32,2001:db8:200::1/128"
AGENT_ARGS="--mode ipvs --node-name node1 --insecure --ip-families ipv4,ipv6
  --admin-listen 127.0.0.1:0 --healthz-bind-address 127.0.0.1:0 --addresses-file /run/agent.json
  $RULE_ARGS --ipvs-graceful-termination-timeout 6s --sync-period 30s
  --ipvs-tcp-timeout 600s --ipvs-udp-timeout 45s"

sec "startup check without IPVS (modprobe unavailable, no module loaded yet)"
out=$(PATH=/nonexistent /usr/local/bin/meshlite-node-agent $AGENT_ARGS --control-plane http://127.0.0.1:9 2>&1)
rc=$?
echo "$out" | tail -n 3
case "$out" in
    *"missing kernel modules ip_vs"*) [ $rc -ne 0 ] && ok startup-check "exit $rc, names ip_vs" || fail startup-check "exit 0" ;;
    *) fail startup-check "rc=$rc: no message naming ip_vs" ;;
esac

sec network
ip netns add backends && ip netns add client || fail setup netns
ip link add rs-host type veth peer name rs-ns && ip link set rs-ns netns backends
ip addr add 198.18.1.254/24 dev rs-host && ip link set rs-host up
ip -n backends link set lo up
for i in 1 2 3 4; do ip -n backends addr add 198.18.1.$i/24 dev rs-ns; done
ip -n backends link set rs-ns up && ip -n backends route add default via 198.18.1.254
ip link add cl-host type veth peer name cl-ns && ip link set cl-ns netns client
ip addr add 198.18.200.1/24 dev cl-host && ip link set cl-host up
ip -n client link set lo up && ip -n client addr add 198.18.200.2/24 dev cl-ns
ip -n client link set cl-ns up && ip -n client route add default via 198.18.200.1
# IPv6: the same links (nodad: usable at once).
sysctl -qw net.ipv6.conf.all.forwarding=1
ip addr add 2001:db8:18::fe/64 dev rs-host nodad
for i in 1 2; do ip -n backends addr add 2001:db8:18::$i/64 dev rs-ns nodad; done
ip -n backends route add default via 2001:db8:18::fe
ip addr add 2001:db8:200::1/64 dev cl-host nodad
ip -n client addr add 2001:db8:200::2/64 dev cl-ns nodad
ip -n client route add default via 2001:db8:200::1
for i in 1 2 3 4; do
    mkdir -p /srv/rs$i/cgi-bin
    printf '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\n"\necho "rs%s client=$REMOTE_ADDR"\n' $i \
        > /srv/rs$i/cgi-bin/who
    chmod 755 /srv/rs$i/cgi-bin/who
    ip netns exec backends httpd -p 198.18.1.$i:80 -h /srv/rs$i || fail setup "httpd rs$i"
done
for i in 1 2; do
    ip netns exec backends httpd -p "[2001:db8:18::$i]:80" -h /srv/rs$i || fail setup "httpd rs$i (IPv6)"
done

sec manifests
mkdir -p /manifests
slice() { # slice-name service "ip ..." [address type]
    printf 'apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: %s\n  namespace: default\n  labels:\n    kubernetes.io/service-name: %s\naddressType: %s\nports:\n  - name: http\n    protocol: TCP\n    port: 80\n' "$1" "$2" "${4:-IPv4}"
    if [ -z "$3" ]; then echo "endpoints: []"; return; fi
    echo "endpoints:"
    for a in $3; do
        printf '  - addresses: ["%s"]\n    conditions: {ready: true, serving: true, terminating: false}\n    nodeName: node2\n' "$a"
    done
}
service() { # name cluster-ip [scheduler] [extra spec lines] [extra annotation lines]
    printf -- '---\napiVersion: v1\nkind: Service\nmetadata:\n  name: %s\n  namespace: default\n  annotations:\n    meshlite.io/test: "yes"\n' "$1"
    [ -n "${3:-}" ] && printf '    meshlite.io/ipvs-scheduler: %s\n' "$3"
    [ -n "${5:-}" ] && printf '%s\n' "$5"
    case $2 in *:*) fam=IPv6 ;; *) fam=IPv4 ;; esac
    printf 'spec:\n  clusterIP: %s\n  clusterIPs: ["%s"]\n  ipFamilies: ["%s"]\n' "$2" "$2" "$fam"
    [ -n "${4:-}" ] && printf '%s\n' "$4"
    printf '  ports:\n    - name: http\n      protocol: TCP\n      port: 80\n      targetPort: 80\n'
    if [ "$1" = np ]; then printf '      nodePort: 30080\n'; fi
}
RS3="198.18.1.1 198.18.1.2 198.18.1.3"
{
    service rr 198.19.0.10
    service sh 198.19.0.11 sh
    service lc 198.19.0.12 lc
    service nq 198.19.0.13 nq
    service sed 198.19.0.14 sed
    service wrr 198.19.0.15 wrr "" '    meshlite.io/ipvs-weights: "198.18.1.1=3,198.18.1.2=1"'
    service dh 198.19.0.16 dh
    service aff 198.19.0.18 "" '  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}'
    service rm 198.19.0.19
    service np 198.19.0.20 "" '  type: NodePort
  externalIPs: ["198.19.50.1"]'
    service none 198.19.0.21
    service v6 2001:db8:19::10
} > /manifests/services.yaml
{
    for s in rr sh lc nq sed dh aff; do slice "$s-1" "$s" "$RS3"; echo ---; done
    slice wrr-1 wrr "198.18.1.1 198.18.1.2"; echo ---
    slice np-1 np "198.18.1.1 198.18.1.2"; echo ---
    slice none-1 none ""; echo ---
    slice v6-1 v6 "2001:db8:18::1 2001:db8:18::2" IPv6
} > /manifests/slices.yaml
slice rm-1 rm "$RS3" > /manifests/rm.yaml
cat > /manifests/node.yaml <<'EOF'
apiVersion: v1
kind: Node
metadata:
  name: node1
status:
  addresses:
    - type: InternalIP
      address: 198.18.200.1
EOF

sec "control plane and node agent"
meshlite-control-plane --source file:/manifests --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --insecure --addresses-file /run/cp.json > /run/cp.log 2>&1 &
CP_PID=$!
wait_for 60 test -s /run/cp.json || fail setup "control plane wrote no addresses"
GRPC=$(json /run/cp.json grpc)
start_agent() { # log file; runs $AGENT_ARGS
    rm -f /run/agent.json
    RUST_LOG=info,meshlite_node_agent::ipvs=debug meshlite-node-agent $AGENT_ARGS \
        --control-plane "http://$GRPC" > "$1" 2>&1 &
    AGENT_PID=$!
    wait_for 60 test -s /run/agent.json || { fail setup "agent wrote no addresses"; tail -n 30 "$1"; return 1; }
    ADMIN=$(json /run/agent.json admin)
    wait_for 90 wget -q -O /dev/null "http://$ADMIN/readyz" || { fail setup "agent not ready"; tail -n 30 "$1"; return 1; }
    echo "agent $AGENT_PID ready (admin $ADMIN)"
}
start_agent /run/agent1.log
grep -i "ipvs ready\|warn\|error" /run/agent1.log | head -n 10
ipvsadm -Ln

t=$(ipvsadm -L --timeout)
case "$t" in
    *"600 120 45"*) ok timeouts "$t (tcpfin left at the kernel's)" ;;
    *) fail timeouts "$t" ;;
esac

sec "ipvsadm -Ln matches render --mode ipvs"
norm() {
    awk '$1 == "TCP" || $1 == "UDP" || $1 == "SCTP" {
             if (svc != "" && n == 0) print svc " |"
             svc = $1; for (i = 2; i <= NF; i++) svc = svc " " $i; n = 0; next }
         $1 == "->" && $2 != "RemoteAddress:Port" { print svc " | " $2 " " $3 " " $4; n++ }
         END { if (svc != "" && n == 0) print svc " |" }' | sort
}
for f in ipv4 ipv6; do
    meshlite-node-agent render --mode ipvs --manifests /manifests --node-name node1 --ip-family $f \
        $RULE_ARGS > /run/render.$f 2>/run/render.err || fail render-matches "render $f failed: $(cat /run/render.err)"
done
cat /run/render.ipv4 > /run/render.txt
sed -n '/^# IPVS virtual servers/,/^$/p' /run/render.ipv4 /run/render.ipv6 | norm > /run/render.norm
ipvsadm -Ln | norm > /run/kernel.norm
if [ -s /run/kernel.norm ] && cmp -s /run/render.norm /run/kernel.norm; then
    ok render-matches "$(wc -l < /run/kernel.norm) virtual/real server lines identical"
else
    fail render-matches "differs"; diff /run/render.norm /run/kernel.norm
fi
grep -q 'add KUBE-CLUSTER-IP 198.19.0.10,tcp:80' /run/render.txt && ipset list KUBE-CLUSTER-IP | grep -q '^198.19.0.10,tcp:80' \
    && ok render-ipsets "KUBE-CLUSTER-IP members in render and kernel" || fail render-ipsets "cluster IP set"

sec "schedulers"
r=$(whos 198.19.0.10 9)
[ "$(count "$r" rs1)" = 3 ] && [ "$(count "$r" rs2)" = 3 ] && [ "$(count "$r" rs3)" = 3 ] \
    && ok rr "even:$r" || fail rr "uneven:$r"
r=$(whos 198.19.0.11 6)
[ "$(distinct "$r")" = 1 ] && ok sh "one client, one endpoint:$r" || fail sh "$r"
r=$(whos 198.19.0.16 6)
[ "$(distinct "$r")" = 1 ] && ok dh "one destination, one endpoint:$r" || fail dh "$r"
r=$(whos 198.19.0.15 8)
[ "$(count "$r" rs1)" = 6 ] && [ "$(count "$r" rs2)" = 2 ] && ok wrr "weights 3:1 ->$r" || fail wrr "$r"
r=$(whos 198.19.0.18 6)
[ "$(distinct "$r")" = 1 ] && ok affinity "persistent:$r" || fail affinity "$r"
ipvsadm -Ln -t 198.19.0.18:80 | grep -q 'persistent 60' && ok affinity-timeout "persistent 60" || fail affinity-timeout "$(ipvsadm -Ln -t 198.19.0.18:80)"

# lc, nq, sed: two connections held open land on two endpoints; the idle third
# one must get every new connection.
for s in lc:198.19.0.12 nq:198.19.0.13 sed:198.19.0.14; do
    name=${s%%:*} vip=${s#*:}
    pids=
    for h in 1 2; do
        sleep 20 | ip netns exec client nc $vip 80 >/dev/null 2>&1 &
        pids="$pids $!"
        sleep 0.5
    done
    wait_for 5 sh -c "[ \$(ipvsadm -Ln -t $vip:80 | awk '\$1 == \"->\" && \$2 != \"RemoteAddress:Port\" && \$5 == 1' | wc -l) = 2 ]"
    busy=$(ipvsadm -Ln -t $vip:80 | awk '$1 == "->" && $2 != "RemoteAddress:Port" && $5 > 0 {print $2}' | tr '\n' ' ')
    r=$(whos $vip 4)
    first=$(echo $r | cut -d' ' -f1)
    idle=198.18.1.${first#rs}:80
    case " $busy" in
        *" $idle "*) fail $name "went to a loaded endpoint $idle (loaded: $busy):$r" ;;
        *) if [ "$(distinct "$r")" = 1 ] && [ "$(echo $busy | wc -w)" = 2 ]; then ok $name "idle endpoint $idle took all:$r (loaded: $busy)"
           else fail $name "loaded: $busy; got:$r"; fi ;;
    esac
    ipvsadm -Ln -t $vip:80
    kill $pids 2>/dev/null
done

sec "NodePort, external IP, no endpoints"
r=$(who 198.18.200.1:30080)
case $r in rs1|rs2) ok nodeport "198.18.200.1:30080 -> $r" ;; *) fail nodeport "'$(get http://198.18.200.1:30080/cgi-bin/who)'" ;; esac
r=$(who 198.19.50.1)
case $r in rs1|rs2) ok external-ip "198.19.50.1:80 -> $r" ;; *) fail external-ip "'$(get http://198.19.50.1/cgi-bin/who)'" ;; esac
r=$(whos '[2001:db8:19::10]' 4)
[ "$(count "$r" rs1)" = 2 ] && [ "$(count "$r" rs2)" = 2 ] && ok ipv6 "[2001:db8:19::10]:80 rr:$r" || fail ipv6 "$r $(get 'http://[2001:db8:19::10]/cgi-bin/who')"
r=$(get http://198.19.0.21/)
case $r in *refused*) ok reject "no endpoints: $r" ;; *) fail reject "'$r'" ;; esac
ip addr show kube-ipvs0 | grep -q '198.19.50.1/32' && ok dummy-addresses "service IPs on kube-ipvs0" || fail dummy-addresses "$(ip addr show kube-ipvs0)"

sec "restart: neither flush nor duplicate"
ipvsadm -Sn | sort > /run/before.txt
inact=$(ipvsadm -Ln -t 198.19.0.10:80 | awk '$1 == "->" {s += $6} END {print s + 0}')
kill -TERM $AGENT_PID; wait $AGENT_PID
start_agent /run/agent2.log
ipvsadm -Sn | sort > /run/after.txt
inact2=$(ipvsadm -Ln -t 198.19.0.10:80 | awk '$1 == "->" {s += $6} END {print s + 0}')
first=$(grep -m1 'ipvs diff' /run/agent2.log)
echo "first sync after restart: $first"
if cmp -s /run/before.txt /run/after.txt && [ "$inact" -gt 0 ] && [ "$inact2" -ge "$inact" ]; then
    case $first in
        *"full=true upserts=0 deletes=0"*) ok restart "same table, 0 operations, connections kept (inactive $inact -> $inact2)" ;;
        *) fail restart "first sync wrote: $first" ;;
    esac
else
    fail restart "table or connections changed (inactive $inact -> $inact2)"; diff /run/before.txt /run/after.txt
fi

sec "endpoint removal (graceful termination)"
r=$(whos 198.19.0.19 3)
echo "before:$r"
slice rm-1 rm "198.18.1.1 198.18.1.2" > /manifests/rm.tmp && mv /manifests/rm.tmp /manifests/rm.yaml
if wait_for 15 sh -c "ipvsadm -Ln -t 198.19.0.19:80 | awk '\$2 == \"198.18.1.3:80\" && \$4 == 0' | grep -q ."; then
    ok removal-weight0 "198.18.1.3:80 drained at weight 0"
else
    fail removal-weight0 "$(ipvsadm -Ln -t 198.19.0.19:80)"
fi
ipvsadm -Ln -t 198.19.0.19:80
r=$(whos 198.19.0.19 6)
[ "$(count "$r" rs3)" = 0 ] && [ "$(distinct "$r")" = 2 ] && ok removal-no-new "no new connection to rs3:$r" || fail removal-no-new "$r"
if wait_for 20 sh -c "! ipvsadm -Ln -t 198.19.0.19:80 | grep -q 198.18.1.3:80"; then
    ok removal-deleted "deleted after the 6 s graceful timeout"
else
    fail removal-deleted "$(ipvsadm -Ln -t 198.19.0.19:80)"
fi

sec "state"
ipvsadm -Ln
ipset list -t | grep -E 'Name|entries'
iptables-save -t nat | grep -v '^#'
tail -n 5 /run/agent2.log
kill -TERM $AGENT_PID $CP_PID 2>/dev/null
wait $AGENT_PID $CP_PID 2>/dev/null

sec "cleanup (kube-proxy --cleanup)"
# Someone else's virtual server, protected by --ipvs-exclude-cidrs.
ipvsadm -A -t 198.19.250.1:80 -s rr
out=$(meshlite-node-agent cleanup --ipvs-exclude-cidrs 198.19.250.0/24 2>&1); rc=$?
echo "$out"
ipvsadm -Ln -t 198.19.250.1:80 >/dev/null 2>&1 && foreign_kept=yes || foreign_kept=no
ipvsadm -D -t 198.19.250.1:80 2>/dev/null
left_vs=$(ipvsadm -Sn | wc -l)
left_sets=$(ipset list -n | grep -c '^KUBE-')
left_chains=$( (iptables-save; ip6tables-save) | grep -E '^:KUBE-' | grep -v -E '^:KUBE-(FIREWALL|KUBELET-CANARY) ' | wc -l)
if [ $rc = 0 ] && [ "$foreign_kept" = yes ] && [ "$left_vs" = 0 ] && [ "$left_sets" = 0 ] && [ "$left_chains" = 0 ] && ! ip link show kube-ipvs0 >/dev/null 2>&1; then
    ok cleanup "no virtual servers (but the excluded one), ipsets, KUBE chains or kube-ipvs0 left"
else
    fail cleanup "rc=$rc foreign kept=$foreign_kept virtual servers=$left_vs sets=$left_sets chains=$left_chains"
    ip link show kube-ipvs0; (iptables-save; ip6tables-save) | grep KUBE-
fi

sec "mode switches: stop the agent, cleanup, start it in another mode"
# What every mode can leave in the kernel, on one line. iptables-save lists only
# iptables' own tables (iptables-nft's included), nft's kube-proxy tables are ours.
# kubelet's KUBE-FIREWALL (which the iptables mode also writes, as kube-proxy
# does) and KUBE-KUBELET-CANARY are kubelet's: cleanup keeps them, as kube-proxy's.
state() {
    ipt=$( (iptables-save -t nat; iptables-save -t filter; ip6tables-save -t nat; ip6tables-save -t filter) 2>/dev/null |
        grep '^:KUBE-' | grep -c -v -E '^:KUBE-(FIREWALL|KUBELET-CANARY) ')
    svc=$( (iptables-save -t nat; ip6tables-save -t nat) 2>/dev/null | grep -c '^:KUBE-S[VE][CP]-')
    nft=$(nft list tables 2>/dev/null | grep -c ' kube-proxy$')
    vs=$(ipvsadm -Sn | wc -l)
    sets=$(ipset list -n | grep -c '^KUBE-')
    ip link show kube-ipvs0 >/dev/null 2>&1 && dummy=yes || dummy=no
    echo "ipt=$ipt svc-chains=$svc nft=$nft vs=$vs sets=$sets dummy=$dummy"
}
meshlite-control-plane --source file:/manifests --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --insecure --addresses-file /run/cp2.json > /run/cp2.log 2>&1 &
CP_PID=$!
wait_for 60 test -s /run/cp2.json || fail mode-switch "control plane wrote no addresses"
GRPC=$(json /run/cp2.json grpc)
MODE_ARGS="--node-name node1 --insecure --ip-families ipv4,ipv6
  --admin-listen 127.0.0.1:0 --healthz-bind-address 127.0.0.1:0 --addresses-file /run/agent.json $RULE_ARGS"
prev=clean path=clean before=$FAILS
for m in iptables nftables ipvs iptables ipvs nftables; do
    AGENT_ARGS="--mode $m $MODE_ARGS"
    start_agent /run/agent-switch.log || { fail mode-switch "$prev -> $m: agent did not start"; break; }
    r=$(who 198.19.0.10)
    s=$(state)
    # The running mode's own state only; the IPVS mode has iptables rules too,
    # but none of the iptables mode's per-service chains.
    case $m:$s in
        "iptables:ipt="[1-9]*" nft=0 vs=0 sets=0 dummy=no") good=yes ;;
        "nftables:ipt=0 svc-chains=0 nft=2 vs=0 sets=0 dummy=no") good=yes ;;
        "ipvs:ipt="[1-9]*" svc-chains=0 nft=0 vs="[1-9]*" sets="[1-9]*" dummy=yes") good=yes ;;
        *) good=no ;;
    esac
    case $r in rs1|rs2|rs3) ;; *) good=no ;; esac
    echo "$prev -> $m: 198.19.0.10 answered '$r'; $s"
    [ $good = yes ] || fail mode-switch "$prev -> $m: answered '$r'; $s"
    kill -TERM $AGENT_PID; wait $AGENT_PID
    out=$(meshlite-node-agent cleanup 2>&1); rc=$?
    echo "$out" | sed 's/^/  cleanup: /'
    s=$(state)
    [ $rc = 0 ] && [ "$s" = "ipt=0 svc-chains=0 nft=0 vs=0 sets=0 dummy=no" ] ||
        fail mode-switch "after $m and cleanup (rc=$rc): $s"
    prev=$m path="$path -> $m"
done
kill -TERM $CP_PID 2>/dev/null; wait $CP_PID 2>/dev/null
[ "$FAILS" = "$before" ] && [ "$prev" = nftables ] &&
    ok mode-switch "$path: each mode answered with only its own state; cleanup left nothing"
[ -z "$FAILS" ]
