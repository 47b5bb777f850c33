"""A resumable stage graph on stage keys: what ``cafe pipeline run`` executes and ``cafe pipeline plan`` prints.

Usage::

    graph = Graph([Stage("build-r0", (), key_parts, run_build), Stage("train-r0", ("build-r0",), ...), ...])
    for item in graph.plan(state):            # no stage runs, no model loads
        print(item.name, item.action, item.why)
    graph.run(state, until="train-r0")

A stage's **key** is the hash of its own key parts (its semantic config slice, model fingerprints; never
resources or operational settings) and its inputs' keys, so a changed part re-runs that stage and exactly the
stages that depend on it. A finished stage leaves a record (``_loop/stages/<name>.json``: key, parts, outputs,
times) written **last**, after its outputs; a stage whose record holds the current key is skipped. A stage's
``run`` must itself be safe to re-run after a kill (the build resumes by chunk, training from its checkpoint);
the graph guarantees that no finished stage is redone and that a killed stage is run again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from pipeline.store import Storage

log = logging.getLogger(__name__)

STATE_DIR = "_loop"


def stable_key(*parts) -> str:
    """16 hex characters of sha256 over the JSON of ``parts`` (sorted keys): the one hash of stage keys."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Stage:
    """One node: ``parts(ctx)`` → its own key parts (a dict of name → JSON-able value); ``run(ctx, keys)`` →
    its outputs (a dict of name → location or figure), given every stage's key."""

    name: str
    deps: tuple[str, ...]
    parts: Callable[[object], dict]
    run: Callable[[object, dict], dict]
    description: str = ""


@dataclass
class PlanItem:
    name: str
    key: str
    action: str  # "skip" (finished with this key) or "run"
    why: str
    record: dict | None = None


@dataclass
class RunResult:
    items: list[PlanItem]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    timeline: list[dict] = field(default_factory=list)


class Graph:
    def __init__(self, stages: list[Stage]):
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stage names in {names}")
        seen: set[str] = set()
        for s in stages:  # declared in a topological order: every input before its users
            missing = [d for d in s.deps if d not in seen]
            if missing:
                raise ValueError(f"stage {s.name}: inputs {missing} are not declared before it")
            seen.add(s.name)
        self.stages = stages
        self.by_name = {s.name: s for s in stages}

    def keys(self, ctx) -> tuple[dict[str, str], dict[str, dict]]:
        keys, parts = {}, {}
        for s in self.stages:
            own = s.parts(ctx)
            parts[s.name] = {**own, **{f"input:{d}": keys[d] for d in s.deps}}
            keys[s.name] = stable_key(s.name, parts[s.name])
        return keys, parts

    def upstream(self, name: str) -> list[str]:
        """``name`` and every stage it depends on, in declaration order."""
        need = {name}
        for s in reversed(self.stages):
            if s.name in need:
                need.update(s.deps)
        return [s.name for s in self.stages if s.name in need]

    def plan(self, ctx, state: Storage, until: str | None = None) -> list[PlanItem]:
        if until is not None and until not in self.by_name:
            raise ValueError(f"unknown stage {until!r}; stages: {', '.join(self.by_name)}")
        keys, parts = self.keys(ctx)
        wanted = set(self.upstream(until)) if until else set(self.by_name)
        items: list[PlanItem] = []
        runs: set[str] = set()
        for s in self.stages:
            if s.name not in wanted:
                continue
            record = state.read_json(f"{STATE_DIR}/stages/{s.name}.json")
            if record is not None and record.get("key") == keys[s.name]:
                items.append(PlanItem(s.name, keys[s.name], "skip", "finished with this key", record))
                continue
            runs.add(s.name)
            if record is None:
                started = state.read_json(f"{STATE_DIR}/running/{s.name}.json")
                why = ("interrupted: started, never finished" if started and started.get("key") == keys[s.name]
                       else "never run")
            else:
                changed = sorted(p for p in set(parts[s.name]) | set(record.get("parts", {}))
                                 if parts[s.name].get(p) != record.get("parts", {}).get(p))
                inputs = [c.removeprefix("input:") for c in changed if c.startswith("input:")]
                own = [c for c in changed if not c.startswith("input:")]
                why = "; ".join(filter(None, [f"changed: {', '.join(own)}" if own else "",
                                              f"input re-runs: {', '.join(inputs)}" if inputs else ""]))
            items.append(PlanItem(s.name, keys[s.name], "run", why or "key changed"))
        return items

    def run(self, ctx, state: Storage, until: str | None = None, echo=print) -> RunResult:
        items = self.plan(ctx, state, until)
        keys, parts = self.keys(ctx)
        result = RunResult(items)
        for item in items:
            if item.action == "skip":
                result.skipped.append(item.name)
                result.timeline.append({"stage": item.name, "action": "skip", "seconds": 0.0})
                continue
            stage = self.by_name[item.name]
            echo(f"[pipeline] {item.name}: run ({item.why})")
            state.write_json(f"{STATE_DIR}/running/{item.name}.json", {"key": item.key, "started": _now()})
            t0 = time.perf_counter()
            outputs = stage.run(ctx, keys)
            seconds = time.perf_counter() - t0
            record = {"key": item.key, "parts": parts[item.name], "outputs": outputs, "finished": _now(),
                      "seconds": round(seconds, 3)}
            state.write_json(f"{STATE_DIR}/stages/{item.name}.json", record)  # last: the stage is finished
            state.delete(f"{STATE_DIR}/running/{item.name}.json")
            item.record = record
            result.ran.append(item.name)
            result.timeline.append({"stage": item.name, "action": "run", "seconds": round(seconds, 3)})
            echo(f"[pipeline] {item.name}: done in {seconds:.1f} s")
        return result


def outputs_of(state: Storage, name: str) -> dict:
    """The outputs a finished stage recorded (raises if it has not finished)."""
    record = state.read_json(f"{STATE_DIR}/stages/{name}.json")
    if record is None:
        raise FileNotFoundError(f"stage {name} has not finished in {state.uri}")
    return record["outputs"]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
