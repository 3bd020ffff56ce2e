"""Executors run a :class:`~patchbank.sweep.graph.SweepGraph`: in this process, or on Ray.

Both run the same job functions (:func:`~patchbank.sweep.graph.run_extract_job`,
:func:`~patchbank.sweep.graph.run_score_job`) and hand every finished job's result to
``on_result`` as it arrives, so a progress bar and an interrupted sweep behave alike. A job
that fails (bad input, disk, memory) returns a row saying so; the others go on.

Ray: one task per extraction job, then one task per score job that takes its extraction
task's ObjectRef as an argument, so Ray starts it only when its banks exist. Tasks ask for
``num_gpus`` when the device is CUDA (or ``auto`` on a cluster with GPUs). Workers read and
write the banks and scores directories **by path**: on a cluster they must be on a file system
every node mounts at the same path (NFS, Lustre, a cloud file share); only small dicts travel
through Ray's object store.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

from patchbank.core.errors import SweepError
from patchbank.sweep.graph import SweepGraph, run_extract_job, run_score_job

log = logging.getLogger(__name__)

OnResult = Callable[[str, dict[str, Any]], None]


class InProcessExecutor:
    """Every job in this process, extractions first (the default; no extra dependencies)."""

    name = "inprocess"

    def run(self, graph: SweepGraph, on_result: OnResult | None = None) -> list[dict[str, Any]]:
        """Run the graph; returns the score jobs' rows in graph order."""
        extracted: dict[str, dict[str, Any]] = {}
        rows = []
        with tqdm(total=len(graph), desc=f"sweep {graph.config.name}", unit="job") as bar:
            for job in graph.extracts:
                extracted[job.id] = run_extract_job(job)
                if on_result:
                    on_result("extract", extracted[job.id])
                bar.update()
            for job in graph.scores:
                rows.append(run_score_job(job, extracted[job.extract_id]))
                if on_result:
                    on_result("score", rows[-1])
                bar.update()
        return rows


def import_ray() -> Any:
    """``ray``, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise SweepError("--executor ray needs Ray: pip install 'patchbank[sweep]' "
                         "(or pip install 'ray>=2.9')") from None
    return ray


class RayExecutor:
    """The same graph as Ray tasks: on an existing cluster (``address``) or a local Ray started
    for this sweep (``num_cpus`` cores, temporary files in a fresh folder removed afterwards).

    ``gpus_per_task``: GPUs each task asks for; ``None`` = 1 when ``device`` is ``cuda``, or
    ``auto`` and the cluster has GPUs, else 0. ``cpus_per_task``: cores each task asks for;
    Ray runs a task with that many torch/OpenMP threads. Float reductions (BLAS, Faiss) with
    another thread count can differ in the last bits, so results are bit-identical to an
    in-process run when ``cpus_per_task`` equals the cores torch uses here (tested).
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None,
                 gpus_per_task: float | None = None, temp_dir: str | None = None,
                 cpus_per_task: float = 1) -> None:
        self.address = address
        self.cpus_per_task = cpus_per_task
        self.num_cpus = num_cpus
        self.gpus_per_task = gpus_per_task
        self.temp_dir = temp_dir

    def _start(self, ray: Any) -> tuple[bool, str | None]:
        """Connect or start Ray; returns (whether this call started it, temp folder to drop)."""
        if ray.is_initialized():
            return False, None
        if self.address:
            try:
                ray.init(address=self.address, log_to_driver=True)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise SweepError(f"--ray-address {self.address}: cannot connect "
                                 f"({' '.join(str(err).split())[:200]}); start the head with "
                                 "`ray start --head` or check the address") from None
            return True, None
        temp = self.temp_dir or tempfile.mkdtemp(prefix="pbray-")
        ray.init(num_cpus=self.num_cpus, include_dashboard=False, _temp_dir=temp,
                 object_store_memory=256 * 1024 * 1024, log_to_driver=True)
        return True, None if self.temp_dir else temp

    def _gpus(self, ray: Any, device: str) -> float:
        if self.gpus_per_task is not None:
            return float(self.gpus_per_task)
        if device == "cpu":
            return 0.0
        has = float(ray.cluster_resources().get("GPU", 0)) > 0
        if device == "cuda" and not has:
            raise SweepError("--device cuda: the Ray cluster has no GPUs; use --device auto or "
                             "cpu, or start the workers on GPU nodes")
        return 1.0 if has else 0.0

    def run(self, graph: SweepGraph, on_result: OnResult | None = None) -> list[dict[str, Any]]:
        """Submit every job, collect results as they finish; returns the score rows in graph
        order. Stops Ray if it started it (also on errors and interrupts)."""
        ray = import_ray()
        started, temp = self._start(ray)
        try:
            gpus = self._gpus(ray, graph.config.device)
            log.info("Ray: %s, %s GPU(s) per task", ray.cluster_resources(), gpus)
            opts = {"num_cpus": self.cpus_per_task, "num_gpus": gpus, "max_retries": 0}
            extract_task = ray.remote(**opts)(run_extract_job)
            score_task = ray.remote(**opts)(run_score_job)
            ex_refs = {job.id: extract_task.remote(job) for job in graph.extracts}
            sc_refs = [score_task.remote(job, ex_refs[job.extract_id]) for job in graph.scores]
            kinds = {**{r: "extract" for r in ex_refs.values()}, **{r: "score" for r in sc_refs}}
            pending = list(kinds)
            results: dict[Any, dict[str, Any]] = {}
            with tqdm(total=len(pending), desc=f"sweep {graph.config.name} (ray)",
                      unit="job") as bar:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    for ref in done:
                        results[ref] = ray.get(ref)
                        if on_result:
                            on_result(kinds[ref], results[ref])
                        bar.update()
            return [results[r] for r in sc_refs]
        finally:
            if started:
                ray.shutdown()
            if temp:
                shutil.rmtree(temp, ignore_errors=True)


def make_executor(name: str, address: str | None = None, num_cpus: int | None = None,
                  gpus_per_task: float | None = None,
                  cpus_per_task: float = 1) -> InProcessExecutor | RayExecutor:
    """``inprocess`` or ``ray`` (with its address / local cores / resources per task)."""
    if name == "inprocess":
        return InProcessExecutor()
    if name == "ray":
        return RayExecutor(address, num_cpus, gpus_per_task, cpus_per_task=cpus_per_task)
    raise SweepError(f"--executor {name!r}: choose inprocess or ray")
