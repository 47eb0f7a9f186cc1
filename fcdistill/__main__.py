"""`python -m fcdistill ...` runs the `fcd` command line.

It runs `fcdistill.cli` as the main module rather than importing it: multiprocessing's spawn start
method re-imports a parent's main module in each child, except a package's `__main__`, and the vllm
engine's children need that re-import of `fcdistill.cli` to die with the server and start quietly
(serve/engines/vllm_env.py).
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("fcdistill.cli", run_name="__main__", alter_sys=True)
