#!/usr/bin/env bash
# Installs the real ACP agent that tests/test_engine_acp_real.py drives: Mistral Vibe's
# `vibe-acp`, pinned, in its own virtualenv outside the repo (it needs Python >= 3.12 and
# takes about 400 MB). Prints the line that points the test at it.
#
#   bash tests/real_acp/install.sh            # into ~/.cache/capd/mistral-vibe-<version>
#   CAPD_REAL_ACP_HOME=/some/dir bash tests/real_acp/install.sh
set -euo pipefail

VERSION=2.26.1
DEST=${CAPD_REAL_ACP_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/capd/mistral-vibe-$VERSION}

new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }

python=${PYTHON:-}
if [[ -z $python ]]; then
    candidates=(python3.14 python3.13 python3.12 python3)
    if command -v pyenv >/dev/null; then
        candidates+=("$(pyenv root)"/versions/3.1[2-9]*/bin/python3)
    fi
    for candidate in "${candidates[@]}"; do
        if new_enough "$candidate"; then
            python=$candidate
            break
        fi
    done
fi
if [[ -z $python ]] || ! new_enough "$python"; then
    echo "install.sh: mistral-vibe needs Python >= 3.12; none found (set PYTHON=...)" >&2
    exit 1
fi

installed() { "$DEST/bin/pip" show mistral-vibe 2>/dev/null | sed -n 's/^Version: //p'; }
if [[ ! -x $DEST/bin/vibe-acp ]] || [[ $(installed) != "$VERSION" ]]; then
    "$python" -m venv "$DEST"
    "$DEST/bin/pip" install --quiet "mistral-vibe==$VERSION"
fi
# (Not `vibe-acp --version`: any run of it creates ~/.vibe unless VIBE_HOME says otherwise.)
echo "mistral-vibe $(installed) in $DEST" >&2
echo "export CAPD_REAL_ACP_AGENT=$DEST/bin/vibe-acp"
