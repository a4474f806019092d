#!/usr/bin/env bash
# Multi-host ZeroMQ deployment: every node of a topology runs `devit-mq node TOPOLOGY --name NAME` on
# its own host (the one its `host:` names). This script prints those commands, or runs them over ssh.
#
#   launch/zmq-multihost.sh topologies/multihost.yaml            # print the command for each host
#   launch/zmq-multihost.sh topologies/multihost.yaml --ssh      # start them over ssh
#
# Nothing assumes the hosts share this machine's layout; each host needs `pip install devit-mq`, the
# topology file, the bundle and (with CURVE) its keys, wherever it keeps them:
#   REMOTE_DEVIT     the command on the hosts        (default: devit-mq, i.e. on their PATH)
#   REMOTE_TOPOLOGY  the topology file on the hosts  (default: /etc/devit-mq/topology.yaml)
#   REMOTE_BUNDLE    the bundle folder on the hosts  (default: none, the topology's `bundle:`)
#   REMOTE_KEYS_DIR  the CURVE keys on the hosts     (default: none, the topology's `security.keys_dir`)
# Start order does not matter: ZeroMQ reconnects, and nodes wait for their peers' handshake.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [[ $# -lt 1 ]]; then
    echo "usage: $0 TOPOLOGY.yaml [--ssh]" >&2
    exit 2
fi
topology="$1"
mode="${2:-print}"
devit="$repo/.venv/bin/devit-mq"
[[ -x "$devit" ]] || devit="$(command -v devit-mq)"
remote_cmd="${REMOTE_DEVIT:-devit-mq} node ${REMOTE_TOPOLOGY:-/etc/devit-mq/topology.yaml}"
extra=""
[[ -n "${REMOTE_BUNDLE:-}" ]] && extra+=" --bundle ${REMOTE_BUNDLE}"
[[ -n "${REMOTE_KEYS_DIR:-}" ]] && extra+=" --keys-dir ${REMOTE_KEYS_DIR}"

# `devit-mq check --nodes` validates the file and prints: name, role, host, endpoint (tab-separated)
nodes="$("$devit" check --no-bundle --nodes "$topology")"
pids=()
while IFS=$'\t' read -r name role host endpoint; do
    [[ "$role" == client ]] && continue
    cmd="$remote_cmd --name $name$extra"
    if [[ "$mode" == --ssh ]]; then
        echo "[$host] $cmd"
        ssh -o BatchMode=yes "$host" "$cmd" &
        pids+=($!)
    else
        printf '# on %s (%s, listens at %s)\n%s\n' "$host" "$role" "$endpoint" "$cmd"
    fi
done <<< "$nodes"
if [[ ${#pids[@]} -gt 0 ]]; then
    trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
    wait "${pids[@]}"
fi
