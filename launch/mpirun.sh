#!/usr/bin/env bash
# mpirun wrapper: finds the virtual environment's mpirun (the `mpich` wheel installs one into
# .venv/bin) and, when it is Open MPI, adds --oversubscribe and the run-as-root variables (MPICH
# needs neither); for a topology under MPICH it adds -disable-auto-cleanup, so a dead rank is named.
#
#   launch/mpirun.sh TOPOLOGY.yaml [MPIRUN ARGS...] [-- DEVIT-MQ MPI ARGS...]
#       = mpirun -n <number of nodes> [MPIRUN ARGS] devit-mq mpi TOPOLOGY.yaml [DEVIT-MQ MPI ARGS]
#   launch/mpirun.sh -n 3 python script.py            # anything else is passed to mpirun as is
#
# MPIRUN=/path/to/mpirun overrides the search; so does an activated virtual environment.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

find_mpirun() {
    local candidate
    for candidate in "${MPIRUN:-}" "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/mpirun}" "$repo/.venv/bin/mpirun" \
                     "$(command -v mpirun || true)"; do
        if [[ -n "$candidate" && -x "$candidate" ]]; then
            echo "$candidate"
            return 0
        fi
    done
    echo "launch/mpirun.sh: no mpirun found (run 'make install', or set MPIRUN)" >&2
    return 1
}

mpirun="$(find_mpirun)"
bindir="$(dirname "$mpirun")"
extra=()
version="$("$mpirun" --version 2>&1 || true)"
if grep -qi "open mpi" <<<"$version"; then
    extra+=(--oversubscribe)
    if [[ "$(id -u)" == 0 ]]; then
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
fi

if [[ $# -ge 1 && "$1" == *.yaml || $# -ge 1 && "$1" == *.yml ]]; then
    topology="$1"
    shift
    devit="$bindir/devit-mq"
    [[ -x "$devit" ]] || devit="$(command -v devit-mq)"
    # `devit-mq check --ranks` validates the topology and prints how many ranks it needs
    ranks="$("$devit" check --ranks "$topology")"
    mpi_args=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do
        mpi_args+=("$1")
        shift
    done
    [[ $# -gt 0 ]] && shift  # the "--"
    # MPICH (hydra) kills every rank when one dies; with -disable-auto-cleanup the survivors name
    # the dead node and the client reports the answers it has (see devit_mq/nodes/mpi_launch.py)
    grep -qi "hydra" <<<"$version" && extra+=(-disable-auto-cleanup)
    exec "$mpirun" "${extra[@]}" -n "$ranks" "${mpi_args[@]}" "$devit" mpi "$topology" "$@"
fi
exec "$mpirun" "${extra[@]}" "$@"
