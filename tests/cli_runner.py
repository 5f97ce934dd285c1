"""Run a command-line entry point in a fresh child process, cheaply.

Starting Python and importing torch, timm and accelerate costs seconds, so a catalogue of bad inputs run with
``subprocess`` would take minutes. A multiprocessing *forkserver* imports them once (it never computes, so forking
it is safe) and forks one child per command. The child runs the entry point exactly as ``python script.py`` or
``python -m module`` would (``runpy`` with ``__name__ == "__main__"``), with its own cwd, environment, stdout and
stderr; an uncaught exception prints its traceback and exits 1, as the interpreter does.
"""
from __future__ import annotations

import multiprocessing
import os
import runpy
import sys
import tempfile
import traceback
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

PRELOAD = ["torch", "timm", "accelerate", "safetensors.torch", "PIL.Image", "hcvision", "hcvision.engine",
           "hcvision.sample", "hcvision.eval", "hcvision.analysis", "hcvision.data.latents", "cli_runner"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _child(target: str, argv: Sequence[str], cwd: str, env: Dict[str, str], out: str, err: str) -> None:
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    # A fresh interpreter sizes torch's intra-op pool from OMP_NUM_THREADS when torch is imported; here torch was
    # imported by the server, so apply the child's value (a 2-thread pool on a busy 2-core box costs ~4x).
    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))
    code = 0
    try:
        if target.endswith(".py"):
            sys.argv = [target, *argv]
            runpy.run_path(target, run_name="__main__")
        else:
            sys.argv = [target, *argv]
            sys.modules.pop(target, None)  # run it afresh as __main__, as `python -m` does
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: B902  (what the interpreter does with an uncaught exception)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Child:
    """One running entry point: :meth:`wait` for its :class:`Result`, or :meth:`kill` it (SIGKILL) first."""

    def __init__(self, proc, target: str, argv: Sequence[str], out: str, err: str) -> None:
        self.proc, self.target, self.argv, self.out, self.err = proc, target, list(argv), out, err

    def poll(self) -> Optional[int]:
        """The exit code (negative: killed by that signal), or ``None`` while it runs."""
        return self.proc.exitcode

    def kill(self) -> None:
        self.proc.kill()

    def send_signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 300) -> Result:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()
            raise TimeoutError(f"{self.target} {self.argv} did not finish within {timeout} s")
        with open(self.out) as f_out, open(self.err) as f_err:
            result = Result(self.proc.exitcode, f_out.read(), f_err.read())
        os.unlink(self.out)
        os.unlink(self.err)
        return result


class Runner:
    def __init__(self, sys_path: Sequence[str], log_dir: str) -> None:
        self.log_dir = log_dir
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        sys.path[:0] = [p for p in sys_path if p not in sys.path]

    def start(self, target: str, argv: Sequence[str], cwd: str, env: Optional[Dict[str, str]] = None) -> Child:
        """Fork a child running ``target`` and return at once (its stdout/stderr go to files of its own)."""
        paths = []
        for suffix in (".stdout", ".stderr"):  # files of its own: several children may run at once
            fd, path = tempfile.mkstemp(dir=self.log_dir, suffix=suffix)
            os.close(fd)
            paths.append(path)
        out, err = paths
        proc = self.ctx.Process(target=_child, args=(target, list(argv), cwd, dict(env or os.environ), out, err))
        proc.start()
        return Child(proc, target, argv, out, err)

    def run(self, target: str, argv: Sequence[str], cwd: str, env: Optional[Dict[str, str]] = None,
            timeout: float = 300) -> Result:
        return self.start(target, argv, cwd, env).wait(timeout)
