import sys

from . import main

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m ringtrain.worker WORKDIR (started by a ringtrain task agent)")
    main(sys.argv[1])
