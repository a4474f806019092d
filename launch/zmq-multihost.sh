#!/usr/bin/env bash
# Multi-host ZeroMQ deployment: every node of a topology runs `devit-mq node TOPOLOGY --name NAME` on
# its own host (the one its `host:` names). This script prints those commands, or runs them over ssh.
#
#   launch/zmq-multihost.sh topologies/multihost.yaml            # print the command for each host
#   launch/zmq-multihost.sh topologies/multihost.yaml --ssh      # start them: ssh HOST 'cd REPO && ...'
#
# REMOTE_REPO sets the repository path on the hosts (default: this repository's path). Start order
# does not matter: ZeroMQ reconnects, and nodes wait for their peers' handshake.
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
remote_repo="${REMOTE_REPO:-$repo}"
# path of the topology relative to the repository, as the hosts see it
case "$topology" in
    /*) remote_topology="$topology" ;;
    *) remote_topology="$(realpath --relative-to="$repo" "$topology")" ;;
esac

# `devit-mq check --nodes` validates the file and prints: name, role, host, endpoint (tab-separated)
nodes="$("$devit" check --no-bundle --nodes "$topology")"
pids=()
while IFS=$'\t' read -r name role host endpoint; do
    [[ "$role" == client ]] && continue
    cmd="cd $remote_repo && .venv/bin/devit-mq node $remote_topology --name $name"
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
