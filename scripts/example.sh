#!/usr/bin/env bash
# Set up (first run only) and train the Keras digits example on 2 workers of an embedded local Spark.
source "$(dirname "$0")/_venv.sh"
exec python examples/keras_digits.py "$@"
