"""A job whose workers sleep; the test interrupts the driver and checks clean-up."""

import sys
import time

import ringtrain


def sleeper():
    print("started", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    try:
        ringtrain.run(sleeper, num_proc=2)
    except KeyboardInterrupt:
        print("driver interrupted", flush=True)
        sys.exit(130)
