#!/bin/bash
# Runs inside the test VM as PID 1, on the host's root filesystem (read-only over 9p), with a
# pure cgroup v2 hierarchy at /sys/fs/cgroup. Runs every test listed in $OUT/plan, one line per
# test binary ("LABEL<TAB>EXECUTABLE<TAB>ARGS..."), writes LABEL.log and LABEL.rc into $OUT,
# then powers the VM off. See tests/vm/run.
out=$1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1 TERM=dumb

say() { echo "vm: $*" >/dev/console; }
finish() {
  sync
  busybox poweroff -f
  exit 1
}

mount -t tmpfs -o mode=1777 tmp /tmp
mount -t tmpfs -o mode=755 run /run
mount -t tmpfs -o mode=1777 vartmp /var/tmp
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t mqueue mqueue /dev/mqueue
# Pure cgroup v2, every controller enabled for children (what systemd does on a v2 host).
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || { say "cannot mount cgroup2"; finish; }
for c in $(cat /sys/fs/cgroup/cgroup.controllers); do
  echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || say "cannot enable controller $c"
done
ln -sf /proc/self/fd /dev/fd 2>/dev/null

# Modules of the guest kernel live in the kernel cache dir (visible through 9p); the kernel asks
# this wrapper for the ones it loads on demand (nft expressions, conntrack, ...).
kroot=$(cat "$out/kernel-root")
printf '#!/bin/sh\nexec /usr/sbin/modprobe -d %s "$@"\n' "$kroot" >/run/modprobe
chmod 755 /run/modprobe
echo /run/modprobe >/proc/sys/kernel/modprobe
for m in overlay veth bridge nf_tables nft_chain_nat nft_masq nft_nat nft_ct; do
  /usr/sbin/modprobe -d "$kroot" "$m" || say "modprobe $m failed"
done

ip link set lo up
hostname dlv-test-vm

say "cgroup: $(stat -fc %T /sys/fs/cgroup) controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
cd "$(cat "$out/workdir")" || { say "no workdir"; finish; }
# Extra environment for the tests (e.g. the prebuilt test app), one VAR=value per line.
if [ -f "$out/env" ]; then
  while IFS= read -r line; do [ -n "$line" ] && export "$line"; done <"$out/env"
fi

while IFS=$'\t' read -r label exe args; do
  [ -n "$label" ] || continue
  say "running $label"
  start=$(date +%s)
  # shellcheck disable=SC2086 # ARGS are split on purpose
  timeout --kill-after=10 "$(cat "$out/test-timeout")" "$exe" $args >"$out/$label.log" 2>&1 </dev/null
  rc=$?
  echo "$rc" >"$out/$label.rc"
  say "$label exited $rc after $(( $(date +%s) - start ))s"
done <"$out/plan"

echo done >"$out/done"
finish
