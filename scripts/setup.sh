# Sourced by scripts/test and scripts/demo: system packages and the project's virtualenv.
# Idempotent; a second run installs nothing.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$REPO/.venv"
PY="${PYTHON:-python3}"

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

ensure_system_packages() {
    local missing=()
    have mosquitto || missing+=(mosquitto)
    have mosquitto_pub || missing+=(mosquitto-clients)
    have socat || missing+=(socat)
    have mbpoll || missing+=(mbpoll)  # a non-pymodbus Modbus master for the interoperability tests
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "setup: installing ${missing[*]}" >&2
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        if sudo -n true 2>/dev/null; then sudo=(sudo -n); else
            echo "setup: cannot install ${missing[*]} (not root, no sudo): the MQTT, serial" \
                 "and mbpoll tests will be skipped" >&2
            return 0
        fi
    fi
    if ! { DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -qq >/dev/null &&
           DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
               --no-install-recommends "${missing[@]}" >/dev/null; }; then
        echo "setup: apt-get could not install ${missing[*]}; the tests that need them will" \
             "say so" >&2
    fi
}

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "setup: creating $VENV" >&2
        "$PY" -m venv "$VENV"
    fi
    local stamp
    stamp="$VENV/.installed-$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)"
    if [ ! -e "$stamp" ]; then
        echo "setup: installing the project and its dependencies" >&2
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO[dev]"
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
}
