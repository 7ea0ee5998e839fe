#!/usr/bin/env bash
# Installs the real ACP agents from npm that tests/test_engine_acp_npm.py drives, pinned,
# each in its own directory outside the repo: claude-agent-acp (Claude Code as an ACP
# agent, formerly @zed-industries/claude-code-acp; it brings the Claude Code it runs) and
# opencode (`opencode acp`). Needs node >= 18 and npm. Prints the lines that point the
# tests at them.
#
#   bash tests/real_acp/install-npm.sh         # into ~/.cache/capd/<package>-<version>
#   CAPD_REAL_ACP_HOME=/some/dir bash tests/real_acp/install-npm.sh
set -euo pipefail

CLAUDE_ACP_VERSION=0.101.0
OPENCODE_VERSION=1.18.33
ROOT=${CAPD_REAL_ACP_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/capd}

command -v npm >/dev/null || { echo "install-npm.sh: npm not found; install node >= 18" >&2; exit 1; }

install() { # install DIR PACKAGE@VERSION
    local dest=$1 spec=$2 name=${2%@*}
    if [[ $(cd "$dest" 2>/dev/null && npm ls --depth=0 --parseable=false "$name" 2>/dev/null) != *"$spec"* ]]; then
        mkdir -p "$dest"
        npm install --prefix "$dest" --no-fund --no-audit --loglevel=error "$spec" >&2
    fi
    echo "$spec in $dest" >&2
}

claude=$ROOT/claude-agent-acp-$CLAUDE_ACP_VERSION
opencode=$ROOT/opencode-$OPENCODE_VERSION
install "$claude" "@agentclientprotocol/claude-agent-acp@$CLAUDE_ACP_VERSION"
install "$opencode" "opencode-ai@$OPENCODE_VERSION"
# opencode-ai's postinstall only links the platform binary; its bin wrapper finds it anyway.
echo "export CAPD_REAL_CLAUDE_ACP=$claude/node_modules/.bin/claude-agent-acp"
echo "export CAPD_REAL_OPENCODE=$opencode/node_modules/.bin/opencode"
