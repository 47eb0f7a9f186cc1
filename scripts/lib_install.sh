# Sourced by the set-up scripts: `use_installer VENV`, then `install ARGS...` / `uninstall NAMES...`
# into that venv. uv (a pinned release, put into the venv by its own pip) installs the same packages
# as pip in a fraction of the time; uv does not read pip's configuration, so the local wheel
# directory pip is pointed at (PIP_FIND_LINKS or pip.conf's find-links: the CPU torch wheel) is
# passed on. Bytecode is compiled at install, as pip does: these machines set PYTHONDONTWRITEBYTECODE,
# so without it every process (each vLLM engine core, each test subprocess) compiles torch, vLLM and
# transformers from source again (about 25 s more per vLLM server start). Where uv cannot be installed,
# pip does the work. FCD_INSTALLER=pip forces pip.
UV_VERSION=0.13.9

use_installer() {
  _venv=$1
  _uv=()
  if [ "${FCD_INSTALLER:-uv}" = uv ] && "$_venv/bin/python" -m pip install -q "uv==$UV_VERSION" 2>/dev/null; then
    local links=${PIP_FIND_LINKS:-$("$_venv/bin/python" -m pip config get global.find-links 2>/dev/null || true)}
    _uv=("$_venv/bin/uv" pip)
    _uv_links=()
    for d in $links; do _uv_links+=(--find-links "$d"); done
  fi
}

install() {
  if [ ${#_uv[@]} -gt 0 ]; then
    "${_uv[@]}" install -q --compile-bytecode --python "$_venv/bin/python" "${_uv_links[@]}" "$@"
  else
    "$_venv/bin/python" -m pip install -q "$@"
  fi
}

uninstall() {
  if [ ${#_uv[@]} -gt 0 ]; then
    "${_uv[@]}" uninstall -q --python "$_venv/bin/python" "$@" 2>/dev/null || true
  else
    "$_venv/bin/python" -m pip uninstall -q -y "$@" 2>/dev/null || true
  fi
}
