#!/usr/bin/env bash
# Unpack what one gpu_run.sh call returned, here, before the next call (a warm machine is not promised between calls):
#
#   bash docs/results/allocation-v2/unpack.sh FROM DEST NAME
#
# FROM  the folder holding the call's $OUT files (results.tgz, and the compile cache's inductor-cache.tar.xz.<n>)
# DEST  the results folder of that corpus, mode and length, e.g. docs/results/allocation-v2/python-code-1400steps
# NAME  a new subfolder of DEST for this call's report/ and logs/, e.g. call8-rho-grid-seed1
# CACHE where the compile cache's parts go, replacing earlier ones (carry it with COMPILE_CACHE) [runs/compile-cache]
#
# The finished runs of results.tgz (final/config.json) go to DEST/runs/ (what the next call restores); a run already
# there is never overwritten. A run the deadline cut is left out: its checkpoint stayed on the device machine, and a
# copy of its first steps' files here would block its finished files of a later call.
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: unpack.sh FROM DEST NAME" >&2; exit 2; }
from=$1 dest=$2 name=$3 cache=${CACHE:-runs/compile-cache}
[ -f "$from/results.tgz" ] || { echo "no results.tgz in '$from'" >&2; exit 1; }
[ ! -e "$dest/$name" ] || { echo "'$dest/$name' exists: name this call's folder otherwise" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar xzf "$from/results.tgz" -C "$tmp"
mkdir -p "$dest/runs" "$dest/$name"
before=$(find "$dest/runs" -mindepth 1 -maxdepth 1 -type d | wc -l)
if [ -d "$tmp/runs" ]; then
  for run in "$tmp"/runs/*/; do
    run=$(basename "$run")
    if [ ! -f "$tmp/runs/$run/final/config.json" ]; then
      echo "left out $run: not finished in this call"
    elif [ ! -e "$dest/runs/$run" ]; then
      cp -r "$tmp/runs/$run" "$dest/runs/"
    fi
  done
fi
for part in report logs; do
  if [ -d "$tmp/$part" ]; then cp -r "$tmp/$part" "$dest/$name/"; fi
done
echo "runs in $dest/runs: $before -> $(find "$dest/runs" -mindepth 1 -maxdepth 1 -type d | wc -l)"
echo "report and logs in $dest/$name"
if compgen -G "$from/inductor-cache.tar.xz.*" >/dev/null; then
  mkdir -p "$cache"
  rm -f "$cache"/inductor-cache.tar.xz.*
  cp "$from"/inductor-cache.tar.xz.* "$cache/"
  echo "compile cache in $cache: $(ls "$cache" | tr '\n' ' ')"
fi
