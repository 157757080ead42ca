#!/bin/sh
# Entry point of the Tollgate image: empty the prometheus multiprocess directory, then run
# the command (`tollgate serve …`, `tollgate-worker`, `tollgate migrate`, …) in its place.
#
# prometheus-client adds up every metric file it finds in PROMETHEUS_MULTIPROC_DIR. Files
# left by an earlier run of this container (a Kubernetes emptyDir outlives a container
# restart) would be counted again, so the directory starts empty.
set -eu

if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -delete
fi

exec "$@"
