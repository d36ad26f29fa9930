#!/bin/sh
# Container entry point: turn secret files into APA_* variables, then run the command.
#
# apa.settings.Settings reads the environment only. Docker Compose (and Swarm) mount secrets as
# files under /run/secrets; a file whose name is an APA_* variable name becomes that variable, its
# content (without the trailing newline) the value. A variable already set in the environment wins.
# Kubernetes passes secrets as environment variables directly, so there this does nothing.
set -eu

dir="${SECRETS_DIR:-/run/secrets}"
if [ -d "$dir" ]; then
  for file in "$dir"/APA_*; do
    [ -f "$file" ] || continue
    name="${file##*/}"
    case "$name" in
      *[!A-Z0-9_]*) echo "apa-entrypoint: ignoring secret file with an invalid name: $name" >&2; continue ;;
    esac
    if [ -z "$(printenv "$name" || true)" ]; then
      value="$(cat "$file")"
      export "$name=$value"
    fi
  done
fi

exec "$@"
