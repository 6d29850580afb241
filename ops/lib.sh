# Shared by ops/test, ops/demo and ops/bench (source it): Python >= 3.11, and a virtualenv in
# .venv with goldstream and one of its extras installed, versions pinned by ops/constraints.txt.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
VENV=$REPO/.venv

need_python() {
  "$PYTHON" - <<'PY' || { echo "goldstream needs Python >= 3.11 (found $("$PYTHON" --version 2>&1))" >&2; exit 1; }
import sys; sys.exit(sys.version_info < (3, 11))
PY
}

# ensure_venv EXTRA: (re)install goldstream[EXTRA] when pyproject.toml or the constraints changed
ensure_venv() {
  local extra=$1
  need_python
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[ops] creating $VENV" >&2
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
      # Debian's python3 ships venv separately
      command -v apt-get >/dev/null && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
      rm -rf "$VENV"; "$PYTHON" -m venv "$VENV"
    fi
  fi
  local stamp=$VENV/.goldstream-$extra-installed
  local want
  want=$(cat "$REPO/pyproject.toml" "$REPO/ops/constraints.txt" | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[ops] installing goldstream[$extra] into $VENV" >&2
    (cd "$REPO" && "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c ops/constraints.txt -e ".[$extra]")
    echo "$want" >"$stamp"
  fi
}

# ensure_test_tools: Debian packages the tests drive for real: chromium (the dashboard's browser
# test), prometheus and prometheus-alertmanager (scraping a worker, receiving goldstream's alerts),
# openssl (the secured profile's certificates, ops/secure)
ensure_test_tools() {
  local missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v prometheus >/dev/null || missing+=(prometheus)
  command -v prometheus-alertmanager >/dev/null || missing+=(prometheus-alertmanager)
  command -v openssl >/dev/null || missing+=(openssl)  # ops/secure's certificates
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || { echo "[ops] missing ${missing[*]} and apt-get is not here: install them" >&2; exit 1; }
  local root=()
  [ "$(id -u)" = 0 ] || root=(sudo)
  echo "[ops] installing ${missing[*]} from Debian packages (tests drive them)" >&2
  "${root[@]}" apt-get update -qq
  "${root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
