#!/bin/bash
# A bash workload for ferry's end-to-end tests: appends `tick N` lines to the log ($1)
# every 20 ms, and on SIGTERM checks what bash holds — its
# counter against the log's last tick, and an array — then writes PASS or FAIL: <what>.
log=$1
stop=
trap 'stop=1' TERM

# It waits with `read -t` on a FIFO nobody writes, not with `sleep`: a shell with a
# child is refused by ferry (process trees are not carried yet), and one that forks a
# `sleep` every tick nearly always has one.
fifo=${log%/*}/tick.fifo
rm -f "$fifo"
mkfifo "$fifo"
exec 3<>"$fifo"

declare -a table
for ((i = 0; i < 1000; i++)); do table[i]=$((i * i + 7)); done
echo ready >>"$log"

n=0
while [ -z "$stop" ]; do
    n=$((n + 1))
    echo "tick $n" >>"$log"
    read -r -t 0.02 -u 3
done

failure=
last=$(grep '^tick ' "$log" | tail -n 1)
if [ "$last" != "tick $n" ]; then
    failure="counter is $n but the log's last tick is '$last'"
fi
for ((i = 0; i < 1000; i++)); do
    if [ "${table[i]}" != "$((i * i + 7))" ]; then
        failure="array element $i is '${table[i]}'"
        break
    fi
done
if [ -z "$failure" ]; then
    echo PASS >>"$log"
    exit 0
fi
echo "FAIL: $failure" >>"$log"
exit 1
