#!/usr/bin/env bash
# Set up (first run only), lint, and run the whole test suite. Extra arguments go to pytest.
source "$(dirname "$0")/_venv.sh"
# A machine with a compiler must have built the native fused buffers; fail rather than
# quietly test only the numpy twin.
export RINGTRAIN_REQUIRE_NATIVE=${RINGTRAIN_REQUIRE_NATIVE:-1}
ruff check ringtrain tests benchmarks examples scripts
ruff format --check ringtrain tests benchmarks examples scripts
exec python -m pytest -p no:cacheprovider "$@"
