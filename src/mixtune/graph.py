"""The one orchestrator: a run is a graph of nodes (train a stage, merge, evaluate), each keyed by
the content hash of what decides its output, run in dependency order by :func:`run_graph`.

``mixtune train RECIPE`` is a graph of one path (its stages); ``mixtune study`` is the graph of all
its runs, where runs that share a stage prefix share its nodes, and merges and evaluations hang off
the models they read. A node that is done (its output is on disk, written whole) is skipped, so a
graph killed at any point resumes without redoing finished nodes, and a rerun does nothing.

With ``jobs`` > 1, nodes whose inputs are done run at the same time in separate local processes
(``spawn``ed; a node gets the cores over the nodes running when it starts as torch threads, so a
node that runs alone, such as a shared first stage, takes them all): a worker rebuilds the graph
from the same files and runs one node by its key, so nothing but keys crosses a process boundary.

With ``ray`` (:class:`RayOptions`), the same loop hands each ready node to a Ray cluster as a task
that reserves its kind's resources (CPUs, GPUs, memory; Ray runs as many at once as they allow);
the task rebuilds the graph from the same files, as a local worker does, so the files must lie on
a path every Ray node sees. Its output goes to ``logs/<key>.log``; a node that fails is run once
more by Ray, and if it fails again the graph stops as it does locally (nodes already running
finish, nothing new starts) with a :class:`NodeError` that names the node and its log.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from mixtune.core import ConfigError, MixtuneError, Strict


@dataclass(frozen=True)
class Node:
    """One step of a graph."""

    key: str
    """The content hash (or, in a one-path graph, the stage's name) that names the output."""
    kind: str
    """``train``, ``merge``, ``search``, ``eval`` or ``analysis``."""
    needs: tuple[str, ...] = ()
    """Keys of the nodes whose outputs this one reads."""
    label: str = ""
    """What the node does, for progress lines."""


class NodeError(MixtuneError):
    """A node failed on every attempt; the message names it and the file with its output."""


class NodeResources(Strict):
    """What a Ray task of one kind of node reserves on the node it runs on."""

    cpus: float = Field(default=1, gt=0)
    """Ray CPUs; also the node's torch threads (the whole number below, at least 1)."""
    gpus: float | None = Field(default=None, ge=0)
    """Ray GPUs (a fraction shares one GPU between tasks); None: 1 when the cluster has a GPU, else 0."""
    memory_gb: float | None = Field(default=None, gt=0)
    """Memory in GiB, Ray's ``memory`` resource: Ray starts a task only on a node with this much not
    reserved by others (a reservation, not a limit); None: reserve none."""


class RayOptions(Strict):
    """How a graph runs on Ray (``mixtune study --ray``): where, and what each kind of node reserves.
    How, not what: none of it changes a model or a score."""

    address: str | None = None
    """Ray's address: ``auto`` (the cluster ``ray start`` made, or ``RAY_ADDRESS``; an error when
    there is none), ``HOST:PORT``, ``ray://HOST:PORT`` (Ray Client), ``local`` (a new Ray instance on
    this machine for this run); None: ``RAY_ADDRESS``, else a cluster ``ray start`` made on this
    machine, else a new local instance."""
    train: NodeResources = NodeResources()
    """Training a stage (its torch threads are its CPUs)."""
    eval: NodeResources = NodeResources()
    """Scoring a model on the study's abilities (generation)."""
    search: NodeResources = NodeResources()
    """A merge search: scores each grid point on validation problems."""
    merge: NodeResources = NodeResources(gpus=0)
    """Merging models (tensor by tensor, on CPU): reserve memory for the inputs' largest tensors and
    the output being written, e.g. ``memory_gb: 8`` for 1B-parameter models."""
    analysis: NodeResources = NodeResources(gpus=0)
    """An analysis of trained models (task vectors, intruders, conjugate prompts, ...)."""


def ray_options(address: str | None, items: list[str] = ()) -> RayOptions:
    """The :class:`RayOptions` of ``--ray ADDRESS`` and ``--ray-resources KIND.KEY=VALUE`` items.

    Raises:
        ConfigError: Ray is not installed, the address looks like a recipe or an override (``--ray``
            took the next argument), or an item is not a resource of a kind of node.
    """
    import importlib.util

    from mixtune.core import validate
    from mixtune.core.config import apply_override, parse_overrides

    if importlib.util.find_spec("ray") is None:
        raise ConfigError("--ray: Ray is not installed; pip install 'mixtune[ray]' (on every node of the cluster)")
    if address is not None and ("=" in address or address.endswith((".yaml", ".yml"))):
        raise ConfigError(f"--ray {address}: expected a Ray address (auto, HOST:PORT, ray://HOST:PORT or local); "
                          "give the recipe and overrides before --ray, or write --ray=ADDRESS")
    overrides = parse_overrides(list(items))
    if "address" in overrides:
        raise ConfigError("--ray-resources address=...: give the address as --ray ADDRESS")
    data = RayOptions(address=address).model_dump()  # an item changes one resource of a kind, keeping its others
    for key, value in overrides.items():
        apply_override(data, key, value)
    return validate(RayOptions, data, where="--ray-resources", overrides=overrides)


def check_graph(nodes: Iterable[Node]) -> dict[str, Node]:
    """The nodes by key, in an order where every node comes after the nodes it needs.

    Raises:
        ConfigError: two nodes share a key with different needs, a node needs a key that is not in the
            graph, or the needs form a cycle.
    """
    by_key: dict[str, Node] = {}
    for n in nodes:
        if n.key in by_key and by_key[n.key].needs != n.needs:
            raise ConfigError(f"graph: node {n.key} is given twice with different inputs")
        by_key.setdefault(n.key, n)
    ordered: dict[str, Node] = {}
    visiting: set[str] = set()

    def visit(key: str, by: str) -> None:
        if key in ordered:
            return
        if key not in by_key:
            raise ConfigError(f"graph: node {by} needs {key}, which is not in the graph")
        if key in visiting:
            raise ConfigError(f"graph: node {key} depends on itself")
        visiting.add(key)
        for need in by_key[key].needs:
            visit(need, key)
        visiting.discard(key)
        ordered[key] = by_key[key]

    for key in by_key:
        visit(key, key)
    return ordered


def run_graph(nodes: Iterable[Node], *, done: Callable[[Node], bool], execute: Callable[[Node], None],
              jobs: int = 1, worker: Callable[[str], None] | None = None,
              init: tuple[Callable, tuple] | None = None, log: Callable[[str], None] = print,
              ray: RayOptions | None = None, logs: Path | None = None) -> list[str]:
    """Run every node that is not ``done``, each after the nodes it needs; returns the keys it ran.

    Args:
        done: whether a node's output is already there (then it is skipped).
        execute: runs a node in this process (``jobs`` = 1, no ``ray``).
        jobs: nodes run at once; above 1, ``worker(key)`` runs a node in a process of a pool whose
            processes first call ``init[0](*init[1])`` (both must be importable functions).
        ray: run every node as a Ray task instead, ``init`` then ``worker(key)`` as above, with the
            resources of its kind; ``jobs`` is then unused (the resources decide how many run).
        logs: with ``ray``, the folder of each node's output, ``<key>.log`` (on a path every Ray node sees).
        log: progress lines.

    Raises:
        NodeError: with ``ray``, a node failed twice (Ray retries it once).
    """
    graph = check_graph(nodes)
    todo = [k for k, n in graph.items() if not done(n)]
    if ray is not None:
        if worker is None or init is None or logs is None:
            raise ConfigError("run_graph: ray needs a worker function, its initialiser and a logs folder")
        if not todo:
            return todo
        return _run_pool(graph, todo, _RayPool(ray, worker, init, Path(logs), {graph[k].kind for k in todo}, log),
                         log)
    if jobs <= 1 or len(todo) <= 1:
        for key in todo:
            execute(graph[key])
        return todo
    if worker is None or init is None:
        raise ConfigError("run_graph: jobs > 1 needs a worker function and its initialiser")
    return _run_pool(graph, todo, _LocalPool(jobs, worker, init), log)


def _run_pool(graph: dict[str, Node], todo: list[str], pool, log) -> list[str]:
    """The loop of every executor: start each node whose needs are finished (up to ``pool.slots`` at
    once), wait for one to end, repeat. A node's error stops the graph: nothing new starts, the nodes
    running finish (their outputs stay done for the next run), then the error is raised."""
    pending = set(todo)
    finished: list[str] = []
    running: dict[Future, str] = {}
    with pool:
        try:
            while pending or running:
                ready = [k for k in todo if k in pending and not any(n in pending or n in running.values()
                                                                     for n in graph[k].needs)]
                batch = ready[:pool.slots - len(running)]
                together = len(running) + len(batch)
                for key in batch:
                    pending.discard(key)
                    log(f"graph: starting {graph[key].label or key} ({len(running) + 1} {pool.counted}"
                        f"{pool.output(graph[key])})")
                    running[pool.submit(graph[key], together)] = key
                if not running:  # nothing can start: what is pending needs a node that failed
                    raise ConfigError(f"graph: {len(pending)} nodes wait on inputs that were not produced")
                over, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in over:
                    key = running.pop(future)
                    pool.result(future, graph[key])
                    finished.append(key)
        except Exception:
            if running:
                log(f"graph: a node failed; waiting for the {len(running)} still running to finish")
                wait(running)
                for future, key in running.items():
                    try:
                        pool.result(future, graph[key])
                    except Exception as e:
                        log(f"graph: {e}")
            raise
        except BaseException:  # interrupted: stop what runs
            pool.cancel(list(running))
            raise
    return finished


class _LocalPool:
    """``jobs`` local ``spawn`` processes; a node's torch threads are the cores over the nodes
    running when it starts."""

    counted = "running"

    def __init__(self, jobs: int, worker: Callable[[str], None], init: tuple[Callable, tuple]) -> None:
        self.slots, self.worker, self.init = jobs, worker, init

    def __enter__(self) -> _LocalPool:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(max_workers=self.slots, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start_worker, initargs=(self.init,))
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)

    def output(self, node: Node) -> str:
        return ""  # a worker writes to this terminal

    def submit(self, node: Node, together: int) -> Future:
        threads = max(1, (os.cpu_count() or 1) // max(1, together))  # a node alone takes every core
        return self.pool.submit(_in_worker, self.worker, node.key, threads)

    def result(self, future: Future, node: Node) -> None:
        future.result()

    def cancel(self, futures: list[Future]) -> None:
        for future in futures:
            future.cancel()


def _start_worker(init: tuple[Callable, tuple]) -> None:
    init[0](*init[1])


def _in_worker(worker: Callable[[str], None], key: str, threads: int) -> None:
    """Run node ``key`` in a pool process with ``threads`` torch threads: the cores over the nodes
    running when it starts."""
    import torch

    torch.set_num_threads(threads)
    worker(key)


# -- Ray --------------------------------------------------------------------------------------------

ATTEMPT = "== mixtune node "
"""How each attempt's part of a node's log begins (Ray appends a retry to the same file)."""


class _RayPool:
    """Each node a Ray task with its kind's resources, retried once by Ray; output in ``logs/<key>.log``."""

    counted = "given to Ray, queued or running"

    def __init__(self, options: RayOptions, worker, init, logs: Path, kinds: set[str], log) -> None:
        self.options, self.worker, self.init, self.logs, self.kinds, self.log = options, worker, init, logs, kinds, log
        self.refs: dict[Future, object] = {}

    def __enter__(self) -> _RayPool:
        import uuid

        import ray

        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            try:
                ray.init(address=self.options.address, log_to_driver=False)
            except ConnectionError as e:
                raise ConfigError(f"--ray{' ' + self.options.address if self.options.address else ''}: {e}") from None
        try:
            self.requests = self._requests()
        except BaseException:
            self.__exit__()
            raise
        self.slots = 1 << 30  # every ready node: Ray queues those the free resources cannot take yet
        self.token = uuid.uuid4().hex  # this run's: a Ray worker opens the graph once per run
        # a GPU task gets a fresh process (Ray's default for GPU functions): a reused one would keep the
        # CUDA device it first initialised, whatever GPU Ray gives the next task
        self.tasks = ray.remote(_ray_node), ray.remote(max_calls=1)(_ray_node)
        self.logs.mkdir(parents=True, exist_ok=True)
        total = ray.cluster_resources()
        machines = sum(1 for n in ray.nodes() if n.get("Alive"))
        self.log(f"graph: on Ray ({machines} Ray node{'s' if machines != 1 else ''}: {_shown(total)}); each graph "
                 f"node's output in {self.logs}/<key>.log")
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.ray.shutdown()

    def _requests(self) -> dict[str, dict[str, float]]:
        """Per kind of node to run, its Ray resources (``CPU``, ``GPU``, ``memory`` in bytes).

        Raises:
            ConfigError: no node of the cluster has what a kind asks for (Ray would wait for ever).
        """
        alive = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        has_gpu = any(r.get("GPU", 0) > 0 for r in alive)
        out = {}
        for kind in sorted(self.kinds):
            r: NodeResources = getattr(self.options, kind, NodeResources())
            want = {"CPU": r.cpus, "GPU": (1.0 if has_gpu else 0.0) if r.gpus is None else r.gpus,
                    "memory": (r.memory_gb or 0) * 2**30}
            if not any(all(res.get(k, 0) >= v for k, v in want.items()) for res in alive):
                short = [k for k, v in want.items() if all(res.get(k, 0) < v for res in alive)] or [
                    k for k, v in want.items() if any(res.get(k, 0) < v for res in alive)]  # none has it all
                field = {"CPU": "cpus", "GPU": "gpus", "memory": "memory_gb"}[short[0]]
                raise ConfigError(f"--ray-resources {kind}.{field}: {kind} nodes ask for {_shown(want)}, and no Ray "
                                  f"node has that much ({'; '.join(_shown(res) for res in alive)}); ask for less, "
                                  "or add a Ray node that has it")
            out[kind] = want
        return out

    def submit(self, node: Node, together: int) -> Future:
        want = self.requests[node.kind]
        path = self.log_path(node)
        path.unlink(missing_ok=True)  # this run's attempts only
        options = {"num_cpus": want["CPU"], "num_gpus": want["GPU"], "max_retries": 1, "retry_exceptions": True,
                   "name": (node.label or node.key)[:200]} | ({"memory": int(want["memory"])} if want["memory"] else {})
        task = self.tasks[want["GPU"] > 0].options(**options)
        ref = task.remote(self.worker, self.init, self.token, node.key, node.label, max(1, int(want["CPU"])), str(path))
        future = ref.future()
        self.refs[future] = ref
        return future

    def output(self, node: Node) -> str:
        return f"; output in {self.log_path(node)}"

    def log_path(self, node: Node) -> Path:
        return self.logs / (re.sub(r"[^A-Za-z0-9._-]+", "-", node.key) + ".log")

    def result(self, future: Future, node: Node) -> None:
        """Raise a node's failure as a :class:`NodeError` with its label, its error and its log."""
        try:
            future.result()
        except self.ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            text = str(cause).strip().splitlines() or [""]
            what = f"{type(cause).__name__}: {text[0]}" + (" ..." if len(text) > 1 else "")
            path = self.log_path(node)
            attempts = (sum(line.startswith(ATTEMPT) for line in path.read_text(errors="replace").splitlines())
                        if path.exists() else 0)
            tries = f"{attempts} attempt{'s' if attempts != 1 else ''}" if attempts else "never started"
            raise NodeError(f"graph: {node.label or node.key} failed ({tries}; Ray retries a node once): {what}; "
                            f"its output: {path if attempts else 'none'}") from None

    def cancel(self, futures: list[Future]) -> None:
        for future in futures:
            try:
                self.ray.cancel(self.refs[future], force=True)
            except Exception:  # already over
                pass


def _shown(res: dict) -> str:
    """``2 CPUs, 0 GPUs, 3.1 GiB memory`` of a Ray resource dict."""
    return (f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs, "
            f"{res.get('memory', 0) / 2**30:.1f} GiB memory")


_OPENED: dict[str, str] = {}


def _ray_node(worker, init: tuple[Callable, tuple], token: str, key: str, label: str, threads: int,
              log_path: str) -> None:
    """A Ray task: run node ``key`` with ``threads`` torch threads, its output appended to
    ``log_path``; the process opens the graph (``init``) once per run (``token``), and again after
    a failure, so that a retry starts clean."""
    import platform
    import sys
    import time
    import traceback
    from contextlib import redirect_stderr, redirect_stdout

    log = Path(log_path)
    if not log.parent.is_dir():
        raise NodeError(f"{log.parent}: no such folder on Ray node {platform.node()}; mixtune study --ray needs the "
                        "study folder on a file system every node mounts at the same path (docs/training.md, "
                        "\"Studies on Ray\")")
    with open(log, "a", buffering=1) as f, _fds_to(f), redirect_stdout(f), redirect_stderr(f):
        print(f"{ATTEMPT}{label or key} ({key}): {platform.node()}, process {os.getpid()}, "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {threads} threads")
        try:
            if _OPENED.get("token") != token:
                _OPENED.clear()
                init[0](*init[1])
                _OPENED["token"] = token
            _in_worker(worker, key, threads)
        except BaseException:
            _OPENED.clear()
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


class _fds_to:
    """Point file descriptors 1 and 2 at ``f`` (what C code and child processes write), then back."""

    def __init__(self, f) -> None:
        self.f = f

    def __enter__(self) -> None:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = os.dup(1), os.dup(2)
        os.dup2(self.f.fileno(), 1)
        os.dup2(self.f.fileno(), 2)

    def __exit__(self, *exc) -> None:
        import sys

        sys.stdout.flush()  # what code holding the process's own streams wrote
        sys.stderr.flush()
        self.f.flush()
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
