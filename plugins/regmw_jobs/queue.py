"""The dramatiq job queue: one actor per declared job, status records and fenced job state in Redis.

Key layout (``<ns>`` = ``[jobs] namespace``, by default ``<[redis] namespace>-jobs``; on a Redis Cluster ``{<ns>}``:
see :func:`broker_namespace`; dramatiq's own keys share it)::

    <ns>:regmw:records          hash job id -> JSON record (state, attempts, error, ...)
    <ns>:regmw:state:<key>      hash {token, value}: a job's resumable state, written only by
                                the highest fencing token (a Lua compare-and-set)
    <ns>:regmw:starts           hash job id -> times a worker started it (until its outcome)
    <ns>:regmw:finished         sorted set job id -> when it finished (done or failed): its record
                                is deleted ``[jobs] keep_finished`` seconds later

Records follow dramatiq's life cycle through :class:`StatusMiddleware`:
``queued`` when enqueued (and again when a failed attempt is scheduled for
retry), ``running`` when a worker starts it, ``done``, or ``failed`` once
dramatiq's Retries middleware gives up (the message then sits in dramatiq's
dead-letter queue). A worker killed mid-job leaves its record ``running``
until dramatiq requeues the message (heartbeat timeout) and another worker
starts it again; a job started ``max_retries + 1`` times without an outcome
(it kills its worker each time) is ``failed`` and dead-lettered instead.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import dramatiq
from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker
from dramatiq.middleware import CurrentMessage, Middleware, SkipMessage

from regmw.backends import JobRecord
from regmw.errors import ConfigError
from regmw.jobs import FinishedRecords, Job, JobContext, PeriodicRunner

log = logging.getLogger("regmw.jobs")

QUEUE = "regmw"
_GAVE_UP = "regmw_gave_up"  # message option: why StatusMiddleware refused to start it again
_STARTS = "regmw_starts"  # message option: how many times it had been started then
TIME_LIMIT_MS = 24 * 3600 * 1000  # a migration of a big repository may take long; the lock bounds it, not dramatiq

#: KEYS: state hash. ARGV: token, value. Writes only if token >= the stored one.
SET_STATE = """
local stored = redis.call('HGET', KEYS[1], 'token')
if stored and tonumber(stored) > tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'value', ARGV[2])
return 1
"""


def broker_namespace(namespace: str, cluster: bool) -> str:
    """The key prefix of the queue: ``namespace``, or on a Redis Cluster ``{namespace}`` (one hash tag).

    dramatiq's dispatch script is called with the namespace as its only key
    and builds every other key name (queues, delay queues, acks, heartbeats)
    inside Lua from it; on a Cluster those keys must be on the node the
    script runs on, i.e. in the namespace's slot ("Script attempted to access
    a non local key" otherwise). A namespace that already carries a hash tag
    is kept as it is. The price: all job traffic goes to one master, which
    a job queue's rate (a few commands per job) does not notice.
    """
    start = namespace.find("{")
    tagged = start >= 0 and namespace.find("}", start + 1) > start + 1  # Redis's rule: a non-empty {...}, first one
    return namespace if not cluster or tagged else "{" + namespace + "}"


class StatusMiddleware(Middleware):
    """Keeps ``<ns>:regmw:records`` in step with what dramatiq does to each message."""

    def __init__(self, queue: DramatiqJobQueue) -> None:
        self.queue = queue

    def before_process_message(self, broker, message) -> None:
        starts = self.queue._count_start(message.message_id)
        job = self.queue.jobs.get(message.actor_name)
        if starts is not None and job is not None and starts > job.max_retries + 1:
            # dramatiq requeues a dead worker's message without counting a retry, so a job that kills
            # its worker (OOM) would run forever: after max_retries + 1 starts it goes to dead letters.
            message.options[_STARTS] = starts
            message.options[_GAVE_UP] = (f"gave up after {starts - 1} starts: a worker stopped mid-job "
                                         "without an outcome (killed?)")
            log.error("job %s %s %s", message.actor_name, message.message_id, message.options[_GAVE_UP])
            message.fail()
            raise SkipMessage(message.options[_GAVE_UP])
        self.queue._record(message.message_id, message.actor_name, message.kwargs, "running",
                           message.options.get("retries", 0) + 1)

    def after_process_message(self, broker, message, *, result=None, exception=None) -> None:
        retries = message.options.get("retries", 0)  # Retries (before us) counted this failure already
        attempts = retries + 1 if exception is None else max(1, retries)
        if exception is None:
            state, error = "done", ""
        else:
            state = "failed" if message.failed else "queued"
            error = f"{type(exception).__name__}: {exception}"
        self.queue._record(message.message_id, message.actor_name, message.kwargs, state, attempts, error)
        if state != "queued":
            self.queue._forget_starts(message.message_id)

    def after_skip_message(self, broker, message) -> None:
        gave_up = message.options.get(_GAVE_UP)
        if gave_up:
            self.queue._forget_starts(message.message_id)
        self.queue._record(message.message_id, message.actor_name, message.kwargs, "failed",
                           message.options.get(_STARTS, 0), gave_up or "skipped")


class DramatiqJobQueue:
    """A :class:`~regmw.backends.JobQueue` on dramatiq's Redis broker (``shared``: every process sees it)."""

    shared = True

    def __init__(self, services: Any, section: Any, jobs: dict[str, Job]) -> None:
        self.services = services
        self.section = section
        self.jobs = jobs
        connection = services.redis
        self.client = connection.client
        namespace = section["namespace"] or f"{connection.namespace}-jobs"  # [redis] namespace's: its own queue
        self.namespace = broker_namespace(namespace, bool(getattr(connection, "cluster", False)))
        self.broker = RedisBroker(
            client=self.client, namespace=self.namespace,
            heartbeat_timeout=int(section["heartbeat_timeout"] * 1000),
            maintenance_chance=int(section["maintenance_chance"] * MAINTENANCE_SCALE),
        )
        self.broker.add_middleware(CurrentMessage())
        self.broker.add_middleware(StatusMiddleware(self))
        self._set_state = self.client.register_script(SET_STATE)
        self.stop = threading.Event()  # what a running job sees as ``context.stop``: :meth:`work`'s, once it runs
        self._finished = FinishedRecords(section["keep_finished"])
        self.actors = {name: self._actor(job) for name, job in jobs.items() if not job.periodic}

    def _actor(self, job: Job) -> dramatiq.Actor:
        services = self.services

        def run(**kwargs: Any) -> None:
            message = CurrentMessage.get_current_message()
            attempt = message.options.get("retries", 0) + 1 if message is not None else 1
            job_id = message.message_id if message is not None else ""
            job.run(JobContext(services, job_id, job.name, attempt, stop=self.stop), **kwargs)

        run.__name__ = job.name
        return dramatiq.Actor(
            run, broker=self.broker, actor_name=job.name, queue_name=QUEUE, priority=0,
            options={"max_retries": job.max_retries, "min_backoff": int(self.section["min_backoff"] * 1000),
                     "max_backoff": int(self.section["max_backoff"] * 1000), "time_limit": TIME_LIMIT_MS},
        )

    # --- keys ---------------------------------------------------------------

    def _records_key(self) -> str:
        return f"{self.namespace}:regmw:records"

    def _state_key(self, key: str) -> str:
        return f"{self.namespace}:regmw:state:{key}"

    def _starts_key(self) -> str:
        return f"{self.namespace}:regmw:starts"

    def _count_start(self, job_id: str) -> int | None:
        """Count one more start of ``job_id``; None if Redis failed.

        Starts, not retries: a message requeued from a dead worker starts again with
        dramatiq's retry count unchanged.
        """
        try:
            return int(self.client.hincrby(self._starts_key(), job_id, 1))
        except Exception as exc:  # counting is protection, not the job: never fail the job for it
            log.warning("job %s: start not counted: %s", job_id, exc)
            return None

    def _forget_starts(self, job_id: str) -> None:
        """Drop ``job_id``'s start count once it has an outcome."""
        try:
            self.client.hdel(self._starts_key(), job_id)
        except Exception as exc:
            log.warning("job %s: start count not removed: %s", job_id, exc)

    def _finished_key(self) -> str:
        return f"{self.namespace}:regmw:finished"

    def _record(self, job_id: str, name: str, kwargs: dict, state: str, attempts: int, error: str = "") -> None:
        now = time.time()
        value = {"name": name, "kwargs": kwargs, "state": state, "attempts": attempts, "error": error[:2000],
                 "updated": now}
        try:
            pipe = self.client.pipeline()
            pipe.hset(self._records_key(), job_id, json.dumps(value))
            if state in ("done", "failed"):
                pipe.zadd(self._finished_key(), {job_id: now})
            pipe.execute()
            cutoff = self._finished.cutoff(now) if state in ("done", "failed") else None
            if cutoff is not None:
                self._forget_finished(cutoff)
        except Exception as exc:  # a status record is information, not the job: never fail the job for it
            log.warning("job %s: status record not written: %s", job_id, exc)

    def _forget_finished(self, cutoff: float) -> None:
        """Delete the records of jobs finished before ``cutoff`` (``[jobs] keep_finished``), oldest first."""
        old = self.client.zrangebyscore(self._finished_key(), "-inf", cutoff, start=0, num=10_000)
        if old:
            pipe = self.client.pipeline()
            pipe.hdel(self._records_key(), *old)
            pipe.zrem(self._finished_key(), *old)
            pipe.execute()

    # --- the contract -------------------------------------------------------------

    def enqueue(self, name: str, *, delay: float = 0.0, **kwargs: Any) -> str:
        actor = self.actors.get(name)
        if actor is None:
            raise ConfigError(f"no job named {name!r} is declared (known: {', '.join(sorted(self.actors)) or 'none'})")
        message = actor.message_with_options(kwargs=kwargs)
        # The record first: written after, it could overwrite a worker's "running" or "done".
        self._record(message.message_id, name, kwargs, "queued", 0)
        try:
            self.broker.enqueue(message, delay=int(delay * 1000) or None)
        except Exception:
            try:  # not queued: a record saying "queued" would stay forever (the caller gets the error)
                self.client.hdel(self._records_key(), message.message_id)
            except Exception as exc:
                log.warning("job %s: not queued, and its record not removed: %s", message.message_id, exc)
            raise
        return message.message_id

    def status(self, name: str | None = None) -> list[JobRecord]:
        records = []
        for job_id, raw in self.client.hgetall(self._records_key()).items():
            value = json.loads(raw)
            if name and value["name"] != name:
                continue
            records.append(JobRecord(job_id.decode() if isinstance(job_id, bytes) else job_id, value["name"],
                                     value["kwargs"], value["state"], value["attempts"], value["error"],
                                     value["updated"]))
        return sorted(records, key=lambda record: record.updated)

    def get_state(self, key: str) -> dict[str, Any] | None:
        raw = self.client.hget(self._state_key(key), "value")
        return json.loads(raw) if raw else None

    def set_state(self, key: str, value: dict[str, Any], token: int) -> bool:
        return bool(self._set_state(keys=[self._state_key(key)], args=[token, json.dumps(value)]))

    def _heartbeat(self, stop: threading.Event) -> None:
        """Keep this worker's dramatiq heartbeat fresh while its jobs run.

        dramatiq's Redis broker records a heartbeat with every broker command,
        but a consumer whose prefetch is full sends none until a job ends: a
        job longer than ``heartbeat_timeout`` would be requeued to another
        worker while it still runs. We refresh the broker's entry in dramatiq's
        ``<ns>:__heartbeats__`` sorted set (its dispatch script's key) every
        quarter of the timeout, so only a dead process stops heartbeating.
        That key and ``broker_id`` are dramatiq's internals, not its API: the
        version is pinned in setup.cfg (2.2.x) to the one this was written
        and tested against.
        """
        key = f"{self.namespace}:__heartbeats__"
        interval = self.section["heartbeat_timeout"] / 4
        while not stop.wait(interval):
            try:
                self.client.zadd(key, {self.broker.broker_id: int(time.time() * 1000)})
            except Exception as exc:  # Redis down: dramatiq's own commands fail too; keep trying
                log.warning("dramatiq heartbeat not written: %s", exc)

    def work(self, stop: threading.Event, threads: int = 1) -> None:
        """Run a dramatiq worker (every actor's queue) and the periodic jobs until ``stop`` is set.

        ``stop`` is also every running job's ``context.stop`` (docs/jobs.md): a job that checks it ends
        (and is retried) when the worker shuts down, instead of being cut off when dramatiq's stop times out.
        """
        self.stop = stop
        periodic = PeriodicRunner(self.services, self.jobs.values(), stop)
        periodic.start()
        worker = dramatiq.Worker(self.broker, worker_threads=max(1, threads), worker_timeout=200)
        worker.start()
        try:
            self._heartbeat(stop)
        finally:
            worker.stop(timeout=10_000)
            periodic.join(5)

