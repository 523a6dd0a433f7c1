"""Where a study's runs train: local processes (``--jobs``) or Slurm jobs through submitit (``--executor slurm``).

``execute(fn, tasks, ...)`` calls ``fn(*args)`` for each ``(key, args)`` task and yields ``(key, result)`` as runs
finish, in any order. A run's result never depends on where it trained (each run seeds itself and sets its threads).

On Slurm the unfinished tasks are submitted as one job array (``SlurmOptions``: partition, time limit, GPUs and CPUs
per run, how many array tasks run at once); their job ids are recorded in ``<log folder>/jobs.json``, so a parent
that exits (or is killed) can be started again with the same command: it collects what finished, waits for the jobs
still pending or running, and resubmits those that failed or vanished. A job that Slurm pre-empts or that reaches
its time limit is requeued by submitit (``submitit.helpers.Checkpointable``) with the same arguments, and the run
resumes from its ``last.pt``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import submitit

Executor = Literal["local", "slurm"]
EXECUTORS: tuple[str, ...] = ("local", "slurm")
Task = tuple[str, tuple]
# Slurm states of a recorded job that is still coming or finished: the parent waits for it (or reads its result)
# instead of resubmitting.
ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "CONFIGURING", "COMPLETING", "RESIZING",
         "SUSPENDED", "STAGE_OUT", "SIGNALING", "COMPLETED"}


class ExecutorError(ValueError):
    """Slurm is not available, or a run failed as a cluster job (the message names its log)."""


class JobsPending(Exception):
    """``SlurmOptions(wait=False)``: the runs were submitted (or are still running); rerun to collect them."""


@dataclass(frozen=True)
class SlurmOptions:
    """How each run is submitted (submitit's ``AutoExecutor`` parameters).

    Args:
        partition: Slurm partition (``--partition``); ``None``: the cluster's default.
        time_min: time limit per run in minutes; a run that reaches it is requeued and resumes.
        gpus: GPUs per run; cpus: CPUs per run (its torch threads are the study's ``threads``).
        array_parallelism: how many runs of the job array run at once.
        mem_gb: memory per run; ``None``: the partition's default.
        wait: wait for the runs (``False``: submit, then raise ``JobsPending``; rerun to collect).
        cluster: ``"slurm"``, or ``"local"`` for submitit's local executor (the same code path without Slurm: tests).
    """

    partition: str | None = None
    time_min: int = 24 * 60
    gpus: int = 1
    cpus: int = 4
    array_parallelism: int = 64
    mem_gb: int | None = None
    wait: bool = True
    cluster: Literal["slurm", "local"] = "slurm"

    def parameters(self) -> dict[str, Any]:
        """The ``AutoExecutor.update_parameters`` keywords (``slurm_*`` ones are ignored by the local cluster)."""
        params: dict[str, Any] = {"name": "liaf-lab", "timeout_min": self.time_min, "gpus_per_node": self.gpus,
                                  "cpus_per_task": self.cpus, "tasks_per_node": 1, "nodes": 1,
                                  "slurm_array_parallelism": self.array_parallelism}
        if self.partition is not None:
            params["slurm_partition"] = self.partition
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        return params


class _Resumable(submitit.helpers.Checkpointable):
    """One run as a job: pre-empted or timed out, submitit requeues the same call, and the run resumes from its
    ``last.pt`` (``Checkpointable.checkpoint`` resubmits the same arguments)."""

    def __call__(self, fn: Callable[..., Any], args: tuple) -> Any:
        return fn(*args)


def check_slurm(options: SlurmOptions) -> None:
    """``ExecutorError`` unless Slurm's ``sbatch`` is on the PATH (not needed for ``cluster="local"``)."""
    if options.cluster == "slurm" and shutil.which("sbatch") is None:
        raise ExecutorError("--executor slurm needs Slurm, and sbatch is not on this machine's PATH: run the study "
                            "from a Slurm login node, or use the default local processes (--jobs N)")


def local_pool(jobs: int) -> ProcessPoolExecutor:
    """``jobs`` spawned worker processes, each of which exits when this process dies (a killed study leaves no
    run training on, re-parented)."""
    from ..utils.processes import exit_with_parent

    return ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=exit_with_parent,
                               initargs=(os.getpid(),))


def execute(fn: Callable[..., Any], tasks: Sequence[Task], jobs: int = 1, executor: Executor = "local",
            options: SlurmOptions | None = None, log_folder: str | Path | None = None,
            finished: Callable[[str], Any] | None = None) -> Iterator[tuple[str, Any]]:
    """``(key, fn(*args))`` for every task, as runs finish.

    Args:
        fn: a module-level function (pickled by reference into other processes and jobs).
        tasks: ``(key, args)`` pairs; keys are unique (a study uses the run's folder).
        jobs: local processes at once (``1``: in this process, in order).
        executor: ``"local"`` or ``"slurm"`` (with ``options``, default ``SlurmOptions()``).
        log_folder: Slurm only: submitit's scripts, logs and results, and ``jobs.json`` (on a shared filesystem).
        finished: ``key -> result`` of a task done before (read from disk), else ``None``: yielded without a
            process or a job (a study's finished runs never wait in a cluster's queue).

    Raises:
        ExecutorError: Slurm is absent, or a job failed (names the run and its log).
        JobsPending: ``options.wait`` is ``False`` and some runs are not finished.
    """
    if executor not in EXECUTORS:
        raise ExecutorError(f"executor {executor!r} is not one of {list(EXECUTORS)}")
    if executor == "slurm":
        check_slurm(options or SlurmOptions())
    done = {key: finished(key) for key, _ in tasks} if finished is not None else {}
    for key, result in done.items():
        if result is not None:
            yield key, result
    tasks = [(key, args) for key, args in tasks if done.get(key) is None]
    if executor == "slurm":
        if log_folder is None:
            raise ExecutorError("the slurm executor needs a log_folder (on a filesystem the nodes share)")
        yield from _slurm(fn, tasks, options or SlurmOptions(), Path(log_folder))
    elif jobs == 1:
        for key, args in tasks:
            yield key, fn(*args)
    else:
        with local_pool(jobs) as pool:
            futures = {pool.submit(fn, *args): key for key, args in tasks}
            for future in as_completed(futures):
                yield futures[future], future.result()


def _slurm(fn: Callable[..., Any], tasks: Sequence[Task], options: SlurmOptions,
           folder: Path) -> Iterator[tuple[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "jobs.json"
    known: dict[str, str] = json.loads(record.read_text()) if record.exists() else {}
    running: dict[str, submitit.Job] = {}
    if options.cluster == "slurm":  # a parent started again: wait for the jobs still coming, resubmit the others
        for key, _ in tasks:
            if key in known:
                job = submitit.SlurmJob(folder, known[key])
                if job.state in ALIVE:
                    running[key] = job
    executor = submitit.AutoExecutor(folder=folder, cluster=options.cluster)
    executor.update_parameters(**options.parameters())
    todo = [(key, args) for key, args in tasks if key not in running]
    if todo:
        with executor.batch():  # one job array
            submitted = [(key, executor.submit(_Resumable(), fn, args)) for key, args in todo]
        running.update(submitted)
        known.update({key: job.job_id for key, job in submitted})
        tmp = record.with_name(f".{record.name}.tmp")
        tmp.write_text(json.dumps(known, indent=2))
        tmp.replace(record)
    if not options.wait:
        ids = sorted({job.job_id.split("_")[0] for job in running.values()})
        raise JobsPending(f"{len(running)} runs are submitted or running as Slurm jobs {ids} ({len(todo)} submitted "
                          f"now; logs in {folder}); run the same command again to collect them and write the report")
    keys = {id(job): key for key, job in running.items()}
    poll = 10.0 if options.cluster == "slurm" else 0.5
    for job in submitit.helpers.as_completed(list(running.values()), poll_frequency=poll):
        key = keys[id(job)]
        try:
            yield key, job.result()
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as err:
            last = next((line for line in reversed(str(err).splitlines()) if line.strip()), "")
            raise ExecutorError(f"run {key} failed as job {job.job_id} ({last.strip()}); its log: {job.paths.stderr}. "
                                "Run the study again to resubmit it") from None
