#!/usr/bin/env bash
# cascade's test command (README, .ci/run): installs what the tests need, then
# format check, clippy, docs and the whole test suite. Works on a fresh Debian
# bookworm machine as root, with no stdin (CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use; add new ones here (chromium, chromium-driver,
# nftables, coturn, janus, ...).
APT_PACKAGES=(
  ffmpeg # test media: H.264 (libx264) + Opus (libopus), see loadtest/src/media.rs
  chromium chromium-driver # browser tests (tests/browser.rs, headless, fake camera)
  firefox-esr # browser test: the player page in Firefox (WebDriver BiDi, puppeteer-core)
  iproute2 # network namespaces + veth for the browser tests (Chromium skips loopback)
  nftables # browser test: UDP dropped, the viewer plays over ICE-TCP
  coturn # browser test: TURN relay with REST (use-auth-secret) credentials
  docker-compose # tests/deploy.rs: `docker-compose config` on deploy/compose.yaml
  prometheus # tests/deploy.rs: promtool check/test on deploy/prometheus/
  python3-venv # tests/deploy.rs: the venv kubernetes-validate runs in (below)
  # RTSP pull tests (tests/rtsp.rs): GStreamer's RTSP server through Python
  # stands in for an IP camera (tests/rtsp/server.py).
  python3-gi python3-gst-1.0 gir1.2-gst-rtsp-server-1.0
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
  gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-rtsp
  curl # tests/netns_cluster.rs: HTTP from inside a network namespace (api/streams)
)

log() { printf '==> %s\n' "$*" >&2; }

install_packages() {
  local missing=()
  local p
  for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$p")
    fi
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    return
  fi
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
      sudo=(sudo -n)
    else
      log "not root and no sudo: install ${missing[*]} by hand"
      return 1
    fi
  fi
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
}

install_packages

# Node packages of the browser tests (playwright-core drives Debian's chromium).
if command -v npm >/dev/null; then
  log "npm ci (tests/browser)"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

# kubernetes-validate (PyPI; it bundles the Kubernetes schemas, so it runs
# offline) for tests/deploy.rs, in a venv under the target dir: Debian's
# Python is externally managed. Not put on PATH, so the venv's python3 does
# not shadow Debian's for other tests; tests/deploy.rs looks here.
KUBERNETES_VALIDATE_VERSION=1.37.0
DEPLOY_VENV="${CARGO_TARGET_DIR:-target}/deploy-venv"
if ! "$DEPLOY_VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -qx "$KUBERNETES_VALIDATE_VERSION"; then
  log "kubernetes-validate $KUBERNETES_VALIDATE_VERSION (pip, $DEPLOY_VENV)"
  rm -rf "$DEPLOY_VENV"
  /usr/bin/python3 -m venv "$DEPLOY_VENV"
  "$DEPLOY_VENV/bin/pip" install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

# No --locked: several people add dependencies at once here, and a stale committed
# Cargo.lock should not fail the whole suite (cargo resolves it from crates.io).

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo doc"
RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps --quiet

log "tests"
if command -v cargo-nextest >/dev/null; then
  # nextest does not run doctests; run them first so nextest's summary closes the log.
  cargo test --workspace --doc
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
