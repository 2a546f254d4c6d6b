"""Remote tiers named by URL (remote layer).

Three kinds, as the command line takes them (``--remote URL``):

* ``s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]`` -- any S3-compatible object
  store; credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``;
* ``grpc://HOST[:PORT][/INSTANCE]`` -- any REAPI v2 server (port 9092 unless
  given; ``grpcs://`` for TLS);
* ``http://HOST[:PORT][/PREFIX]`` -- a Bazel HTTP cache (port 8080 unless
  given; ``https://``: 443).

A URL that is none of these is a ConfigError that shows the three forms.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from cachefs.errors import ConfigError

#: Default ports, as bazel-remote has them.
GRPC_PORT = 9092
HTTP_PORT = 8080

FORMS = (
    "s3://BUCKET[/PREFIX]?endpoint=URL[&region=R], "
    "grpc://HOST[:PORT][/INSTANCE] or http://HOST[:PORT][/PREFIX]"
)


@dataclass(frozen=True)
class RemoteUrl:
    """A parsed remote URL.  ``prefix`` is empty or ends with ``/``."""

    kind: str  # "s3", "grpc" or "http"
    #: The URL as given (it holds no secret: credentials come from the environment).
    text: str
    #: s3: the endpoint URL ("" for AWS); grpc: HOST:PORT; http: the base URL.
    address: str
    bucket: str = ""
    prefix: str = ""
    instance: str = ""
    region: str = "us-east-1"
    tls: bool = False


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"remote {text!r}: {why}", hint=f"a remote is {FORMS}")


def _host_port(text: str, parts: urllib.parse.SplitResult, default: int) -> str:
    """``HOST:PORT`` (``[HOST]:PORT`` for IPv6), checked."""
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (port is None and ":" in parts.netloc.rsplit("]", 1)[-1]):
        raise _bad(text, "its port is not a number from 1 to 65535")
    if not parts.hostname:
        raise _bad(text, "it names no host")
    host = parts.hostname
    port = port or default
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split(part: str, text: str) -> urllib.parse.SplitResult:
    """``part`` of remote ``text`` (the URL, or its endpoint) split up."""
    try:
        return urllib.parse.urlsplit(part)
    except ValueError as exc:  # an unclosed IPv6 bracket, ...
        raise _bad(text, f"{part!r} is not a URL ({exc})") from None


def _prefix(path: str) -> str:
    """A path's parts as a prefix (``a/b/``); ValueError for an empty, ``.``,
    ``..`` part or one that would need escaping in a URL or an object key."""
    path = path.strip("/")
    for part in path.split("/") if path else ():
        if part in ("", ".", "..") or part != urllib.parse.quote(part, safe="-._~@+=,"):
            raise ValueError(path)
    return f"{path}/" if path else ""


def parse_remote(text: str) -> RemoteUrl:
    """A remote URL, checked (ConfigError naming what is wrong)."""
    parts = _split(text, text)
    scheme = parts.scheme.lower()
    if parts.username or parts.password:
        raise _bad(text, "credentials do not belong in the URL (use the environment)")
    try:
        prefix = _prefix(urllib.parse.unquote(parts.path))
    except ValueError:
        raise _bad(
            text, "its path has an empty, '.' or '..' part, or characters that need escaping"
        ) from None
    if scheme == "s3":
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        unknown = set(query) - {"endpoint", "region"}
        if unknown:
            raise _bad(text, f"unknown parameter {sorted(unknown)[0]!r} (endpoint, region)")
        if not parts.netloc:
            raise _bad(text, "it names no bucket")
        endpoint = query.get("endpoint", [""])[-1]
        if endpoint:
            where = _split(endpoint, text)
            if where.scheme not in ("http", "https"):
                raise _bad(text, f"its endpoint {endpoint!r} is not an http(s) URL")
            default = 443 if where.scheme == "https" else 80
            endpoint = f"{where.scheme}://{_host_port(text, where, default)}"
        return RemoteUrl(
            "s3",
            text,
            endpoint.rstrip("/"),
            bucket=parts.netloc,
            prefix=prefix,
            region=query.get("region", ["us-east-1"])[-1] or "us-east-1",
            tls=endpoint.startswith("https") or not endpoint,
        )
    if parts.query or parts.fragment:
        raise _bad(text, "only s3:// remotes take parameters")
    if scheme in ("grpc", "grpcs"):
        address = _host_port(text, parts, GRPC_PORT)
        return RemoteUrl("grpc", text, address, instance=prefix.rstrip("/"), tls=scheme == "grpcs")
    if scheme in ("http", "https"):
        address = _host_port(text, parts, HTTP_PORT if scheme == "http" else 443)
        return RemoteUrl(
            "http", text, f"{scheme}://{address}", prefix=prefix, tls=scheme == "https"
        )
    raise _bad(text, f"unknown kind {parts.scheme!r}" if scheme else "it is not a URL")


__all__ = ["FORMS", "GRPC_PORT", "HTTP_PORT", "RemoteUrl", "parse_remote"]
