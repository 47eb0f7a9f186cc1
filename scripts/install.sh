# Sourced by setup.sh and setup_vllm.sh: `install VENV PIP_ARGS...` installs into VENV with uv when it
# can (seconds instead of minutes), from the places pip is configured to use (its find-links, extra
# indexes and constraints, from pip.conf or PIP_* variables), and with pip itself otherwise.
# Requirements are passed as pip takes them; torch is always pinned to its +cpu build by the callers.

_pip_config() {  # the values of one pip option across pip.conf and the environment, space-separated
  "$1/bin/pip" config list 2>/dev/null | sed -n "s/^[^.]*\.$2='\(.*\)'$/\1/p" | tr '\n' ' '
}

install() {
  local venv=$1; shift
  if "$venv/bin/pip" install -q uv >/dev/null 2>&1; then
    local uv_args=(--python "$venv/bin/python" --index-strategy unsafe-best-match)
    local value
    for value in $(_pip_config "$venv" find-links); do uv_args+=(--find-links "$value"); done
    for value in $(_pip_config "$venv" extra-index-url); do uv_args+=(--extra-index-url "$value"); done
    for value in $(_pip_config "$venv" index-url); do uv_args+=(--index-url "$value"); done
    for value in $(_pip_config "$venv" constraint); do uv_args+=(-c "$value"); done
    if "$venv/bin/uv" pip install -q "${uv_args[@]}" "$@"; then
      return 0
    fi
    echo "uv could not install into $venv; falling back to pip" >&2
  fi
  "$venv/bin/pip" install -q "$@"
}
