#!/usr/bin/env bash
# Installs the real Claude Code CLI that tests/test_engine_claude_code_real.py drives:
# `@anthropic-ai/claude-code`, pinned, with npm, outside the repo (its native binary comes
# in a platform package; about 400 MB). Prints the line that points the test at it.
#
#   bash tests/real_claude/install.sh         # into ~/.cache/capd/claude-code-<version>
#   CAPD_REAL_CLAUDE_HOME=/some/dir bash tests/real_claude/install.sh
set -euo pipefail

VERSION=2.1.332
DEST=${CAPD_REAL_CLAUDE_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/capd/claude-code-$VERSION}
CLAUDE=$DEST/node_modules/.bin/claude

if ! command -v npm >/dev/null; then
    echo "install.sh: npm is needed (e.g. apt-get install npm)" >&2
    exit 1
fi

# --version in a throwaway config dir: the CLI writes to its config dir when it starts.
version() {
    local config
    config=$(mktemp -d)
    CLAUDE_CONFIG_DIR=$config CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 "$CLAUDE" --version \
        2>/dev/null | cut -d' ' -f1 || true
    rm -rf "$config"
}

if [[ ! -x $CLAUDE ]] || [[ $(version) != "$VERSION" ]]; then
    mkdir -p "$DEST"
    npm install --prefix "$DEST" --no-save --no-fund --no-audit \
        "@anthropic-ai/claude-code@$VERSION" >&2
fi
if [[ $(version) != "$VERSION" ]]; then
    echo "install.sh: $CLAUDE does not run as Claude Code $VERSION" \
        "(did npm skip its postinstall script, which puts the native binary in place?)" >&2
    exit 1
fi
echo "Claude Code $VERSION in $DEST" >&2
echo "export CAPD_REAL_CLAUDE=$CLAUDE"
