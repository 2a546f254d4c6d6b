"""Remote tiers named by URL (remote layer).

Three kinds, as the command line takes them (``--remote URL``):

* ``s3://BUCKET[/PREFIX]?endpoint=URL[&region=R][&sign_payload=yes|no]`` --
  any S3-compatible object store; credentials from ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY``.  Requests are signed; their bodies too unless
  the endpoint is ``https`` (TLS covers them there, and a SHA-256 of every
  body costs close to a core-second per GiB pushed) or ``sign_payload=no``
  says so (over plain ``http`` a changed body would then be stored: safe
  for blobs and packs, verified against their digests when read, not for
  unsigned shared entries or pack indexes);
* ``grpc://HOST[:PORT][/INSTANCE]`` -- any REAPI v2 server (port 9092 unless
  given; ``grpcs://`` for TLS);
* ``http://HOST[:PORT][/PREFIX]`` -- a Bazel HTTP cache (port 8080 unless
  given; ``https://``: 443).

A server that wants credentials (``cachefs serve --tokens``/``--tls-client-ca``)
is given them by files named in the URL's parameters (names of files, never
secrets): ``token_file=PATH`` (a bearer token, sent as ``authorization``),
``ca=PEM`` (a CA to trust besides the system's, TLS only) and, for
``grpcs://``, ``cert=PEM&key=PEM`` (a client certificate: mutual TLS).

A URL that is none of these is a ConfigError that shows the three forms.
"""

from __future__ import annotations

import functools
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from cachefs.errors import ConfigError

#: Default ports, as bazel-remote has them.
GRPC_PORT = 9092
HTTP_PORT = 8080

FORMS = (
    "s3://BUCKET[/PREFIX]?endpoint=URL[&region=R][&sign_payload=yes|no], "
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
    #: s3: sign the bodies of requests too (over ``http`` unless ``sign_payload=no``).
    sign_payload: bool = False
    #: Files of the credentials a server asks for (see the module doc); "" none.
    token_file: str = ""
    ca: str = ""
    cert: str = ""
    key: str = ""

    def credentials(self) -> tuple[str | None, bytes | None, bytes | None, bytes | None]:
        """The token, CA, certificate and key the URL names, read (ConfigError
        naming the file that cannot be)."""
        out: list[bytes | None] = []
        for what, path in (("token", self.token_file), ("CA", self.ca),
                           ("certificate", self.cert), ("key", self.key)):  # fmt: skip
            try:
                out.append(Path(path).read_bytes() if path else None)
            except OSError as exc:
                raise ConfigError(
                    f"remote {self.text}: cannot read its {what} file {path}: {exc.strerror}"
                ) from None
        token = None if out[0] is None else out[0].decode("utf-8", "replace").strip()
        if token == "":
            raise ConfigError(f"remote {self.text}: its token file {self.token_file} is empty")
        return token, out[1], out[2], out[3]


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
        unknown = set(query) - {"endpoint", "region", "sign_payload"}
        if unknown:
            raise _bad(
                text,
                f"unknown parameter {sorted(unknown)[0]!r} (endpoint, region, sign_payload)",
            )
        sign = query.get("sign_payload", [""])[-1]
        if sign.lower() not in ("", "yes", "no", "true", "false", "1", "0"):
            raise _bad(text, f"sign_payload is yes or no, not {sign!r}")
        if not parts.netloc:
            raise _bad(text, "it names no bucket")
        endpoint = query.get("endpoint", [""])[-1]
        tls = endpoint.startswith("https") or not endpoint
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
            tls=tls,
            sign_payload=sign.lower() in ("yes", "true", "1") if sign else not tls,
        )
    if parts.fragment:
        raise _bad(text, "a remote URL has no fragment")
    given = {
        k: v[-1] for k, v in urllib.parse.parse_qs(parts.query, keep_blank_values=True).items()
    }
    tls = scheme in ("grpcs", "https")
    allowed = (
        {"token_file"}
        | ({"ca"} if tls else set())
        | ({"cert", "key"} if scheme == "grpcs" else set())
    )
    unknown = set(given) - allowed
    if unknown:
        raise _bad(text, f"unknown parameter {sorted(unknown)[0]!r} ({', '.join(sorted(allowed))})")
    if ("cert" in given) != ("key" in given):
        raise _bad(text, "cert and key go together")
    made = functools.partial(
        RemoteUrl, tls=tls, token_file=given.get("token_file", ""), ca=given.get("ca", ""),
        cert=given.get("cert", ""), key=given.get("key", ""),
    )  # fmt: skip
    if scheme in ("grpc", "grpcs"):
        address = _host_port(text, parts, GRPC_PORT)
        return made("grpc", text, address, instance=prefix.rstrip("/"))
    if scheme in ("http", "https"):
        address = _host_port(text, parts, HTTP_PORT if scheme == "http" else 443)
        return made("http", text, f"{scheme}://{address}", prefix=prefix)
    raise _bad(text, f"unknown kind {parts.scheme!r}" if scheme else "it is not a URL")


__all__ = ["FORMS", "GRPC_PORT", "HTTP_PORT", "RemoteUrl", "parse_remote"]
