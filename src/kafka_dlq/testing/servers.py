"""Real Apache Kafka and Redis servers on loopback, started from this machine's own tools.

Kafka comes from Maven Central (the jars are resolved once by Maven into a cache folder outside any repository);
Redis is the distribution's ``redis-server``. Both run as child processes in a folder of their own, on free (or
chosen) loopback ports, and are stopped with SIGTERM, then SIGKILL after a bound. These calls block: they are for
set-up code, fixtures and the CLI, not for the event loop.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from kafka_dlq.errors import ServerError

__all__ = [
    "KAFKA_VERSION",
    "KafkaServer",
    "RedisServer",
    "cache_dir",
    "command_line",
    "ensure_kafka_libs",
    "free_port",
    "free_ports",
    "pid_alive",
    "redis_command",
    "redis_pings",
    "terminate",
]

KAFKA_VERSION = "4.4.0"
_STOP_TIMEOUT = 15.0
_INTERRUPTED_STOP_TIMEOUT = 5.0  # a half-started server has nothing worth a long graceful stop
_FIX_AND_RETRY = "fix the setting or free the resource named there, then start it again"


def cache_dir() -> Path:
    """Where downloaded Kafka jars live: ``$KAFKA_DLQ_CACHE``, else ``$XDG_CACHE_HOME/kafka-dlq``, else ``~/.cache``."""
    if env := os.environ.get("KAFKA_DLQ_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kafka-dlq"


def free_ports(count: int) -> list[int]:
    """``count`` different loopback TCP ports that nothing listens on right now.

    All are held at once while they are picked: ports picked one after the other can be the same port twice.
    """
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now (for several at once, :func:`free_ports`)."""
    return free_ports(1)[0]


def _check_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do (Java sets it by default): connections of a stopped server in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise ServerError(
                f"{what} port 127.0.0.1:{port} is already in use: stop whatever listens there "
                f"(`ss -ltnp 'sport = :{port}'` shows it) or choose another port"
            ) from None


def _which(tool: str, hint: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise ServerError(f"`{tool}` was not found on PATH: {hint}")
    return found


def _find_java() -> str:
    if home := os.environ.get("JAVA_HOME"):
        candidate = Path(home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return _which(
        "java",
        "install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME",
    )


def ensure_kafka_libs(version: str = KAFKA_VERSION) -> Path:
    """The folder of Kafka ``version``'s jars, resolving them with Maven the first time only."""
    home = cache_dir() / f"kafka-{version}"
    libs, stamp = home / "libs", home / "resolved"
    if stamp.is_file() and libs.is_dir():
        return libs
    mvn = _which(
        "mvn",
        f"Kafka {version}'s jars are not in {libs} yet and Maven is needed once to fetch them "
        "(Debian: apt-get install maven; or run `make setup`)",
    )
    home.mkdir(parents=True, exist_ok=True)
    pom = home / "pom.xml"
    pom.write_bytes(resources.files("kafka_dlq.testing").joinpath("kafka-pom.xml").read_bytes())
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=home))
    log = home / "mvn.log"
    with log.open("wb") as out:
        result = subprocess.run(
            [
                mvn,
                "-B",
                "-q",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={staging}",
                f"-Dkafka.version={version}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if result.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
        shutil.rmtree(staging, ignore_errors=True)
        raise ServerError(
            f"Maven could not resolve Kafka {version} (exit {result.returncode}): check that Maven Central is "
            "reachable and the version exists",
            log_path=str(log),
        )
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    stamp.write_text(version + "\n")
    return libs


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists and has not exited: a zombie (exited, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False  # gone between the two looks
    except OSError:
        return True  # no /proc here: the signal test is all there is
    # "pid (comm) state ...": comm may hold spaces and parentheses, the state follows the last ")".
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def command_line(pid: int) -> str | None:
    """Process ``pid``'s command line (arguments joined by spaces), or None when it is not alive or unreadable.

    A pid in a state file can outlive its process (a reboot, a crash) and be given to another program: check this
    before signalling a pid that is not a child of ours.
    """
    if not pid_alive(pid):
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or None


def terminate(pid: int, timeout: float = _STOP_TIMEOUT, *, wait: Callable[[float], object] | None = None) -> None:
    """Stop process ``pid``'s group: SIGTERM, then SIGKILL after ``timeout`` s. ``wait`` reaps a child of ours."""

    def gone_within(seconds: float) -> bool:
        if wait is not None:
            try:
                wait(seconds)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.05)
        return not pid_alive(pid)

    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    if not gone_within(timeout):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        gone_within(5.0)


def redis_command(port: int, *words: str) -> bytes:
    """One Redis command over a plain socket (no client library needed to probe a server)."""
    payload = f"*{len(words)}\r\n".encode() + b"".join(
        f"${len(w.encode())}\r\n".encode() + w.encode() + b"\r\n" for w in words
    )
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
        sock.sendall(payload)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        header, _, rest = data.partition(b"\r\n")
        if not header.startswith(b"$"):
            return data
        size = int(header[1:])
        while len(rest) < size + 2:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return rest[:size]


def redis_pings(port: int) -> bool:
    """True when a Redis server on loopback ``port`` answers PING."""
    try:
        return redis_command(port, "PING").startswith(b"+PONG")
    except OSError:
        return False


_STOP_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"  # PR_SET_PDEATHSIG: kept across the exec below
    "if os.getppid() != int(sys.argv[1]):\n"  # the parent was gone before the prctl took effect
    "    sys.exit('kafka-dlq: the process that started this server has ended')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)
"""Run by ``sys.executable`` before the server: Linux sends it SIGTERM when the thread that started it ends."""

_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _spawner_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that starts servers, alive as long as this process.

    Linux sends the parent-death signal when the *thread* that started the child ends, not the process: a server
    started from a short-lived thread (``asyncio.to_thread``) would stop with it. This one ends only when the
    process does.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-dlq-servers")
        return _spawner


class _Process:
    """A server child process: its own session (a Ctrl-C at the terminal does not reach it), output to a log.

    Unless ``outlive_parent``, the server stops (SIGTERM) when the process that started it ends, however it ends: a
    test run killed by SIGKILL or by CI's timeout leaves no broker behind to hold its ports and a core (Linux only).
    """

    def __init__(self, name: str, log_path: Path, *, outlive_parent: bool = False) -> None:
        self.name = name
        self.log_path = log_path
        self.outlive_parent = outlive_parent
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def spawn(self, argv: Sequence[str], cwd: Path) -> None:
        self._log = self.log_path.open("ab")
        if not self.outlive_parent and sys.platform == "linux":
            # A launcher that execs the server, not a preexec_fn: that would run Python in a child forked from a
            # process whose other threads (librdkafka's) may hold locks the child then waits for for ever.
            launched = [sys.executable, "-c", _STOP_WITH_PARENT, str(os.getpid()), *argv]
            self.popen = _spawner_thread().submit(self._popen, launched, cwd).result()
        else:
            self.popen = self._popen(argv, cwd)

    def _popen(self, argv: Sequence[str], cwd: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def died(self, what: str) -> ServerError:
        """The error for a server that exited on its own: its exit code and the log line that says why."""
        code = self.exit_code()
        return ServerError(
            f"{self.name} exited with code {code} {what}: {self.reason()}: {_FIX_AND_RETRY}",
            log_path=str(self.log_path),
        )

    def reason(self) -> str:
        lines = [ln.strip() for ln in self.tail(200).splitlines() if ln.strip()]
        for marker in ("Exception:", "FATAL", "Error:", "ERROR", "error"):
            for index in range(len(lines) - 1, -1, -1):
                if marker in lines[index]:
                    # Redis states the fatal error on one line and the offending setting and why on the next ones.
                    extra = 3 if marker == "FATAL" else 0
                    return " | ".join(lines[index : index + 1 + extra])[:400]
        return lines[-1][:300] if lines else "it printed nothing"

    def tail(self, max_lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-max_lines:])

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL once ``timeout`` seconds have passed."""
        if self.popen is not None and self.popen.poll() is None:
            try:
                terminate(self.popen.pid, timeout, wait=self.popen.wait)
            except BaseException:
                # Interrupted while waiting for it (a second Ctrl-C): it must not outlive us all the same.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                raise
        if self._log is not None:
            self._log.close()
            self._log = None

    def detach(self) -> None:
        """Leave the server running past this process (``kafka-dlq dev up``): forget it without stopping it."""
        if self.popen is not None:
            self.popen.returncode = 0  # not ours to reap any more; keeps Popen from warning that it still runs
            self.popen = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)

    def rss_bytes(self) -> int | None:
        """Resident memory from /proc, or None where there is no /proc."""
        if self.pid is None:
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None


class _Server:
    """What Kafka and Redis servers share: a folder, a process, a lifecycle.

    A server ends with the process that started it (a test run that is killed leaves none behind), unless it is
    made with ``outlive_parent=True``, as ``kafka-dlq dev up`` makes its own.
    """

    name = "server"

    def __init__(
        self, data_dir: str | os.PathLike[str] | None, startup_timeout: float, outlive_parent: bool = False
    ) -> None:
        self._own_dir = data_dir is None
        self.directory = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix=f"kafka-dlq-{self.name}-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.startup_timeout = startup_timeout
        self.process = _Process(self.name, self.directory / "server.log", outlive_parent=outlive_parent)
        self.ready_seconds: float | None = None

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def running(self) -> bool:
        return self.process.popen is not None and self.process.exit_code() is None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); its folder stays for a restart."""
        self.process.stop(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.process.kill()
        self.process.stop(0)

    def restart(self) -> Self:
        """Stop, then start again on the same folder and ports."""
        self.stop()
        return self.start()

    def remove(self) -> None:
        """Delete the server's folder (only one this object created)."""
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def rss_bytes(self) -> int | None:
        return self.process.rss_bytes()

    @contextlib.contextmanager
    def _stopped_unless_started(self) -> Iterator[None]:
        """Stop the process when start-up ends any other way than ready: an error, Ctrl-C, a test's timeout."""
        try:
            yield
        except BaseException:
            self.process.stop(_INTERRUPTED_STOP_TIMEOUT)
            raise

    def _wait_ready(self, is_ready: Callable[[], bool]) -> None:
        self.ready_seconds = None
        started = time.monotonic()
        deadline = started + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.exit_code() is not None:
                error = self.process.died("during start-up")
                self.process.stop(0)
                raise error
            if is_ready():
                self.ready_seconds = time.monotonic() - started
                return
            time.sleep(0.1)
        self.process.stop()
        raise ServerError(
            f"{self.name} was not ready after {self.startup_timeout:.0f} s and was stopped: read its log, "
            "or raise the start-up timeout on a slow machine",
            log_path=str(self.log_path),
        )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if exc is None:
            self.remove()


_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.controller.name = kafka.controller
logger.controller.level = WARN
logger.requests.name = kafka.request.logger
logger.requests.level = WARN
"""


class KafkaServer(_Server):
    """A one-node Apache Kafka (KRaft, combined broker and controller) on loopback.

    >>> with KafkaServer() as kafka:                               # doctest: +SKIP
    ...     print(kafka.bootstrap_servers)
    127.0.0.1:41234
    """

    name = "kafka"

    def __init__(
        self,
        *,
        port: int | None = None,
        controller_port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        version: str = KAFKA_VERSION,
        heap: str = "512m",
        properties: Mapping[str, str] | None = None,
        startup_timeout: float = 90.0,
        outlive_parent: bool = False,
    ) -> None:
        super().__init__(data_dir, startup_timeout, outlive_parent)
        # Picked together, so the broker and the controller never get the same port (nor a port given here).
        spare = [p for p in free_ports(2) if p not in (port, controller_port)] if not (port and controller_port) else []
        self.port = port or spare.pop(0)
        self.controller_port = controller_port or spare.pop(0)
        self.version = version
        self.heap = heap
        self.properties = dict(properties or {})
        self.format_seconds: float | None = None
        """How long the last start spent formatting the log folder (its own JVM), None when it needed no format."""

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _server_properties(self) -> str:
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.directory / "data"),
            "num.partitions": "1",
            # Production clusters create topics on purpose; so do our tests, and a missing topic is an error.
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "share.coordinator.state.topic.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            "num.network.threads": "2",
            "num.io.threads": "4",
        }
        settings.update(self.properties)
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _java(self, java: str, libs: Path, main: str, *args: str, heap: str) -> list[str]:
        return [
            java,
            f"-Xms{heap}",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            # The broker shares the machine with the clients it serves (the tests, the benchmarks, your app): its
            # collector's pauses take at most half the cores, not all of them, so the clients' threads keep
            # running. Measured with `kafka-dlq bench client` on 2 cores, 8 runs each after a broker start:
            # loop-lag p99 median 10.1 -> 8.9 ms, max 15-70 -> 12-34 ms.
            f"-XX:ParallelGCThreads={max(1, (os.cpu_count() or 2) // 2)}",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.directory / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def start(self) -> Self:
        """Start the broker and return once it logged "Kafka Server started" and answers a metadata request."""
        if self.running:
            return self
        java = _find_java()
        libs = ensure_kafka_libs(self.version)
        _check_port_free(self.port, "Kafka's broker")
        _check_port_free(self.controller_port, "Kafka's controller")
        config = self.directory / "server.properties"
        config.write_text(self._server_properties())
        (self.directory / "log4j2.properties").write_text(_LOG4J2)
        self.format_seconds = None
        if not (self.directory / "data" / "meta.properties").is_file():
            started = time.monotonic()
            self._format(java, libs, config)
            self.format_seconds = time.monotonic() - started
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        from kafka_dlq.kafka.admin import broker_answers

        with self._stopped_unless_started():
            self.process.spawn(self._java(java, libs, "kafka.Kafka", str(config), heap=self.heap), self.directory)
            self._wait_ready(lambda: self._logged_started() and broker_answers(self.bootstrap_servers, timeout=2.0))
        return self

    def _format(self, java: str, libs: Path, config: Path) -> None:
        cluster_id = "-"
        while cluster_id.startswith("-"):  # the storage tool would read a leading "-" as an option
            cluster_id = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
        argv = self._java(
            java, libs, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config), heap="256m"
        )
        with self.log_path.open("ab") as out:
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.directory, check=False)
        if result.returncode != 0:
            raise ServerError(
                f"formatting Kafka's log folder failed with exit code {result.returncode}: {self.process.reason()}: "
                f"{_FIX_AND_RETRY}",
                log_path=str(self.log_path),
            )

    def _logged_started(self) -> bool:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return b"Kafka Server started" in log.read()
        except FileNotFoundError:
            return False


class RedisServer(_Server):
    """A Redis server (the distribution's ``redis-server``, or ``binary``: a compatible one, such as Valkey's
    ``valkey-server``) on loopback, optionally with AOF persistence."""

    name = "redis"

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 20.0,
        binary: str | os.PathLike[str] | None = None,
        outlive_parent: bool = False,
    ) -> None:
        super().__init__(data_dir, startup_timeout, outlive_parent)
        self.port = port or free_port()
        self.binary = binary
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.version: str | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        """Start redis-server and return once it answers PING."""
        if self.running:
            return self
        binary = (
            os.fspath(self.binary)
            if self.binary is not None
            else _which("redis-server", "install Redis (Debian: apt-get install redis-server) or run `make setup`")
        )
        _check_port_free(self.port, "Redis")
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--save",
            "",
            "--logfile",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            *self.extra_args,
        ]
        with self._stopped_unless_started():
            self.process.spawn(argv, self.directory)
            self._wait_ready(self._pings)
            self.version = self._info_field("redis_version")
        return self

    def _pings(self) -> bool:
        return redis_pings(self.port)

    def _info_field(self, field: str) -> str | None:
        try:
            text = redis_command(self.port, "INFO", "server").decode(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
        return None
