#!/usr/bin/env bash
# Runs every Drizzle test. Installs what the tests need on a fresh Debian
# machine first (psql for the integration tests), then builds and tests the
# whole workspace in debug mode.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
# openssl makes the CA and certificates of the TLS tests.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# JDBC: a JDK (javac) and Debian's PostgreSQL JDBC driver.
command -v javac >/dev/null 2>&1 || need_apt+=(default-jdk-headless)
[ -f /usr/share/java/postgresql.jar ] || need_apt+=(libpostgresql-jdbc-java)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Python drivers for the driver tests (wheels from PyPI).
if ! python3 -c "import psycopg" >/dev/null 2>&1; then
  echo "installing: psycopg[binary]"
  python3 -m pip install -q "psycopg[binary]" || python3 -m pip install -q --break-system-packages "psycopg[binary]"
fi
if ! python3 -c "import sqlalchemy, psycopg2, pandas" >/dev/null 2>&1; then
  echo "installing: sqlalchemy psycopg2-binary pandas"
  python3 -m pip install -q sqlalchemy psycopg2-binary pandas || python3 -m pip install -q --break-system-packages sqlalchemy psycopg2-binary pandas
fi
if ! python3 -c "import asyncpg" >/dev/null 2>&1; then
  echo "installing: asyncpg"
  python3 -m pip install -q asyncpg || python3 -m pip install -q --break-system-packages asyncpg
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (install Rust with rustup)" >&2
  exit 1
fi

# The compose cluster test (server/tests/compose.rs) needs a Docker engine
# and a Compose tool; without them it passes as skipped.
if timeout 30 docker info >/dev/null 2>&1; then
  echo "docker: available, the compose cluster test runs"
else
  echo "NOTE: docker info failed: the compose cluster test will be SKIPPED"
fi

# Build everything first (the drizzle binary is used by the integration tests),
# then run unit, integration and sqllogictest suites.
cargo build --workspace --all-targets
# --all-targets: unit, integration and sqllogictest targets (there are no doctests).
cargo test --workspace --all-targets --no-fail-fast -- --test-threads=2
