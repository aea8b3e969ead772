"""The head's fault tolerance store: a real Redis (Debian's ``redis-server``) holding the GCS's
tables, as KubeRay's GCS fault tolerance uses an external Redis (``RAY_REDIS_ADDRESS``).

Loopback only, protected mode, a password generated into the state folder (mode 0600) and
given to Redis in its configuration file (never on its command line), append-only persistence
so that a restarted Redis still has the cluster's state.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from raycluster.errors import PlatformError
from raycluster.local.state import write_secret


def redis_config(redis_dir: Path, port: int, password: str) -> str:
    return (
        "# Written by rayplane (raycluster/local/redis_store.py): the head's GCS store.\n"
        "bind 127.0.0.1\n"
        "protected-mode yes\n"
        f"port {port}\n"
        f"requirepass {password}\n"
        f"dir {redis_dir}\n"
        "appendonly yes\n"
        "appendfsync everysec\n"
        'save ""\n'
        "daemonize no\n"
        f"logfile {redis_dir / 'redis.log'}\n"
    )


def redis_command(redis_dir: Path, port: int, password_path: Path) -> list[str]:
    """``redis-server <config>``, the configuration (with the password) written 0600."""
    server = shutil.which("redis-server")
    if server is None:
        raise PlatformError("--ha needs redis-server on PATH (apt-get install redis-server; "
                            "`make test` and `make demo` install it)")
    redis_dir.mkdir(parents=True, exist_ok=True)
    config = redis_dir / "redis.conf"
    write_secret(config, redis_config(redis_dir, port, password_path.read_text().strip()))
    return [server, str(config)]


def redis_ping(port: int, password_path: Path, timeout: float = 2.0) -> None:
    """PING the platform's Redis with its password; PlatformError saying why when it fails."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # One try: redis-py retries three times with backoff by default (10 s on a port that never
    # answers), and callers bound their waits themselves.
    client = redis.Redis(host="127.0.0.1", port=port, password=password_path.read_text().strip(),
                         socket_timeout=timeout, socket_connect_timeout=timeout,
                         retry=Retry(NoBackoff(), 0))
    try:
        client.ping()
    except redis.RedisError as err:
        raise PlatformError(f"Redis at 127.0.0.1:{port} does not answer: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                            ) from None
    finally:
        client.close()


__all__ = ["redis_command", "redis_config", "redis_ping"]
