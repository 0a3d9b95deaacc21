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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mixtune.core import ConfigError


@dataclass(frozen=True)
class Node:
    """One step of a graph."""

    key: str
    """The content hash (or, in a one-path graph, the stage's name) that names the output."""
    kind: str
    """``train``, ``merge``, ``search`` or ``eval``."""
    needs: tuple[str, ...] = ()
    """Keys of the nodes whose outputs this one reads."""
    label: str = ""
    """What the node does, for progress lines."""


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
              init: tuple[Callable, tuple] | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Run every node that is not ``done``, each after the nodes it needs; returns the keys it ran.

    Args:
        done: whether a node's output is already there (then it is skipped).
        execute: runs a node in this process (``jobs`` = 1).
        jobs: nodes run at once; above 1, ``worker(key)`` runs a node in a process of a pool whose
            processes first call ``init[0](*init[1])`` (both must be importable functions).
        log: progress lines.
    """
    graph = check_graph(nodes)
    todo = [k for k, n in graph.items() if not done(n)]
    if jobs <= 1 or len(todo) <= 1:
        for key in todo:
            execute(graph[key])
        return todo
    if worker is None or init is None:
        raise ConfigError("run_graph: jobs > 1 needs a worker function and its initialiser")
    return _run_parallel(graph, todo, jobs=jobs, worker=worker, init=init, log=log)


def _run_parallel(graph: dict[str, Node], todo: list[str], *, jobs: int, worker, init, log) -> list[str]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pending = set(todo)
    finished: list[str] = []
    running: dict = {}
    cores = os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker, initargs=(init,)) as pool:
        try:
            while pending or running:
                ready = [k for k in todo if k in pending and not any(n in pending or n in running.values()
                                                                     for n in graph[k].needs)]
                batch = ready[:jobs - len(running)]
                threads = max(1, cores // max(1, len(running) + len(batch)))  # a node alone takes every core
                for key in batch:
                    pending.discard(key)
                    log(f"graph: starting {graph[key].label or key} ({len(running) + 1} running)")
                    running[pool.submit(_in_worker, worker, key, threads)] = key
                if not running:  # nothing can start: what is pending needs a node that failed
                    raise ConfigError(f"graph: {len(pending)} nodes wait on inputs that were not produced")
                over, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in over:
                    key = running.pop(future)
                    future.result()  # a node's error stops the graph; finished nodes stay done
                    finished.append(key)
        except BaseException:
            for future in running:
                future.cancel()
            raise
    return finished


def _start_worker(init: tuple[Callable, tuple]) -> None:
    init[0](*init[1])


def _in_worker(worker: Callable[[str], None], key: str, threads: int) -> None:
    """Run node ``key`` in a pool process with ``threads`` torch threads: the cores over the nodes
    running when it starts."""
    import torch

    torch.set_num_threads(threads)
    worker(key)
