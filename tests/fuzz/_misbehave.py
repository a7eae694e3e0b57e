"""A stand-in for ``bnkit.cli.main`` that misbehaves on request, for the harness's own tests.

``main([command, behaviour, arg])``: each behaviour is one way a command line can fail to end
clean (or, for ``ok`` and ``refuse``, ends clean); ``test_harness.py`` checks that the harness
names each.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time


def main(argv: list[str]) -> int:
    command, behaviour, *rest = argv
    arg = rest[0] if rest else ""
    error = f"bnkit {command}: error: "
    if behaviour == "ok":
        print('{"read": true}')
        return 0
    if behaviour == "refuse":
        print(error + "refused", file=sys.stderr)
        return 2
    if behaviour == "two lines":
        print(error + "refused\nand more", file=sys.stderr)
        return 2
    if behaviour == "c output":  # as a C library prints, past Python's sys.stderr
        os.write(2, b"HDF5-DIAG: Error detected\n")
        print(error + "refused", file=sys.stderr)
        return 2
    if behaviour == "stderr on success":
        print("UserWarning: something", file=sys.stderr)
        return 0
    if behaviour == "escape":
        print(error + "class \x1b]0;pwned\x07 unknown", file=sys.stderr)
        return 2
    if behaviour == "traceback":
        raise KeyError(arg)
    if behaviour == "exit 1":
        return 1
    if behaviour == "hang":
        time.sleep(float(arg))
        return 0
    if behaviour == "grow":  # touch arg MiB
        block = bytearray(int(arg) * 2**20)
        block[::4096] = b"x" * len(block[::4096])
        return 0
    if behaviour == "allocate":  # an allocation the address-space limit refuses, reported as one line
        try:
            bytearray(int(arg) * 2**20)
        except MemoryError as e:
            print(error + f"cannot be read (MemoryError: {e})", file=sys.stderr)
            return 2
        return 0
    if behaviour == "environment":
        print(dict(os.environ))
        return 0
    if behaviour == "marker":
        with open(arg, "w") as f:
            f.write("the payload ran")
        return 0
    if behaviour == "temporary":  # a file left behind, as an unpacked archive would be
        import tempfile

        tempfile.mkstemp(prefix="unpacked-")
        return 0
    if behaviour == "crash":
        ctypes.string_at(0)  # a segmentation fault
    if behaviour == "watchdog":  # what bnkit does when a reader is stuck in C code past its deadline
        print(error + "reading took longer than 1 s", file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)
    if behaviour == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    if behaviour == "stuck in the worker":  # as C code holding Python's lock: only the console script ends it
        if __name__ == "__main__":
            print(error + "reading took longer than 1 s", file=sys.stderr)
            return 2
        time.sleep(3600)
    raise ValueError(f"unknown behaviour {behaviour!r}")


def view(answer: str) -> dict:
    """A reference reader that answers, fails or hangs on request."""
    if answer == "fail":
        raise OSError("cannot read it")
    if answer == "hang":
        time.sleep(3600)
    return {"answer": answer}


if __name__ == "__main__":  # the console script of this stand-in
    sys.exit(main(sys.argv[1:]))
