"""A test plugin (``[regmw] plugins = ["tests.job_killer"]``): job ``killer`` kills the process running it.

Each run appends its attempt number to the file ``$RUNS_FILE`` names, then
SIGKILLs its own process, as an OOM kill does to a worker: no outcome is
ever recorded. Used by tests/test_jobs_embedded.py and tests/test_jobs_redis.py.
"""
import os
import signal

from regmw.jobs import Job
from regmw.plugins import hookimpl


@hookimpl
def regmw_jobs(config):
    def run(context):
        with open(os.environ["RUNS_FILE"], "a") as runs:
            runs.write(f"{context.attempt}\n")
        os.kill(os.getpid(), signal.SIGKILL)

    return [Job("killer", run, max_retries=1)]
