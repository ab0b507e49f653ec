"""The code that runs inside the sandbox, before and around the program (see sandbox.py).

Run as ``python -I -B -c <this source> TOKEN_FD RESULT_FD [SITE_DIR ...]`` with ``program.py`` in
the working folder. The supervisor never runs the program's code: it makes itself non-dumpable
(nothing else in the sandbox may then open its descriptors or memory), forks the program's
process, and only then reads the token. The program's process closes every descriptor but one
pipe back to the supervisor, runs ``program.py`` under a name other than ``__main__`` (model
answers often end with an ``if __name__ == "__main__":`` demo), and sends one byte on that pipe
only after the program's last line has run. The supervisor writes the token to the result pipe
only if that byte came, and exits with the program's status (128 + signal if it was killed),
which the parent uses for its diagnosis only. Standard library only, nothing imported early.
"""

import os
import sys

PR_SET_DUMPABLE = 4


def supervise(token_fd: int, result_fd: int, site_dirs: list[str]) -> None:
    import ctypes

    if ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        os._exit(125)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.closerange(3, w)  # the token and result pipes among them
        os.closerange(w + 1, 1 << 20)
        run_program(w, site_dirs)
    os.close(w)
    token = os.read(token_fd, 256)
    os.close(token_fd)
    _, status = os.waitpid(pid, 0)
    os.set_blocking(r, False)
    try:
        done = os.read(r, 1)
    except BlockingIOError:
        done = b""
    if done == b"1":
        os.write(result_fd, token)
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else min(code, 127))


def run_program(w: int, site_dirs: list[str]) -> None:
    import runpy
    import site
    import traceback

    for d in site_dirs:
        site.addsitedir(d)
    try:
        runpy.run_path("program.py", run_name="__sandbox__")
    except BaseException:  # SystemExit included: leaving early is not passing
        traceback.print_exc()
        os._exit(1)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the program may have replaced or closed them
            pass
    os.write(w, b"1")
    os._exit(0)


if __name__ == "__main__":
    supervise(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
