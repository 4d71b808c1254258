# Sourced by the other scripts: makes .venv with ringtrain installed (editable, with its
# native extension built) and every extra the example, tests and benchmarks need.
# Re-installs only when the packaging files or native sources change.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}

if ! command -v java >/dev/null 2>&1; then
  echo "ringtrain: Spark needs Java 17 or newer and none is on PATH (Debian: apt-get install openjdk-17-jre-headless)" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.ringtrain-installed-$(cat "$ROOT"/setup.cfg "$ROOT"/setup.py "$ROOT"/pyproject.toml "$ROOT"/native/* | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e "$ROOT[mpi,examples,test,bench,connect]"
  rm -f "$VENV"/.ringtrain-installed-*
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYSPARK_PYTHON="$VENV/bin/python"
cd "$ROOT"
