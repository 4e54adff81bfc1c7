#!/usr/bin/env bash
# Install a local SLURM (slurmctld + slurmd + munge) for tests/test_slurm_real.py.
#
# Only installs packages: the test itself generates slurm.conf and a munge key in a temporary
# directory and starts/stops its own daemons, so nothing here configures or starts a service.
# Debian/Ubuntu with apt, run as root. Safe to run twice.
set -euo pipefail

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null; then
    echo "slurm already installed: $(slurmctld -V)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ci_setup_slurm.sh: needs root (apt-get install)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends: no mail server, no docs; policy-rc.d stops the packages' postinst from
# starting system services we do not use (the test runs its own daemons).
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
slurmctld -V
