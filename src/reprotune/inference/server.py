"""`reprotune serve`: the exported ONNX model behind the Open Inference Protocol, on Ray Serve.

- Ray Serve runs the replicas: `@serve.batch` gathers concurrent requests into one ONNX Runtime call
  (dynamic batching, counted in images), replicas and autoscaling are deployment options, and the same
  application runs on one machine, on a multi-machine Ray cluster, or on Kubernetes through KubeRay
  (`build` is the import path a Serve config file names).
- The protocol's routes sit on Serve's FastAPI ingress; `protocol.py` parses and encodes, so
  this module only moves bytes, bounds the body and counts.
- Metrics: Ray exports Prometheus text at http://127.0.0.1:METRICS_PORT/metrics on every node: Serve's
  own request, latency, error and batch-size series (`ray_serve_num_http_requests_total`,
  `ray_serve_http_request_latency_ms`, `ray_serve_num_http_error_requests_total`,
  `ray_serve_actual_batch_size`) and ours (`ray_reprotune_images_total`, `ray_reprotune_rejected_total`).
- A request is bytes in memory only: nothing in it names a file, so no request reads or writes one.
  With `log_requests`, the server itself writes what it classified into that folder, under names it
  makes (`requestlog.py`), for `reprotune monitor`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations (Request)
# as objects, and under Serve's class ingress string annotations are not resolved (a Request
# parameter would be taken for a query parameter).
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray.serve.schema import ProxyStatus
from starlette.exceptions import HTTPException

from reprotune import __version__
from reprotune.errors import ReprotuneError
from reprotune.inference.cluster import loopback, own_process_groups
from reprotune.inference.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    decode_files,
    encode_response,
    error_body,
    parse_request,
)
from reprotune.inference.requestlog import RequestLog
from reprotune.inference.runtime import onnx_runner
from reprotune.inference.settings import Settings

DEPLOYMENT = "classifier"


APP = FastAPI(title="reprotune", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)


@APP.exception_handler(HTTPException)
async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown routes and methods answer in the protocol's shape: {"error": ...}."""
    return JSONResponse({"error": str(exc.detail)}, exc.status_code)


@APP.exception_handler(RequestValidationError)
async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": f"invalid request: {exc.errors()}"}, 400)


def _images_in(items: list[np.ndarray]) -> int:
    """A batch's size for `@serve.batch`: images, not requests."""
    return sum(len(images) for images in items)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes, inflated if the
    client compressed it (tritonclient's gzip and deflate), with the same limit on the result."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"request body of {int(declared):,} bytes is over this server's limit of {limit:,}", 413)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ProtocolError(f"request body is over this server's limit of {limit:,} bytes", 413)
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(f"unsupported Content-Encoding {encoding!r} (gzip, deflate or none)", 415)
    inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"request body is not valid {encoding} data ({exc})") from None
    if len(inflated) > limit:
        raise ProtocolError(f"request body inflates to more than this server's limit of {limit:,} bytes", 413)
    if not inflater.eof:
        raise ProtocolError(f"request body is truncated {encoding} data")
    return inflated


@serve.deployment(name=DEPLOYMENT, graceful_shutdown_timeout_s=30)
@serve.ingress(APP)
class Replica:
    """One replica: an ONNX Runtime session and the protocol's routes."""

    def __init__(self, settings: dict):
        import ray
        from ray.serve.metrics import Counter

        self.settings = Settings.model_validate(settings)
        self.contract = self.settings.contract()
        self.run = onnx_runner(Path(self.settings.model), self.settings.threads)
        self.max_body = int(self.settings.max_body_mb * 2**20)
        self.log = None if self.settings.log_requests is None else RequestLog(
            Path(self.settings.log_requests), self.contract.classes, self.settings.log_max_images,
            self.settings.log_max_mb)
        self.predict.set_max_batch_size(self.settings.max_batch_size)
        self.predict.set_batch_wait_timeout_s(self.settings.max_wait_ms / 1000)
        context = serve.get_replica_context()
        # In each reply's parameters: which replica (and Ray node) answered; also the batch it ran in.
        self.identity = {"replica": context.replica_id.unique_id, "node": ray.get_runtime_context().get_node_id()}
        self.images = Counter("reprotune_images", description="Images classified.", tag_keys=("input",))
        self.rejected = Counter("reprotune_rejected", description="Requests refused, by HTTP status.",
                                tag_keys=("status",))

    @APP.get("/v2/health/live")
    def live(self) -> dict:
        return {"live": True}

    @APP.get("/v2/health/ready")
    def ready(self) -> dict:
        return {"ready": True}  # a replica takes requests only once its model is loaded

    @APP.get("/v2")
    def server_metadata(self) -> dict:
        return {"name": "reprotune", "version": __version__, "extensions": ["binary_tensor_data", "classification"]}

    @APP.get("/v2/models/{model}")
    @APP.get("/v2/models/{model}/versions/{version}")
    def model_metadata(self, model: str, version: str | None = None) -> Response:
        return self._answer(lambda: self.contract.check_model(model, version) or self.contract.metadata())

    @APP.get("/v2/models/{model}/ready")
    @APP.get("/v2/models/{model}/versions/{version}/ready")
    def model_ready(self, model: str, version: str | None = None) -> Response:
        return self._answer(lambda: self.contract.check_model(model, version) or {"name": model, "ready": True})

    @APP.post("/v2/models/{model}/infer")
    @APP.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(self, model: str, request: Request, version: str | None = None) -> Response:
        try:
            self.contract.check_model(model, version)
            body = await _read_body(request, self.max_body)
            parsed = parse_request(body, request.headers.get(HEADER_LENGTH), self.contract)
            if parsed.files is not None:
                images = await asyncio.to_thread(decode_files, parsed.files, self.contract)
            else:
                images = parsed.images
            logits, batch = await self.predict(images)
            if self.log is not None:
                await asyncio.to_thread(self.log.record, images, logits)
            self.images.inc(len(images), tags={"input": "file" if parsed.files is not None else "tensor"})
            reply, headers = encode_response(parsed, logits, self.contract, {**self.identity, "batch": batch})
        except ProtocolError as exc:
            return self._refuse(exc)
        media = headers.pop("content-type")
        return Response(reply, 200, headers=headers, media_type=media)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)
    async def predict(self, batches: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        """Concurrent requests' images in one ONNX Runtime call (in a thread: the replica keeps
        accepting requests, which fill the next batch). Each request gets its logits and the size of
        the call that computed them."""
        logits = await asyncio.to_thread(self.run, np.concatenate(batches))
        parts = np.split(logits, np.cumsum([len(images) for images in batches])[:-1])
        return [(part, len(logits)) for part in parts]

    def _answer(self, make) -> Response:
        try:
            return JSONResponse(make())
        except ProtocolError as exc:
            return self._refuse(exc)

    def _refuse(self, exc: ProtocolError) -> Response:
        """The protocol's error reply, counted by status."""
        self.rejected.inc(tags={"status": str(exc.status)})
        return Response(error_body(str(exc)), exc.status, media_type="application/json")


def application(settings: Settings):
    """The Serve application: the classifier with its replicas (or autoscaling) and per-replica CPUs.
    Callers check `settings.contract()` first (it hashes the model file), to fail in one line rather
    than in every replica."""
    options = {"ray_actor_options": {"num_cpus": settings.threads},
               # An access-log line per request costs more than a 32 px image's inference; errors still log.
               "logging_config": {"enable_access_log": False, "log_level": "WARNING"},
               # Enough requests in flight per replica to fill a batch while the previous one runs.
               "max_ongoing_requests": 2 * settings.max_batch_size}
    if settings.max_replicas > settings.replicas:
        options["autoscaling_config"] = {"min_replicas": settings.replicas, "max_replicas": settings.max_replicas,
                                         "target_ongoing_requests": settings.max_batch_size}
    else:
        options["num_replicas"] = settings.replicas
    return Replica.options(**options).bind(settings.model_dump())


def build(args: dict):
    """Application builder for Serve config files and KubeRay: `import_path: reprotune.inference.server:build`,
    `args:` any Settings field (model, name, max_batch_size, ...). On a running cluster, `threads` 0
    (the default) is one per replica: the config's ray_actor_options say how many CPUs each gets."""
    settings = Settings.checked(args).with_threads(None)
    settings.contract()
    return application(settings)


def run(settings: Settings, host: str, port: int, address: str | None, metrics_port: int,
        proxy_everywhere: bool, start_timeout_s: float = 300) -> None:
    """Serve until SIGINT or SIGTERM, then drain the requests in flight, shut down and return.
    `settings.threads` 0: a Ray started here splits its CPUs (a container's quota, not the host's cores)
    among the replicas; on a running cluster (`address`) each replica gets one. Ray and Serve may take up
    to `start_timeout_s` to start (a busy machine is slow), then a one-line error.
    (`cluster.ray_environment` must have run before this module was imported.)"""
    import ray

    settings.contract()
    local = loopback(host) and loopback(address)  # Ray's own addresses: see cluster.py
    if address is None:
        _check_free(host, port)
        _check_free("127.0.0.1" if local else "0.0.0.0", metrics_port)
    since, stop, serving = time.monotonic(), threading.Event(), False
    own_process_groups()  # a signal to our process group reaches this process, not Ray's
    if address is None:
        os.environ.update(_proxy_ready_check(start_timeout_s))  # the Ray started here inherits it
    # "local": a Ray of our own. Left None, ray.init joins whatever cluster `ray start` (or another
    # program's) last started on this machine (Ray reads /tmp/ray/ray_current_cluster): a test's
    # two-node cluster, then killed, took a server down with it. (RAY_ADDRESS arrives as `address`.)
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             **({"_metrics_export_port": metrics_port} if address is None else {}))
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the ready line below says it all
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1)) if address is None else None
        settings = settings.with_threads(cpus)
        if cpus is not None and settings.replicas * settings.threads > cpus:
            raise ReprotuneError(f"serve: {settings.replicas} replicas x {settings.threads} threads need "
                                 f"{settings.replicas * settings.threads} CPUs; Ray has {cpus} here")
        for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
            signal.signal(signum, lambda *_: stop.set())

        def start() -> None:
            _start_serve(host, port, address, proxy_everywhere, start_timeout_s)
            serve.run(application(settings), name=settings.name, route_prefix="/", blocking=False)

        serving = _wait_for_start(start, since, start_timeout_s, stop)
        if not serving:
            print("stopping before Ray Serve had started", file=sys.stderr, flush=True)
            return
        url = f"http://{host}:{port}/v2/models/{settings.name}"
        metrics = (f"http://{'127.0.0.1' if local else host}:{metrics_port}/metrics" if address is None
                   else "each Ray node's metrics port")
        print(f"serving {settings.model} at {url} with {settings.replicas} replica(s) x {settings.threads} "
              f"thread(s) (metrics: {metrics}); Ctrl-C stops", flush=True)
        wait_for(stop)
        print("stopping: answering the requests in flight", file=sys.stderr, flush=True)
        # Deleting the application first drains it: each replica finishes its ongoing requests (up to
        # graceful_shutdown_timeout_s) while the proxy, still up, carries the replies. Shutting Serve
        # down alone stops the proxies first and drops those connections.
        serve.delete(settings.name)
    finally:
        # A Ray started here takes everything with it; a cluster's Serve (its actors outlive us) is shut
        # down even when it never finished starting.
        if serving or address is not None:
            _shutdown_serve()
        ray.shutdown()


def wait_for(stop: threading.Event, poll_s: float = 0.5) -> None:
    """Return once `stop` is set by a signal handler. Python runs handlers in the main thread, but the
    kernel hands a signal sent to the process to any thread that does not block it, often one of Ray's:
    a main thread asleep in a wait without a timeout is then never woken to run the handler (a SIGINT
    went unanswered until the test killed the server a minute later). Waking every `poll_s` runs it."""
    while not stop.wait(poll_s):
        pass


PROGRESS_S = 15  # how often a slow start says how long it has waited


def _proxy_ready_check(start_timeout_s: float) -> dict[str, str]:
    """The setting that lets Serve's controller wait for a new HTTP proxy as long as our start may take.

    The controller checks that a new proxy is ready, 5 s a try (RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S),
    and after three failed tries kills it (ray.kill) and starts another: on a busy machine a proxy's
    process takes longer than that just to start, so the kill, and with it our start, failed
    ("ActorDiedError: ... ProxyActor ... killed by ray.kill"), and the next proxy fared no better.
    The controller reads it in its own process: a Ray started here has it from our environment (a
    runtime_env would keep the controller and proxies off the workers Ray has already started, and make
    a slow start slower); a cluster's controller is given it."""
    return {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": f"{start_timeout_s:g}"}


def _start_serve(host: str, port: int, address: str | None, proxy_everywhere: bool, start_timeout_s: float) -> None:
    """Start Serve's controller and HTTP proxies, and wait until the proxies answer, however long that
    takes (the caller bounds it)."""
    controller = None if address is None else {"runtime_env": {"env_vars": _proxy_ready_check(start_timeout_s)}}
    try:
        serve.start(http_options={"host": host, "port": port},
                    proxy_location="EveryNode" if proxy_everywhere else "HeadOnly",
                    logging_config={"log_level": "WARNING"},
                    controller_options=controller)
    except TimeoutError:
        # serve.start gives up on the proxies after 60 s (HTTP_PROXY_TIMEOUT, not a setting), yet they go
        # on starting: wait for them here, as Serve's status reports them.
        while any(status != ProxyStatus.HEALTHY for status in serve.status().proxies.values()):
            time.sleep(1)


def _wait_for_start(start: Callable[[], None], since: float, limit_s: float, stop: threading.Event) -> bool:
    """Run `start` (Ray Serve's start: it blocks, for seconds on a quiet machine and minutes on a busy
    one) in a thread, saying every PROGRESS_S seconds how long it has waited. True once it has returned;
    False if a signal came first; once `limit_s` seconds have passed since `since`, a one-line error.
    (A start left running is ended by ray.shutdown(), which makes its Ray calls return.)"""
    done, failed = threading.Event(), []

    def target() -> None:
        try:
            start()
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=target, name="serve-start", daemon=True).start()
    report = since + PROGRESS_S
    while not done.wait(0.2):
        now = time.monotonic()
        if stop.is_set():
            return False
        if now - since > limit_s:
            raise ReprotuneError(f"serve: Ray Serve did not start within {limit_s:g} s (--start-timeout-s); "
                                 "a busy machine starts it slowly: allow more, or free some CPU")
        if now >= report:
            print(f"waiting for Ray Serve to start ({now - since:.0f} s of {limit_s:g} s)...", file=sys.stderr,
                  flush=True)
            report += PROGRESS_S
    if failed:
        raise failed[0]
    return True


def _shutdown_serve(timeout_s: float = 30) -> None:
    """Shut Serve down (its proxies, then its controller), quietly. serve.shutdown() waits on a call to
    the controller that only ends when the controller kills itself, and Ray reports every such call:
    "Task ServeController.graceful_shutdown failed ... killed by ray.kill", on every Ctrl-C. Here the
    call returns at once and the controller's name, gone from Ray's named actors, says it has exited."""
    import ray

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return  # no Serve to shut down
    ray.get(controller.graceful_shutdown.remote(wait=False), timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while any(actor["name"] == SERVE_CONTROLLER_NAME and actor["namespace"] == SERVE_NAMESPACE
              for actor in ray.util.list_named_actors(all_namespaces=True)):
        if time.monotonic() > deadline:
            print(f"serve: Serve's controller did not exit within {timeout_s:g} s", file=sys.stderr, flush=True)
            return
        time.sleep(0.1)


def _check_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ReprotuneError(f"serve: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
