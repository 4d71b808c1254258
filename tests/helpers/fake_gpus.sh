#!/usr/bin/env bash
# Spark GPU discovery script for tests: each executor that runs it gets the next two
# fake GPU addresses (0,1 then 2,3 ...), so every worker of a job can be told apart.
set -eu
counter="${RINGTRAIN_FAKE_GPU_COUNTER:?set RINGTRAIN_FAKE_GPU_COUNTER to a writable file}"
exec 9>>"$counter.lock"
flock 9
n=$(cat "$counter" 2>/dev/null || echo 0)
echo $((n + 1)) > "$counter"
echo "{\"name\":\"gpu\",\"addresses\":[\"$((2 * n))\",\"$((2 * n + 1))\"]}"
