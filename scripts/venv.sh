#!/usr/bin/env bash
# Sourced by the set-up scripts: install a virtual environment from committed locks, exactly.
#   sync_venv VENV LOCK...   create VENV if needed, install exactly the LOCKs (hashes checked),
#                            then verify it against them (scripts/check_lock.py); a no-op when the
#                            locks are unchanged since the last sync and the venv still matches.
# The installer is uv (pinned in locks/uv.txt, bootstrapped into .tools/uv with pip); set
# TOOLKIT_INSTALLER=pip to install the same locks with pip instead (slower, see the README).
# The CPU torch wheel (torch==2.13.0+cpu) is not on PyPI: it is looked up in $TOOLKIT_WHEELS
# (default /opt/wheels, where this machine keeps it).

TOOLKIT_INSTALLER=${TOOLKIT_INSTALLER:-uv}
TOOLKIT_WHEELS=${TOOLKIT_WHEELS:-/opt/wheels}
PYTHON=${PYTHON:-python3}
UV_HOME=.tools/uv

uv_bin() {
  if [ ! -x "$UV_HOME/bin/uv" ]; then
    "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --require-hashes \
      --target "$UV_HOME" -r locks/uv.txt
  fi
  echo "$UV_HOME/bin/uv"
}

sync_venv() {
  local venv=$1; shift
  local stamp="$venv/.toolkit-lock-stamp" want
  want=$(cat "$@" scripts/venv.sh | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && "$venv/bin/python" scripts/check_lock.py "$@" 2>/dev/null; then
    return 0
  fi
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  local links=()
  [ -d "$TOOLKIT_WHEELS" ] && links=(--find-links "$TOOLKIT_WHEELS")
  echo "setup: installing $venv from $* with $TOOLKIT_INSTALLER"
  if [ "$TOOLKIT_INSTALLER" = pip ]; then
    local lock
    for lock in "$@"; do
      "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --require-hashes \
        "${links[@]}" -r "$lock"
    done
  else
    "$(uv_bin)" pip sync -q --python "$venv/bin/python" --require-hashes "${links[@]}" "$@"
  fi
  "$venv/bin/python" scripts/check_lock.py "$@"
  echo "$want" > "$stamp"
}

# Install this checkout into VENV as an editable package, without touching its locked dependencies.
install_project() {
  local venv=$1
  if [ "$TOOLKIT_INSTALLER" = pip ]; then
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
  else
    "$(uv_bin)" pip install -q --python "$venv/bin/python" --no-deps -e .
  fi
}
