#!/usr/bin/env bash
# IPIP end to end on a kernel that has it (issue 19), run inside the test VM:
#   scripts/vm --file scripts/lab --file scripts/lib/common.sh tests/vm/ipip.sh
# (scripts/test does). The lab of scripts/lab, two nodes with the pool in ipipMode Always:
# tunl0 with the node's tunnel address from IPAM (the Node's ipv4IPIPTunnelAddr), remote
# blocks via <node> dev tunl0 proto 80 onlink, pods' MTU 1480, pods ping across nodes and
# node-1's port on the hub's bridge sees IP protocol 4 (node addresses outside, pod addresses inside); the
# pool switched to Never while a ping runs (routes move to eth0, plain ICMP on the wire, at
# most a few packets lost) and back; NAT outgoing (the hub sees the node's address); a
# calico-node crash and restart with tunl0 traffic flowing. Then three nodes in two subnets with
# ipipMode CrossSubnet: the same subnet unencapsulated, the other through tunl0.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
LAB=${CALICO_LAB_DIR:-/tmp/calico-node-lab}
BIN=$ROOT/target/debug
ETCD=http://10.99.0.254:2379
export CALICO_LAB_IN_VM=1

fail() { echo "FAIL: $*"; exit 1; }
ok() { echo "ok: $*"; }
calicoctl() { ip netns exec cnlab-hub env ETCD_ENDPOINTS="$ETCD" "$BIN/calicoctl" -c "$LAB/none.cfg" "$@"; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
pod_ip() { ip -n "$1" -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1; }
# Wait until `$@` succeeds (30 s), else fail with the last output.
wait_for() {
    local what=$1; shift
    for _ in $(seq 1 150); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    "$@" || true
    fail "$what"
}
# The pool with these modes, applied through calicoctl.
pool_modes() {
    calicoctl apply -f - >/dev/null <<YAML
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: default-ipv4-ippool
spec:
  cidr: 10.244.0.0/16
  ipipMode: $1
  vxlanMode: $2
  natOutgoing: true
  nodeSelector: all()
YAML
}
# Capture on node-1's port of the hub's bridge while `$@` runs; the capture decoded.
capture() {
    local filter=$1; shift
    in_ns cnlab-hub tcpdump -Z root -i veth-n1 -n -U -w /tmp/cap.pcap "$filter" >/tmp/tcpdump.log 2>&1 &
    local pid=$!
    sleep 2
    "$@" >/dev/null 2>&1 || true
    sleep 0.5
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    tcpdump -Z root -n -r /tmp/cap.pcap 2>/dev/null || { cat /tmp/tcpdump.log >&2; true; }
}
# Packets lost by a ping of `count` packets every 0.2 s from pod namespace $1 to $2, while
# `$@` (after the first three arguments) runs in the middle.
lost_during() {
    local from=$1 to=$2 count=$3; shift 3
    in_ns "$from" ping -i 0.2 -c "$count" -W 1 "$to" >/tmp/ping.out 2>&1 &
    local pid=$!
    sleep 2
    "$@"
    wait "$pid" || true
    local tx rx
    tx=$(awk '/packets transmitted/ {print $1}' /tmp/ping.out)
    rx=$(awk '/packets transmitted/ {print $4}' /tmp/ping.out)
    echo $((tx - rx))
}

echo "=== two nodes, ipipMode Always"
bash scripts/lab up --mode ipip --nodes 2
N1=cnlab-node-1 N2=cnlab-node-2 P1=cnlab-pod-1-1 P2=cnlab-pod-2-1
A=$(pod_ip $P1) B=$(pod_ip $P2)

tunnel=$(ip -n $N1 -4 -o addr show tunl0 | awk '{print $4}')
[ -n "$tunnel" ] || fail "tunl0 on node-1 has no address"
ip -n $N1 link show tunl0 | grep -q "state UP\|,UP" || fail "tunl0 on node-1 is not up: $(ip -n $N1 link show tunl0)"
stored=$(calicoctl get node node-1 -o json | grep -o '"ipv4IPIPTunnelAddr": *"[0-9.]*"' | grep -o '[0-9.]*"$' | tr -d '"')
[ "${tunnel%/32}" = "$stored" ] || fail "tunl0 has $tunnel, the Node says ipv4IPIPTunnelAddr $stored"
ok "tunl0 up with $tunnel, the Node's ipv4IPIPTunnelAddr"

block2=$(ip -n $N2 route | awk '/^blackhole/ {print $2}')
ip -n $N1 route | grep -q "^$block2 via 10.99.0.2 dev tunl0 proto 80 onlink" ||
    fail "no route to node-2's block $block2 via tunl0: $(ip -n $N1 route)"
ok "node-2's block $block2 via 10.99.0.2 dev tunl0 proto 80 onlink"

mtu=$(ip -n $P1 link show eth0 | grep -o 'mtu [0-9]*' | cut -d' ' -f2)
[ "$mtu" = 1480 ] || fail "pod MTU $mtu, want 1480 (20 below the uplink's 1500)"
ok "pod MTU 1480"

wire=$(capture "ip proto 4" in_ns $P1 ping -c 3 -W 1 "$B")
echo "$wire" | grep -q "IP 10.99.0.1 > 10.99.0.2: IP $A > $B: ICMP echo request" ||
    fail "no IPIP on the wire with node addresses outside and pod addresses inside: $wire"
echo "$wire" | grep -q "IP 10.99.0.2 > 10.99.0.1: IP $B > $A: ICMP echo reply" ||
    fail "no IPIP echo reply on the wire: $wire"
ok "the wire carries IP protocol 4: $(echo "$wire" | head -1)"

echo "=== the pool to ipipMode Never while a ping runs, and back"
switch_never() {
    pool_modes Never Never
    wait_for "routes on eth0" bash -c "ip -n $N1 route | grep -q '^$block2 via 10.99.0.2 dev eth0 proto 80'"
}
lost=$(lost_during $P1 "$B" 50 switch_never)
[ "$lost" -le 5 ] || fail "$lost packets lost switching to Never: $(cat /tmp/ping.out)"
ok "switched to Never with $lost of 50 packets lost"
wire=$(capture "icmp and host $A" in_ns $P1 ping -c 3 -W 1 "$B")
echo "$wire" | grep -q "IP $A > $B: ICMP echo request" || fail "no plain ICMP between the pods: $wire"
echo "$wire" | grep -q "IP 10.99.0.1 > 10.99.0.2: IP" && fail "still encapsulated: $wire"
ok "plain ICMP on the wire: $(echo "$wire" | head -1)"
switch_always() {
    pool_modes Always Never
    wait_for "routes back on tunl0" bash -c "ip -n $N1 route | grep -q '^$block2 via 10.99.0.2 dev tunl0 proto 80 onlink'"
}
lost=$(lost_during $P1 "$B" 50 switch_always)
[ "$lost" -le 5 ] || fail "$lost packets lost switching back to Always: $(cat /tmp/ping.out)"
ok "back to Always with $lost of 50 packets lost"

echo "=== NAT outgoing with IPIP"
wire=$(capture "icmp" in_ns $P1 ping -c 2 -W 1 10.99.0.254)
echo "$wire" | grep -q "IP 10.99.0.1 > 10.99.0.254: ICMP echo request" ||
    fail "the hub does not see the node's address for a pod's traffic leaving the pool: $wire"
echo "$wire" | grep -q "IP $A > " && fail "the pod's address left the pool: $wire"
ok "a pod reaching outside the pool appears as its node (10.99.0.1)"

echo "=== calico-node restart on node-1 with tunl0 traffic flowing"
# A crash and restart (kill -9): node-2 keeps node-1's routes for the graceful-restart time
# (RFC 4724) and node-1's kernel keeps its own, so the traffic does not stop. (A SIGTERM
# sends Cease to the peers, which withdraw the routes until the session is back.)
restart_node1() {
    local pid; pid=$(cat "$LAB/node-1.pid")
    kill -KILL "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    ip netns exec $N1 env NODENAME=node-1 ETCD_ENDPOINTS="$ETCD" \
        IP_AUTODETECTION_METHOD=interface=eth0 CALICO_IPV4POOL_CIDR=10.244.0.0/16 \
        CALICO_IPV4POOL_IPIP=Always CALICO_STATE_DIR="$LAB/node-1" \
        CALICO_BGP_STATUS_SOCKET="$LAB/node-1/bgp-status.sock" \
        "$BIN/calico-node" >>"$LAB/node-1.log" 2>&1 &
    echo $! >"$LAB/node-1.pid"
    wait_for "node-1 ready again" ip netns exec $N1 "$BIN/calico-node" -felix-ready
}
# (The switch to Never released the tunnel address and Always took one again.)
tunnel=$(ip -n $N1 -4 -o addr show tunl0 | awk '{print $4}')
lost=$(lost_during $P1 "$B" 60 restart_node1)
[ "$lost" -le 3 ] || fail "$lost packets lost over tunl0 while calico-node restarted: $(cat /tmp/ping.out)"
now=$(ip -n $N1 -4 -o addr show tunl0 | awk '{print $4}')
[ "$now" = "$tunnel" ] || fail "tunl0's address changed over the restart: $tunnel -> $now"
ok "restart with $lost of 60 packets lost, tunl0 unchanged"

echo "=== three nodes in two subnets, ipipMode CrossSubnet"
bash scripts/lab down >/dev/null
bash scripts/lab up --mode crosssubnet --nodes 3 >/dev/null
pool_modes CrossSubnet Never
N1=cnlab-node-1
b2=$(ip -n cnlab-node-2 route | awk '/^blackhole/ {print $2}')
b3=$(ip -n cnlab-node-3 route | awk '/^blackhole/ {print $2}')
wait_for "node-2's block unencapsulated" bash -c "ip -n $N1 route | grep -q '^$b2 via 10.99.0.2 dev eth0 proto 80'"
wait_for "node-3's block through tunl0" bash -c "ip -n $N1 route | grep -q '^$b3 via 10.99.1.3 dev tunl0 proto 80 onlink'"
ok "same subnet via eth0, the other subnet via tunl0"
A=$(pod_ip cnlab-pod-1-1) C=$(pod_ip cnlab-pod-3-1) B=$(pod_ip cnlab-pod-2-1)
wait_for "pod on node-1 reaches the pod on node-3" in_ns cnlab-pod-1-1 ping -c 1 -W 1 "$C"
wait_for "pod on node-1 reaches the pod on node-2" in_ns cnlab-pod-1-1 ping -c 1 -W 1 "$B"
wire=$(capture "ip proto 4" in_ns cnlab-pod-1-1 ping -c 2 -W 1 "$C")
echo "$wire" | grep -q "IP 10.99.0.1 > 10.99.1.3: IP $A > $C: ICMP echo request" ||
    fail "the other subnet is not encapsulated: $wire"
wire=$(capture "ip proto 4" in_ns cnlab-pod-1-1 ping -c 2 -W 1 "$B")
[ -z "$wire" ] || fail "the same subnet is encapsulated: $wire"
ok "pods reach each other; only the other subnet's traffic is IPIP"
bash scripts/lab down >/dev/null
echo "ALL IPIP CHECKS PASSED"
