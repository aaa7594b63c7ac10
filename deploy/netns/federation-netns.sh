#!/usr/bin/env bash
# A coordinator and N sites on ONE Linux machine, each in its own network namespace: a multi-host federation
# without a second host. Used by tests/test_deploy_netns.py; handy for trying deploy/ by hand.
#
#   federation-netns.sh up   NAME NET SITE...   # NET: first three octets of a private /24, e.g. 10.213.7
#   federation-netns.sh down NAME               # deletes every namespace NAME-* (and with it the links);
#                                               # stop the processes inside first (it only warns about them)
#   federation-netns.sh addr NAME SITE|coord    # prints that namespace's address
#
# Layout: NAME-coord holds a bridge br0 with NET.1/24; each site NAME-<site> gets eth0 = NET.<2..>/24, its veth
# peer enslaved to br0. Nothing is added to the calling (root) namespace: the /24 exists only inside these
# namespaces, no route leads out of them, and `down` leaves no trace. Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN).
# Run a command inside:  ip netns exec NAME-coord momkd-fed server ...   /  ip netns exec NAME-<site> ...
set -euo pipefail

usage() { sed -n '2,14p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 name=$2
[[ $name =~ ^[A-Za-z0-9_-]{1,20}$ ]] || { echo "NAME: 1-20 of [A-Za-z0-9_-]" >&2; exit 2; }

case $cmd in
up)
    [ $# -ge 4 ] || usage
    net=$3; shift 3
    [[ $net =~ ^(10|192\.168|172\.(1[6-9]|2[0-9]|3[01]))(\.[0-9]{1,3}){1,2}$ ]] || {
        echo "NET: first three octets of a private (RFC 1918) /24, e.g. 10.213.7" >&2; exit 2; }
    coord="$name-coord"
    trap 'echo "setup failed; cleaning up" >&2; "$0" down "$name"' ERR
    ip netns add "$coord"
    ip -n "$coord" link set lo up
    ip -n "$coord" link add br0 type bridge
    ip -n "$coord" addr add "$net.1/24" dev br0
    ip -n "$coord" link set br0 up
    echo "coord $net.1"
    i=2
    for site in "$@"; do
        ns="$name-$site"
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip -n "$coord" link add "v$i" type veth peer name eth0 netns "$ns"
        ip -n "$coord" link set "v$i" master br0 up
        ip -n "$ns" addr add "$net.$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        echo "$site $net.$i"
        i=$((i + 1))
    done
    ;;
down)
    for ns in $(ip netns list | awk '{print $1}'); do
        case $ns in "$name"-*)
            left=$(ip netns pids "$ns" | tr '\n' ' ')
            [ -z "$left" ] || echo "warning: $ns still holds PIDs $left (stop them; the namespace lives on until they exit)" >&2
            ip netns del "$ns" ;;
        esac
    done
    ;;
addr)
    [ $# -eq 3 ] || usage
    ip -n "$name-$3" -4 -o addr show | awk '$2 != "lo" {split($4, a, "/"); print a[1]}'
    ;;
*) usage ;;
esac
