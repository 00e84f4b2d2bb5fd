"""The server's generation loop: a bounded queue, requests batched across clients, progress,
interrupt, and many hosts.

One thread (`Scheduler.loop`) owns the pipeline. It takes the oldest queued job, waits up to
`batch_wait_s` for more jobs with the same `sdjax.pipeline.combine.batch_key`, merges up to
`max_batch` images into one Request, runs it (one compiled call, sharded over the devices
when the server has --devices), and splits the result back. Jobs that cannot share run in
turn, oldest first. When a merged batch fails, each of its jobs runs alone, so one bad
request never fails its batch-mates.

Many hosts: process 0 serves HTTP and runs this loop; every other process runs `follow`.
Each step is a message broadcast from process 0 (`broadcast_bytes`): a batch (the resolved
A1111 payloads, from which every process builds the same Requests), a model switch, a no-op
heartbeat while idle, or stop. Each process generates its near-equal slice of the batch's
images on its own devices (`combine.host_range`), and the slices are gathered back on every
process (`allgather_bytes`) in order; images depend only on their seeds, so the result
equals one process's.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import io
import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from PIL import Image

from sdjax.errors import QueueFull, SdjaxError
from sdjax.errors import ServeInterrupted as Interrupted
from sdjax.images import save_png
from sdjax.pipeline import combine
from sdjax.pipeline.generator import GenerationResult, model_hash
from sdjax.serve import a1111


@dataclasses.dataclass
class Job:
    task: str  # "txt2img" / "img2img"
    payload: dict  # seeds resolved: every process builds the same Request from it
    request: Any
    key: Any
    future: concurrent.futures.Future
    arrived: float


@dataclasses.dataclass
class Outcome:
    """What a job gets back: the result, or interrupted (no images), or an error."""

    result: GenerationResult | None = None
    interrupted: bool = False
    error: Exception | None = None


def broadcast_bytes(data: bytes) -> bytes:
    """Process 0's `data` on every process (others pass anything)."""
    from jax.experimental import multihost_utils

    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buf = np.zeros(n, np.uint8)
    if jax.process_index() == 0:
        buf[:] = np.frombuffer(data, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()


def allgather_bytes(data: bytes) -> list[bytes]:
    """Every process's `data`, in process order, on every process."""
    from jax.experimental import multihost_utils

    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
    buf = np.zeros(int(lengths.max()), np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lengths), -1)
    return [rows[i, :int(n)].tobytes() for i, n in enumerate(lengths)]


def _png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Scheduler:
    """Owns the pipeline; `submit` a job from any thread, `loop` in one thread (process 0),
    `follow` on the other processes.

    pipe: the loaded Pipeline; ctx: `a1111.Context`; max_batch: most images per compiled call;
    batch_wait_s: how long the oldest job waits for batch-mates; max_queue: jobs queued at
    most (more: QueueFull); device_kw: `devices` / `fsdp` for `Generator.generate`;
    outdir: also save every image there; load: fn(path) -> Pipeline for a model switch.
    """

    def __init__(self, pipe, ctx: a1111.Context, *, max_batch: int = 32, batch_wait_s: float = 0.05,
                 max_queue: int = 64, device_kw: dict | None = None, outdir: Path | None = None,
                 load: Callable[[Path], Any] | None = None, models_dir: Path | None = None):
        self.pipe, self.ctx = pipe, ctx
        self.max_batch, self.batch_wait_s, self.max_queue = max_batch, batch_wait_s, max_queue
        self.device_kw = device_kw or {}
        self.outdir, self.load, self.models_dir = outdir, load, models_dir
        self.lock = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.stopping = False
        self.interrupt = threading.Event()
        self.stats = {"generate_calls": 0, "batches": 0, "requests": 0, "images": 0, "errors": 0}
        self.progress = {"job": "", "sampling_step": 0, "sampling_steps": 0, "started": 0.0, "job_count": 0}
        self.saved = 0
        self.thread: threading.Thread | None = None

    # -- process 0: the queue -------------------------------------------------------------
    def submit(self, task: str, payload: dict) -> Job:
        """Validate (SdjaxError for a bad value) and queue one request; QueueFull when full.
        The Job's future gets its Outcome."""
        payload = a1111.resolve_seeds(payload)
        request, _ = a1111.to_request(payload, task, self.ctx)
        key = combine.batch_key(self.pipe, request)
        job = Job(task, payload, request, None if key is None else (task, key),
                  concurrent.futures.Future(), time.monotonic())
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self.waiting.append(job)
            self.lock.notify_all()
        return job

    def switch_model(self, path: Path) -> concurrent.futures.Future:
        """Queue a model switch (runs between batches)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            self.waiting.append(Job("switch", {"path": str(path)}, None, None, future, time.monotonic()))
            self.lock.notify_all()
        return future

    def start(self) -> None:
        self.thread = threading.Thread(target=self.loop, name="sdjax-scheduler", daemon=True)
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running batch, answer queued jobs with QueueFull, stop the followers."""
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and its batch-mates, after waiting for more (None: stop)."""
        with self.lock:
            while not self.waiting and not self.stopping:
                if not self.lock.wait(timeout=2.0) and jax.process_count() > 1:
                    return []  # idle: a heartbeat keeps the followers' collectives alive
            if self.stopping:
                for job in self.waiting:
                    job.future.set_exception(QueueFull("the server is shutting down"))
                self.waiting.clear()
                return None
            first = self.waiting[0]
            if first.key is not None:
                deadline = first.arrived + self.batch_wait_s
                while not self.stopping and time.monotonic() < deadline and self._images(first.key) < self.max_batch:
                    self.lock.wait(timeout=max(deadline - time.monotonic(), 0.001))
            if first.key is None:
                self.waiting.popleft()
                return [first]
            batch, images = [], 0
            for job in list(self.waiting):
                n = int(job.request.batch_size)
                if job.key == first.key and (not batch or images + n <= self.max_batch):
                    batch.append(job)
                    images += n
                    self.waiting.remove(job)
            return batch

    def _images(self, key) -> int:
        return sum(int(j.request.batch_size) for j in self.waiting if j.key == key)

    def loop(self) -> None:
        """Process 0's loop: take a batch, tell the other processes, run it, answer the jobs."""
        hosts = jax.process_count()
        while True:
            batch = self._take()
            if batch is None:
                if hosts > 1:
                    broadcast_bytes(json.dumps({"op": "stop"}).encode())
                return
            if not batch:
                broadcast_bytes(json.dumps({"op": "noop"}).encode())
                continue
            if batch[0].task == "switch":
                self._message({"op": "switch", "path": batch[0].payload["path"]}, hosts)
                try:
                    batch[0].future.set_result(self._switch(Path(batch[0].payload["path"])))
                except Exception as e:  # noqa: BLE001 -- answered to the client
                    batch[0].future.set_exception(e)
                continue
            self._message({"op": "batch", "jobs": [[j.task, j.payload] for j in batch]}, hosts)
            try:
                outcomes = self.execute([j.request for j in batch])
            except Exception as e:  # noqa: BLE001 -- never take the loop down
                outcomes = [Outcome(error=e)] * len(batch)
            self.stats["requests"] += len(batch)
            for job, outcome in zip(batch, outcomes):
                if outcome.result is not None and self.outdir is not None:
                    self._save(outcome.result)
                job.future.set_result(outcome)

    def _message(self, msg: dict, hosts: int) -> None:
        if hosts > 1:
            broadcast_bytes(json.dumps(msg).encode())

    # -- every process -----------------------------------------------------------------------
    def follow(self) -> None:
        """Processes other than 0: run what process 0 broadcasts until it says stop."""
        while True:
            msg = json.loads(broadcast_bytes(b"").decode())
            if msg["op"] == "stop":
                return
            if msg["op"] == "switch":
                try:
                    self._switch(Path(msg["path"]))
                except Exception:  # noqa: BLE001 -- process 0 reports it
                    pass
            elif msg["op"] == "batch":
                self.execute([a1111.to_request(payload, task, self.ctx)[0] for task, payload in msg["jobs"]])

    def _switch(self, path: Path) -> str:
        if self.load is None:
            raise SdjaxError("this server cannot switch models (no --models-dir)")
        self.pipe = self.load(path)
        return str(path)

    def execute(self, requests: list) -> list[Outcome]:
        """Run the requests as one batch (all processes together); on failure each alone."""
        outcome = self._run(combine.merge(requests))
        if outcome.error is None or len(requests) == 1:
            if outcome.result is None:
                return [outcome] * len(requests)
            return [Outcome(result=r) for r in combine.split(outcome.result, [int(q.batch_size) for q in requests])]
        return [self._run(r) for r in requests]

    def _progress(self, steps: int) -> Callable[[int], None]:
        def on_step(i: int) -> None:
            self.progress["sampling_step"] = i + 1
            if self.interrupt.is_set():
                raise Interrupted("interrupted")
        self.progress.update(sampling_step=0, sampling_steps=steps, started=time.monotonic())
        return on_step

    def _run(self, request) -> Outcome:
        """One compiled call on this process's share of `request`'s images, gathered."""
        hosts, me = jax.process_count(), jax.process_index()
        n = int(request.batch_size)
        request = combine.pad(request, combine.bucket(n, self.max_batch))  # a few shapes, a few compiles
        start, stop = combine.host_range(int(request.batch_size), me, hosts) if hosts > 1 else (0, int(request.batch_size))
        self.interrupt.clear()
        status: dict[str, Any] = {"status": "ok"}
        result = None
        try:
            if stop > start:
                part = combine.slice_request(request, start, stop) if hosts > 1 else request
                steps = int(part.steps)
                self.stats["generate_calls"] += 1
                result = self.pipe.generator.generate(part, progress=self._progress(steps), **self.device_kw)
        except Exception as e:  # noqa: BLE001 -- reported per request
            status = {"status": "interrupted"} if self.interrupt.is_set() else {"status": "error", "message": str(e),
                                                                                  "type": type(e).__name__}
            if not isinstance(e, (SdjaxError, Interrupted)) and not self.interrupt.is_set():
                status["exception"] = e
        finally:
            self.progress.update(sampling_step=0, sampling_steps=0)
        if hosts > 1:
            mine = {k: v for k, v in status.items() if k != "exception"}
            if result is not None:
                mine.update(images=[_png(im) for im in result.images], infotexts=result.infotexts, seeds=result.seeds)
            parts = [json.loads(b) for b in allgather_bytes(json.dumps(mine).encode())]
            bad = [p for p in parts if p["status"] != "ok"]
            if bad:
                status = bad[0]
                result = None
            else:
                images = [Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB") for p in parts
                          for s in p.get("images", [])]
                result = GenerationResult(images, np.zeros((0,), np.float32),
                                          [t for p in parts for t in p.get("infotexts", [])],
                                          [s for p in parts for s in p.get("seeds", [])])
        if status["status"] == "interrupted":
            return Outcome(interrupted=True)
        if status["status"] == "error":
            self.stats["errors"] += 1
            return Outcome(error=status.get("exception") or SdjaxError(status["message"]))
        self.stats["batches"] += 1
        self.stats["images"] += n
        return Outcome(result=combine.split(result, [n])[0])  # the padding images dropped

    def _save(self, result: GenerationResult) -> None:
        for image, info, seed in zip(result.images, result.infotexts, result.seeds):
            while True:
                self.saved += 1
                try:
                    save_png(image, self.outdir / f"{self.saved:05d}-{seed}.png", info, exclusive=True)
                    break
                except FileExistsError:
                    continue

    def model_info(self) -> tuple[str, str | None]:
        path = Path(self.pipe.model_dir)
        return (path.stem if path.is_file() else path.name), model_hash(self.pipe)


__all__ = ["Interrupted", "Job", "Outcome", "QueueFull", "Scheduler", "allgather_bytes", "broadcast_bytes"]
